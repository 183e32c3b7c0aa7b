"""Tests for the pre-encoded batches of fluentforward.sinks.loki (``PushBuffer``, ``EncodedBatch``).

``records.Shaper.encode_events`` fills a ``PushBuffer`` on the shipper's hot path; these tests feed it
ready ``LokiEntry`` values (``PushBuffer.add``) and hold it to the plain path: ``batches_by_tenant``
cuts, ``encode_push_protobuf`` bytes, ``Batch.split`` halves.
"""

from __future__ import annotations

import re
import time

import cramjam
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.pipeline import batches_by_tenant
from fluentforward.sinks import LokiEntry
from fluentforward.sinks.loki import (
    EncodedBatch,
    LokiSettings,
    LokiSink,
    PushBuffer,
    Verdict,
    encode_push_protobuf,
)
from tests.fakeloki import FakeLoki

NOW_NS = time.time_ns()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SURROGATE = re.compile("[\ud800-\udfff]")

label_names = st.from_regex(r"\A[a-zA-Z_][a-zA-Z0-9_]{0,10}\Z")
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
entries_strategy = st.lists(
    st.builds(
        LokiEntry,
        labels=st.sampled_from([(("app", "a"),), (("app", "b"), ("ns", 'é"\n')), (("job", ""),)]),
        time_ns=st.one_of(st.integers(-(2**63), 2**64), st.sampled_from([0, NOW_NS, NOW_NS + 1])),
        # Empty lines without metadata weigh nothing: batches of only those never close.
        line=st.one_of(st.just(""), st.text(max_size=120)),
        structured_metadata=st.lists(st.tuples(label_names, texts), max_size=3).map(tuple),
        tenant=st.sampled_from([None, "a", "b"]),
    ),
    max_size=40,
)


def raw(body: bytes) -> bytes:
    return bytes(cramjam.snappy.decompress_raw(body))


def clean(entry: LokiEntry) -> LokiEntry:
    """What the entry reads back as: the encoders write lone surrogates as U+FFFD."""
    return entry._replace(line=SURROGATE.sub("\ufffd", entry.line))


def buffer_of(entries: list[LokiEntry]) -> PushBuffer:
    buffer = PushBuffer()
    for e in entries:
        buffer.add(e)
    return buffer


@given(entries_strategy, st.sampled_from([1, 30, 100, 1000, 1 << 20]))
def test_batches_cut_like_batches_by_tenant_and_encode_the_same_bytes(entries, max_bytes):
    """Same tenants, sizes and entries per batch; the same request body, byte for byte."""
    buffer = buffer_of(entries)
    assert len(buffer) == len(entries)
    got = buffer.batches(max_bytes)
    want = batches_by_tenant(entries, max_bytes)
    assert [(b.tenant, b.size, b.count) for b in got] == [(b.tenant, b.size, b.count) for b in want]
    for g, w in zip(got, want, strict=True):
        assert g.entries == tuple(map(clean, w.entries))
        push = g.encode_protobuf()
        reference = encode_push_protobuf(w.entries)
        assert raw(push.body) == raw(reference.body)
        assert (push.entries, push.streams, push.headers) == (
            reference.entries,
            reference.streams,
            reference.headers,
        )


@given(entries_strategy)
def test_split_halves_like_batch_split(entries):
    """An encoded batch splits where the plain batch splits, with the same sizes."""
    for got, want in zip(
        buffer_of(entries).batches(1 << 30), batches_by_tenant(entries, 1 << 30), strict=True
    ):
        halves, reference = got.split(), want.split()
        if reference is None:
            assert halves is None
            continue
        assert halves is not None
        assert [(h.size, h.count, h.entries) for h in halves] == [
            (r.size, r.count, tuple(map(clean, r.entries))) for r in reference
        ]


def test_entries_decode_back_with_labels_tenant_and_metadata():
    """The readable form (dead letters, JSON) has every field of the entry."""
    entry = LokiEntry(
        labels=(("app", "x"),),
        time_ns=-1,
        line="é" * 20_000,  # a length of three varint bytes
        structured_metadata=(("trace_id", TRACE), ("pod", "")),
        tenant="t",
    )
    (batch,) = buffer_of([entry]).batches(1)
    assert isinstance(batch, EncodedBatch)
    assert batch.entries == (entry,)
    assert batch.split() is None


@pytest.fixture(name="loki")
def fixture_loki():
    with FakeLoki() as fake:
        yield fake


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
async def test_sink_pushes_encoded_batches_in_either_format(loki, fmt):
    """A protobuf sink sends the encoded bytes; a JSON sink sends the decoded entries."""
    entries = [
        LokiEntry((("app", "api"),), NOW_NS + i, f"line {i}", (("trace_id", TRACE),) if i else ())
        for i in range(3)
    ]
    (batch,) = buffer_of(entries).batches(1 << 20)
    async with LokiSink(LokiSettings(url=loki.url, format=fmt)) as sink:
        assert sink.format == fmt
        outcomes = await sink.push_with_retry(batch)
    assert [(o.verdict, o.batch.count) for o in outcomes] == [(Verdict.DELIVERED, 3)]
    stored = loki.entries()
    assert [(e.line, e.structured_metadata) for e in stored] == [
        ("line 0", {}),
        ("line 1", {"trace_id": TRACE}),
        ("line 2", {"trace_id": TRACE}),
    ]
