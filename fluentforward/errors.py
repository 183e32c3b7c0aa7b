"""The one error tree of fluentforward.

Errors say whose fault it was, so the code that catches them knows what to do::

    FluentForwardError
    ├── ProtocolError                 the Forward protocol was broken
    │   ├── RemoteProtocolError       by the peer: log peer + reason + offset, close the connection
    │   └── LocalProtocolError        by us (a bug in the caller of the sans-IO core)
    ├── SpoolError                    the spool cannot be read or written
    │   └── SpoolCorrupt              a frame fails its checksum or framing (names the place)
    ├── SinkError                     a destination (Loki, a forward target) failed
    │   ├── SinkUnavailable           transient: retry with backoff, keep the data
    │   └── SinkRejected              permanent for this data: dead-letter it, move on
    └── ConfigError                   bad settings: the CLI prints one line and exits 2

Any other exception escaping ``ServerConnection.receive_data`` is a bug.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FluentForwardError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "SinkError",
    "SinkRejected",
    "SinkUnavailable",
    "SpoolCorrupt",
    "SpoolError",
]


class FluentForwardError(Exception):
    """Base of every error fluentforward raises on purpose."""


class ProtocolError(FluentForwardError):
    """The Forward protocol was violated.

    Attributes:
        offset: byte offset in the connection's input stream where the bad frame started, if known.
    """

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class RemoteProtocolError(ProtocolError):
    """The peer sent something the Forward protocol does not allow; the connection must close."""


class LocalProtocolError(ProtocolError):
    """We asked the sans-IO core to do something illegal in its current state (our bug)."""


class SpoolError(FluentForwardError):
    """The spool directory cannot be used."""


class SpoolCorrupt(SpoolError):  # noqa: N818 - reads as a fact, like trio.BrokenResourceError
    """A stored frame fails its checksum or framing.

    Attributes:
        path: the segment file.
        offset: byte offset of the bad frame in that file.
    """

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(f"{path}@{offset}: {message}")
        self.path = path
        self.offset = offset


class SinkError(FluentForwardError):
    """A destination failed."""


class SinkUnavailable(SinkError):  # noqa: N818
    """The destination is down, slow or rate limiting: retry later, keep the data."""


class SinkRejected(SinkError):  # noqa: N818
    """The destination refused this data for good (for example Loki's 400): dead-letter it."""


class ConfigError(FluentForwardError):
    """A setting is invalid. The CLI prints the message and exits with code 2."""
