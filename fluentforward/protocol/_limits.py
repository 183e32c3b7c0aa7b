"""Resource limits of the Forward protocol core.

Every limit is a named default with the reason for its value. The server builds a ``Limits`` from its
settings; tests and the fuzzer shrink them to reach the edges quickly.
"""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_LIMITS", "STORED_LIMITS", "Limits"]

# Fluent Bit flushes chunks of about 2 MB and its in_forward caps a frame at 6 MB by default; Fluentd's
# memory buffer chunks are 8 MB. 32 MiB leaves room for Fluentd file buffers with a reduced
# chunk_limit_size while keeping the worst case per connection bounded.
DEFAULT_MAX_FRAME_BYTES = 32 * 1024 * 1024

# A compressed frame may inflate far beyond its wire size (a "zip bomb" costs at most this much).
# Fluentd caps at 256 MiB and Vector at 100 MiB; 64 MiB covers a 32 MiB frame at 2x ratio with room.
DEFAULT_MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024

# Fluent Bit 2 MB chunks hold about 20k short records; Fluentd 8 MB chunks about 80k. 500k is far above
# any real chunk and stops an attacker from making us allocate millions of tiny objects per frame.
DEFAULT_MAX_ENTRIES_PER_FRAME = 500_000

# Fluent Bit tail tags embed the log path (about 200 bytes); OpenTelemetry's receiver caps at 128 KiB.
DEFAULT_MAX_TAG_BYTES = 4096
# The spool stores a tag's length in 16 bits, with room left for a --tag-prefix.
MAX_TAG_BYTES_LIMIT = 60000


@attrs.frozen(kw_only=True)
class Limits:
    """Bounds enforced while decoding one connection's input.

    Attributes:
        max_frame_bytes: largest single request (one msgpack object) accepted on the wire.
        max_decompressed_bytes: largest inflated payload of one CompressedPackedForward frame.
        max_entries_per_frame: most events one frame may carry.
        max_tag_bytes: longest tag.
    """

    max_frame_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES)
    max_decompressed_bytes: int = attrs.field(default=DEFAULT_MAX_DECOMPRESSED_BYTES)
    max_entries_per_frame: int = attrs.field(default=DEFAULT_MAX_ENTRIES_PER_FRAME)
    max_tag_bytes: int = attrs.field(default=DEFAULT_MAX_TAG_BYTES)

    @max_frame_bytes.validator
    @max_decompressed_bytes.validator
    @max_entries_per_frame.validator
    @max_tag_bytes.validator
    def _positive(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            msg = f"{attribute.name} must be at least 1, got {value}"
            raise ValueError(msg)
        if attribute.name == "max_tag_bytes" and value > MAX_TAG_BYTES_LIMIT:
            msg = f"max_tag_bytes must be at most {MAX_TAG_BYTES_LIMIT}, got {value}"
            raise ValueError(msg)


DEFAULT_LIMITS = Limits()

# Stored frames were validated when they were received, under the server's limits, which an operator
# may have raised above the defaults. Decoding them again for delivery (shipper, replay, spool cat)
# must not refuse what was acked, so it applies only these ceilings: a frame's own size already
# bounds what decoding it builds.
STORED_LIMITS = Limits(
    max_frame_bytes=2**62,
    max_decompressed_bytes=2**62,  # (zlib takes the cap + 1 as a C ssize_t)
    max_entries_per_frame=2**32 - 1,
    max_tag_bytes=MAX_TAG_BYTES_LIMIT,
)
