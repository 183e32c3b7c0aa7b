"""Tests for fluentforward.sinks.loki: encoders, batching, retry policy and the sink against a fake Loki."""

from __future__ import annotations

import base64
import gzip
import random
import ssl
import time
from collections import Counter

import cramjam
import httpx
import orjson
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import ConfigError, SinkRejected, SinkUnavailable
from fluentforward.sinks import LokiEntry
from fluentforward.sinks.loki import (
    Backoff,
    Batch,
    Batcher,
    LokiSettings,
    LokiSink,
    PushOutcome,
    Verdict,
    classify_status,
    encode_push_json,
    encode_push_protobuf,
    entry_size,
    push_url,
    render_selector,
)
from tests.fakeloki import (
    FakeLimits,
    FakeLoki,
    Hangup,
    Reply,
    Stall,
    decode_push_json,
    decode_push_protobuf,
    parse_selector,
)

NOW_NS = time.time_ns()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SHOP = (("app", "api"), ("namespace", "shop"))
JOBS = (("job", "worker"),)


def entry(
    i: int = 0,
    *,
    labels: tuple[tuple[str, str], ...] = SHOP,
    line: str | None = None,
    time_ns: int | None = None,
    metadata: tuple[tuple[str, str], ...] = (("trace_id", TRACE),),
    tenant: str | None = None,
) -> LokiEntry:
    return LokiEntry(
        labels=labels,
        time_ns=NOW_NS + i * 1000 if time_ns is None else time_ns,
        line=f"line {i}" if line is None else line,
        structured_metadata=metadata,
        tenant=tenant,
    )


def decoded(entries: list[LokiEntry]) -> Counter[tuple[object, ...]]:
    """The multiset of (labels, ts, line, metadata) a list of entries should decode to."""
    return Counter((e.labels, e.time_ns, e.line, e.structured_metadata) for e in entries)


def protobuf_contents(body: bytes) -> Counter[tuple[object, ...]]:
    return Counter(
        (tuple(parse_selector(s.labels)), e.ts_ns, e.line, e.structured_metadata)  # type: ignore[arg-type]
        for s in decode_push_protobuf(body)
        for e in s.entries
    )


# ------------------------------------------------------------------------------------------------
# Encoders


class TestEncodePushProtobuf:
    def test_round_trips_through_an_independent_decoder(self):
        """Labels, timestamps, lines and structured metadata survive protobuf + snappy."""
        entries = [entry(i) for i in range(3)] + [entry(9, labels=JOBS, metadata=())]
        push = encode_push_protobuf(entries)
        assert protobuf_contents(push.body) == decoded(entries)
        assert (push.entries, push.streams) == (4, 2)

    def test_uses_snappy_block_format_and_protobuf_content_type(self):
        """The body is snappy block (not framed) and only Content-Type is set."""
        push = encode_push_protobuf([entry()])
        assert not push.body.startswith(b"\xff\x06\x00\x00sNaPpY")
        cramjam.snappy.decompress_raw(push.body)
        assert dict(push.headers) == {"Content-Type": "application/x-protobuf"}

    def test_sorts_entries_by_time_within_each_stream(self):
        """Each stream's entries come out in time order, ties in input order."""
        entries = [
            entry(3),
            entry(1, line="a"),
            entry(2, labels=JOBS),
            entry(1, line="b"),
            entry(0, labels=JOBS),
        ]
        streams = decode_push_protobuf(encode_push_protobuf(entries).body)
        assert [[(e.ts_ns - NOW_NS, e.line) for e in s.entries] for s in streams] == [
            [(1000, "a"), (1000, "b"), (3000, "line 3")],
            [(0, "line 0"), (2000, "line 2")],
        ]

    def test_groups_one_stream_per_label_set(self):
        """Entries with equal labels (even as distinct tuples) share one stream."""
        entries = [
            entry(0, labels=(("a", "1"),)),
            entry(1, labels=(("a", "1"),)),
            entry(2, labels=(("a", "2"),)),
        ]
        streams = decode_push_protobuf(encode_push_protobuf(entries).body)
        assert [(s.labels, len(s.entries)) for s in streams] == [('{a="1"}', 2), ('{a="2"}', 1)]

    @pytest.mark.parametrize("time_ns", [0, 1, 999_999_999, 1_000_000_000, -1, -1_500_000_000, 2**62])
    def test_timestamps_split_into_seconds_and_nanos(self, time_ns):
        """Any int64 nanosecond time, including 0 and pre-1970, decodes back exactly."""
        streams = decode_push_protobuf(encode_push_protobuf([entry(time_ns=time_ns)]).body)
        assert streams[0].entries[0].ts_ns == time_ns

    def test_lone_surrogates_become_replacement_characters(self):
        """A lone surrogate in a line, label or metadata is sent as U+FFFD instead of failing."""
        bad = entry(line="a\udcffb", labels=(("app", "x\ud800"),), metadata=(("k", "\udfff"),))
        stream = decode_push_protobuf(encode_push_protobuf([bad]).body)[0]
        assert parse_selector(stream.labels) == [("app", "x\ufffd")]  # type: ignore[arg-type]
        assert stream.entries[0].line == "a\ufffdb"
        assert stream.entries[0].structured_metadata == (("k", "\ufffd"),)

    def test_large_lines_and_many_pairs(self):
        """Multi-byte varints (lines over 16 KiB, many pairs) decode correctly."""
        big = entry(line="é" * 200_000, metadata=tuple((f"k{i}", "v" * i) for i in range(200)))
        assert protobuf_contents(encode_push_protobuf([big]).body) == decoded([big])


class TestEncodePushJson:
    def test_round_trips_through_an_independent_decoder(self):
        """The gzip JSON body decodes to the same streams, entries and metadata."""
        entries = [entry(i) for i in range(3)] + [entry(9, labels=JOBS, metadata=())]
        push = encode_push_json(entries)
        assert dict(push.headers) == {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        streams = decode_push_json(gzip.decompress(push.body))
        got = Counter((s.labels, e.ts_ns, e.line, e.structured_metadata) for s in streams for e in s.entries)
        assert got == decoded(entries)

    def test_timestamps_are_strings_and_metadata_is_optional(self):
        """Timestamps are strings of nanoseconds; the third element appears only with metadata."""
        body = orjson.loads(gzip.decompress(encode_push_json([entry(0), entry(1, metadata=())]).body))
        assert body["streams"][0]["values"] == [
            [str(NOW_NS), "line 0", {"trace_id": TRACE}],
            [str(NOW_NS + 1000), "line 1"],
        ]

    def test_lone_surrogates_become_replacement_characters(self):
        """orjson's refusal of surrogates is handled by scrubbing every string."""
        bad = entry(line="a\udcff", labels=(("app", "\ud800"),), metadata=(("k\udfff", "v"),))
        stream = decode_push_json(gzip.decompress(encode_push_json([bad]).body))[0]
        assert stream.labels == (("app", "\ufffd"),)
        assert stream.entries[0].line == "a\ufffd"
        assert stream.entries[0].structured_metadata == (("k\ufffd", "v"),)


class TestRenderSelector:
    @pytest.mark.parametrize(
        ("value", "rendered"),
        [
            ("plain", '"plain"'),
            ('say "hi"', '"say \\"hi\\""'),
            ("C:\\temp", '"C:\\\\temp"'),
            ("two\nlines\r\tx", '"two\\nlines\\r\\tx"'),
            ("\x00\x01\x1f\x7f", '"\\x00\\x01\\x1f\\x7f"'),
            ("\ufffd", '"\\ufffd"'),
            ("ünï 日本 🎉 '`", '"ünï 日本 🎉 \'`"'),
        ],
    )
    def test_escapes_what_lokis_lexer_cannot_read_raw(self, value, rendered):
        """Quotes, backslashes, newlines, controls and U+FFFD are escaped; other text is raw."""
        text = render_selector([("a", value)])
        assert text == "{a=" + rendered + "}"
        assert parse_selector(text) == [("a", value)]

    def test_lone_surrogates_are_rendered_as_escaped_replacement_characters(self):
        """A lone surrogate in a value becomes the escape for U+FFFD."""
        assert render_selector([("a", "x\ud800")]) == '{a="x\\ufffd"}'

    def test_separates_pairs_with_comma_space(self):
        """The selector looks like Prometheus' own rendering."""
        assert render_selector([("a", "1"), ("b", "2")]) == '{a="1", b="2"}'


label_names = st.from_regex(r"\A[a-zA-Z_][a-zA-Z0-9_]{0,20}\Z")
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=50)
entries_strategy = st.lists(
    st.builds(
        LokiEntry,
        labels=st.dictionaries(label_names, texts, min_size=1, max_size=5).map(
            lambda d: tuple(sorted(d.items()))
        ),
        time_ns=st.integers(-(2**62), 2**62),
        line=st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
        structured_metadata=st.lists(st.tuples(label_names, texts), max_size=4).map(tuple),
    ),
    max_size=30,
)


@given(entries_strategy)
def test_protobuf_encoding_decodes_to_the_same_entries(entries):
    """Any list of valid entries decodes back to the same multiset, time-sorted within streams."""
    body = encode_push_protobuf(entries).body
    assert protobuf_contents(body) == decoded(entries)
    for stream in decode_push_protobuf(body):
        times = [e.ts_ns for e in stream.entries]
        assert times == sorted(times)


# ------------------------------------------------------------------------------------------------
# Batching


class TestBatcher:
    def test_closes_a_batch_before_it_would_overflow(self):
        """Adding an entry that does not fit returns the previous batch."""
        batcher = Batcher(max_bytes=25, max_wait_s=1.0)
        first = [entry(i, line="x" * 10, metadata=()) for i in range(2)]
        assert batcher.add(first[0], now=0.0) == ()
        assert batcher.add(first[1], now=0.0) == ()
        (closed,) = batcher.add(entry(3, line="y" * 10, metadata=()), now=0.0)
        assert closed == Batch(tenant=None, entries=tuple(first), size=20)
        assert len(batcher) == 1

    def test_an_entry_at_the_limit_travels_alone_at_once(self):
        """An entry as large as the limit closes its own batch immediately."""
        batcher = Batcher(max_bytes=10, max_wait_s=1.0)
        small, big = entry(0, line="ab", metadata=()), entry(1, line="z" * 50, metadata=())
        batcher.add(small, now=0.0)
        assert [b.entries for b in batcher.add(big, now=0.0)] == [(small,), (big,)]
        assert len(batcher) == 0

    def test_closes_batches_by_age(self):
        """A batch is due max_wait_s after its first entry, not after its last."""
        batcher = Batcher(max_bytes=1000, max_wait_s=1.0)
        batcher.add(entry(0), now=10.0)
        batcher.add(entry(1), now=10.9)
        assert batcher.next_deadline() == 11.0
        assert batcher.due(now=10.99) == []
        (batch,) = batcher.due(now=11.0)
        assert len(batch.entries) == 2
        assert batcher.next_deadline() is None

    def test_keeps_tenants_apart(self):
        """Each tenant has its own batch."""
        batcher = Batcher()
        for i, tenant in enumerate(["a", "b", "a", None]):
            batcher.add(entry(i, tenant=tenant), now=0.0)
        assert sorted((b.tenant or "", len(b.entries)) for b in batcher.flush()) == [
            ("", 1),
            ("a", 2),
            ("b", 1),
        ]
        assert batcher.flush() == []

    def test_entry_size_counts_utf8_bytes_of_line_and_metadata(self):
        """Size is what Loki's rate limiter charges: line plus metadata names and values."""
        assert (
            entry_size(entry(line="héllo", metadata=(("trace_id", TRACE), ("k", "é")))) == 6 + 8 + 32 + 1 + 2
        )

    def test_rejects_nonsense_limits(self):
        """A zero byte limit is refused."""
        with pytest.raises(ValueError, match="max_bytes"):
            Batcher(max_bytes=0)


class TestBatchSplit:
    def test_splits_by_size_keeping_order(self):
        """The halves hold about half the bytes each, in the original order."""
        entries = [entry(0, line="x" * 100, metadata=())] + [
            entry(i, line="y" * 10, metadata=()) for i in range(1, 11)
        ]
        head, tail = Batch.of(entries).split()  # type: ignore[misc]
        assert head.entries == tuple(entries[:1])
        assert tail.entries == tuple(entries[1:])
        assert (head.size, tail.size) == (100, 100)

    def test_even_entries_split_in_the_middle(self):
        """Equal entries split into equal halves."""
        entries = [entry(i, line="abcd", metadata=()) for i in range(6)]
        head, tail = Batch.of(entries, tenant="t").split()  # type: ignore[misc]
        assert (len(head.entries), len(tail.entries), head.tenant, tail.tenant) == (3, 3, "t", "t")

    def test_empty_lines_split_by_count(self):
        """Zero-byte entries still split into two non-empty halves."""
        head, tail = Batch.of([entry(i, line="", metadata=()) for i in range(4)]).split()  # type: ignore[misc]
        assert (len(head.entries), len(tail.entries)) == (2, 2)

    def test_a_single_entry_cannot_split(self):
        """Splitting a one-entry batch returns None."""
        assert Batch.of([entry()]).split() is None


# ------------------------------------------------------------------------------------------------
# Retry policy


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (260, Verdict.REJECTED),  # blocked_ingestion
        (301, Verdict.AUTH),
        (400, Verdict.PARTIAL),  # validation: the valid part is stored
        (401, Verdict.AUTH),  # no org id / bad credentials
        (403, Verdict.AUTH),
        (404, Verdict.AUTH),
        (408, Verdict.RETRY),
        (413, Verdict.SPLIT),  # request_body_too_large
        (422, Verdict.REJECTED),
        (429, Verdict.RETRY),  # rate_limited, per_stream_rate_limit, stream_limit
        (500, Verdict.RETRY),
        (501, Verdict.REJECTED),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),  # no healthy ingesters
        (504, Verdict.RETRY),
    ],
)
def test_classify_status(status, verdict):
    """Each status Loki (or a proxy) can answer maps to the documented verdict."""
    assert classify_status(status) is verdict


class TestBackoff:
    def test_sequence_is_exact_with_a_seeded_random(self):
        """Delays are min*2**n plus jitter of the same width, capped at max (dskit's rule)."""
        windows = [(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
        windows += [(256, 300)] * 3
        draws = random.Random(42)
        expected = [low + (high - low) * draws.random() for low, high in windows]
        backoff = Backoff(rand=random.Random(42).random)
        assert [backoff.next_delay() for _ in windows] == expected
        assert backoff.retries == len(windows)

    def test_reset_starts_over(self):
        """After reset the next delay is back in [min, 2*min)."""
        backoff = Backoff(min_s=1.0, max_s=10.0, rand=lambda: 0.999)
        for _ in range(5):
            backoff.next_delay()
        backoff.reset()
        assert backoff.next_delay() == pytest.approx(1.999)

    def test_equal_bounds_give_a_constant_delay(self):
        """With min == max the delay is always min."""
        backoff = Backoff(min_s=2.0, max_s=2.0, rand=lambda: 0.5)
        assert [backoff.next_delay() for _ in range(3)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("verdict", "error"),
    [
        (Verdict.DELIVERED, None),
        (Verdict.RETRY, SinkUnavailable),
        (Verdict.AUTH, SinkUnavailable),
        (Verdict.PARTIAL, SinkRejected),
        (Verdict.REJECTED, SinkRejected),
        (Verdict.SPLIT, SinkRejected),
    ],
)
def test_outcome_as_exception(verdict, error):
    """Retryable outcomes map to SinkUnavailable, permanent ones to SinkRejected."""
    outcome = PushOutcome(verdict=verdict, batch=Batch.of([]), status=None, message="boom")
    got = outcome.error()
    assert (type(got) if got is not None else None) is error
    if got is not None:
        assert "boom" in str(got)


# ------------------------------------------------------------------------------------------------
# Settings


class TestPushUrl:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("http://loki:3100", "http://loki:3100/loki/api/v1/push"),
            ("http://loki:3100/", "http://loki:3100/loki/api/v1/push"),
            ("https://logs.example.com", "https://logs.example.com/loki/api/v1/push"),
            ("https://gw.example.com/tenant-a/push", "https://gw.example.com/tenant-a/push"),
            ("http://loki:3100/loki/api/v1/push", "http://loki:3100/loki/api/v1/push"),
        ],
    )
    def test_base_urls_get_the_push_path(self, url, expected):
        """A URL without a path gets /loki/api/v1/push; one with a path is used as given."""
        assert push_url(url) == expected

    @pytest.mark.parametrize("url", ["ftp://loki", "loki:3100", "http://", "http://loki:abc"])
    def test_bad_urls_are_config_errors(self, url):
        """Non-HTTP or hostless URLs raise ConfigError."""
        with pytest.raises(ConfigError):
            push_url(url)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"format": "xml"},
        {"tenant": "bad tenant"},
        {"username": "u"},
        {"username": "u", "password": "p", "bearer_token": "t"},
        {"bearer_token": "t", "bearer_token_file": "/tmp/x"},
        {"headers": {"Content-Type": "text/plain"}},
        {"headers": {"Authorization": "x"}, "bearer_token": "t"},
        {"key_file": "/tmp/key.pem"},
        {"timeout_s": 0},
        {"concurrency": 0},
        {"max_batch_bytes": 0},
        {"min_backoff_s": 10, "max_backoff_s": 1},
    ],
)
def test_settings_refuse_contradictions(kwargs):
    """Invalid or conflicting settings raise ConfigError at construction."""
    with pytest.raises(ConfigError):
        LokiSettings(url="http://loki:3100", **kwargs)


def test_unreadable_token_file_is_a_config_error(tmp_path):
    """A missing or empty bearer token file fails at start, not at the first push."""
    with pytest.raises(ConfigError, match="bearer_token_file"):
        LokiSink(LokiSettings(url="http://loki:3100", bearer_token_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        LokiSink(LokiSettings(url="http://loki:3100", bearer_token_file=tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------
# The sink against the fake Loki


@pytest.fixture(name="loki")
def _loki():
    with FakeLoki() as loki:
        yield loki


@pytest.fixture(name="auth_loki")
def _auth_loki():
    with FakeLoki(auth_enabled=True) as loki:
        yield loki


class Sleeps:
    """Records requested delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def batch_of(*entries: LokiEntry, tenant: str | None = None) -> Batch:
    return Batch.of(list(entries), tenant=tenant)


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
async def test_push_stores_entries_and_gets_204(loki, fmt):
    """A valid batch is stored by Loki and classified DELIVERED."""
    async with LokiSink(LokiSettings(url=loki.url, format=fmt)) as sink:
        outcome = await sink.push(
            batch_of(entry(0), entry(1, metadata=(("trace_id", TRACE), ("span_id", "00f067aa0ba902b7"))))
        )
    assert (outcome.verdict, outcome.status, outcome.message) == (Verdict.DELIVERED, 204, "")
    stored = loki.query(trace_id=TRACE, app="api")
    assert [(e.line, e.structured_metadata) for e in stored] == [
        ("line 0", {"trace_id": TRACE}),
        ("line 1", {"trace_id": TRACE, "span_id": "00f067aa0ba902b7"}),
    ]
    (request,) = loki.requests
    assert request.headers["user-agent"].startswith("fluentforward/")
    assert "x-scope-orgid" not in request.headers


async def test_retries_429_then_delivers(loki):
    """A 429 is retried after a backoff delay and the batch is stored once."""
    loki.script(Reply(status=429, body="Ingestion rate limit exceeded"))
    sleeps = Sleeps()
    retried = []
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcomes = await sink.push_with_retry(
            batch_of(entry(0)),
            sleep=sleeps,
            rand=lambda: 0.0,
            on_retry=lambda o, d: retried.append((o.status, o.message, d)),
        )
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED]
    assert sleeps.delays == [0.5]
    assert retried == [(429, "Ingestion rate limit exceeded", 0.5)]
    assert len(loki.entries()) == 1


async def test_retries_5xx_but_not_501(loki):
    """503 is retried with growing delays; 501 is a final rejection."""
    loki.script(Reply(status=503), Reply(status=500), Reply(status=501, body="not implemented"))
    sleeps = Sleeps()
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcomes = await sink.push_with_retry(batch_of(entry(0)), sleep=sleeps, rand=lambda: 0.0)
    assert [(o.verdict, o.status, o.message) for o in outcomes] == [
        (Verdict.REJECTED, 501, "not implemented")
    ]
    assert sleeps.delays == [0.5, 1.0]
    assert loki.entries() == []


async def test_400_is_a_partial_success_and_not_retried(loki):
    """Loki stores the valid entries of a 400; the sink reports PARTIAL with Loki's text."""
    too_old = entry(1, time_ns=NOW_NS - 8 * 24 * 3600 * 10**9)
    sleeps = Sleeps()
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcomes = await sink.push_with_retry(batch_of(entry(0), too_old), sleep=sleeps)
    (outcome,) = outcomes
    assert (outcome.verdict, outcome.status) == (Verdict.PARTIAL, 400)
    assert "greater_than_max_sample_age" in outcome.message
    assert "\n" not in outcome.message
    assert sleeps.delays == []
    assert [e.line for e in loki.entries()] == ["line 0"]


async def test_401_sets_auth_failed_until_a_push_succeeds(auth_loki):
    """A missing tenant gives AUTH and auth_failed; a later accepted push clears it."""
    async with LokiSink(LokiSettings(url=auth_loki.url)) as sink:
        outcome = await sink.push(batch_of(entry(0)))
        assert (outcome.verdict, outcome.status, outcome.message) == (Verdict.AUTH, 401, "no org id")
        assert sink.auth_failed
        outcome = await sink.push(batch_of(entry(0), tenant="team-a"))
        assert outcome.verdict is Verdict.DELIVERED
        assert not sink.auth_failed


async def test_auth_failures_retry_slowly_and_keep_the_data(loki):
    """401 and 403 are retried on the slow auth backoff until accepted."""
    loki.script(Reply(status=401), Reply(status=403))
    sleeps = Sleeps()
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcomes = await sink.push_with_retry(batch_of(entry(0)), sleep=sleeps, rand=lambda: 0.0)
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED]
    assert sleeps.delays == [10.0, 20.0]


async def test_connection_refused_is_retry_without_status(loki):
    """With Loki down, push returns RETRY with no status instead of raising."""
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        with loki.down():
            outcome = await sink.push(batch_of(entry(0)))
        assert (outcome.verdict, outcome.status) == (Verdict.RETRY, None)
        assert "ConnectError" in outcome.message
        assert (await sink.push(batch_of(entry(0)))).verdict is Verdict.DELIVERED


async def test_closed_connection_and_timeout_are_retry(loki):
    """A hang-up without an answer and a response slower than the timeout are both RETRY."""
    loki.script(Hangup(), Stall(seconds=30))
    async with LokiSink(LokiSettings(url=loki.url, timeout_s=0.3)) as sink:
        hangup = await sink.push(batch_of(entry(0)))
        stalled = await sink.push(batch_of(entry(1)))
    assert (hangup.verdict, hangup.status) == (Verdict.RETRY, None)
    assert "RemoteProtocolError" in hangup.message
    assert (stalled.verdict, stalled.status, stalled.message) == (
        Verdict.RETRY,
        None,
        "timeout (ReadTimeout)",
    )


async def test_413_splits_the_batch_in_halves(loki):
    """After a 413 both halves are sent separately and delivered in order."""
    loki.script(Reply(status=413, body="request_body_too_large"))
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcomes = await sink.push_with_retry(batch_of(*[entry(i) for i in range(4)]), sleep=Sleeps())
    assert [(o.verdict, len(o.batch.entries)) for o in outcomes] == [
        (Verdict.DELIVERED, 2),
        (Verdict.DELIVERED, 2),
    ]
    assert [o.batch.entries[0].line for o in outcomes] == ["line 0", "line 2"]
    assert len(loki.entries()) == 4


async def test_413_on_a_single_entry_is_rejected(loki):
    """A single entry too large for the body limit cannot be split: it is REJECTED."""
    loki.script(Reply(status=413, body="request_body_too_large"))
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        (outcome,) = await sink.push_with_retry(batch_of(entry(0)), sleep=Sleeps())
    assert (outcome.verdict, outcome.status) == (Verdict.REJECTED, 413)


async def test_persistent_429_over_the_burst_splits_until_it_fits():
    """A batch over Loki's burst is 429'd every time, so it is split after three tries."""
    with FakeLoki(limits=FakeLimits(burst_bytes=100)) as loki:
        entries = [entry(i, line="x" * 30, metadata=()) for i in range(6)]  # 180 bytes
        sleeps = Sleeps()
        async with LokiSink(LokiSettings(url=loki.url)) as sink:
            outcomes = await sink.push_with_retry(batch_of(*entries), sleep=sleeps, rand=lambda: 0.0)
        assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.DELIVERED]
        assert sleeps.delays == [0.5, 1.0]
        assert [r.status for r in loki.requests] == [429, 429, 429, 204, 204]
        assert sorted(e.line for e in loki.entries()) == ["x" * 30] * 6


async def test_tenant_header_comes_from_the_batch_or_the_settings(auth_loki):
    """X-Scope-OrgID is the batch's tenant, else the default tenant."""
    async with LokiSink(LokiSettings(url=auth_loki.url, tenant="default-team")) as sink:
        await sink.push(batch_of(entry(0)))
        await sink.push(batch_of(entry(1), tenant="team-b"))
    assert [r.headers["x-scope-orgid"] for r in auth_loki.requests] == ["default-team", "team-b"]
    assert [e.line for e in auth_loki.entries("default-team")] == ["line 0"]
    assert [e.line for e in auth_loki.entries("team-b")] == ["line 1"]


async def test_invalid_tenant_is_rejected_without_a_request(loki):
    """A tenant Loki can never accept is REJECTED locally instead of retried forever."""
    async with LokiSink(LokiSettings(url=loki.url)) as sink:
        outcome = await sink.push(batch_of(entry(0), tenant="bad\ntenant"))
    assert (outcome.verdict, outcome.status) == (Verdict.REJECTED, None)
    assert loki.requests == []


def test_settings_repr_hides_secrets():
    """Passwords and tokens do not appear in the settings' repr (which may be logged)."""
    text = repr(LokiSettings(url="http://loki:3100", username="u", password="hunter2"))
    text += repr(LokiSettings(url="http://loki:3100", bearer_token="s3cret"))
    assert "hunter2" not in text
    assert "s3cret" not in text


async def test_basic_auth_and_extra_headers(loki):
    """Basic auth is sent as an Authorization header next to the extra headers."""
    settings = LokiSettings(url=loki.url, username="user", password="pa:ss", headers={"X-Env": "prod"})
    async with LokiSink(settings) as sink:
        await sink.push(batch_of(entry(0)))
    (request,) = loki.requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert request.headers["x-env"] == "prod"


async def test_bearer_token_and_token_file_reload_on_401(loki, tmp_path):
    """A bearer token is sent; a token file is re-read after a 401 (rotated credentials)."""
    async with LokiSink(LokiSettings(url=loki.url, bearer_token="abc")) as sink:
        await sink.push(batch_of(entry(0)))
    assert loki.requests[-1].headers["authorization"] == "Bearer abc"

    token = tmp_path / "token"
    token.write_text("old\n")
    loki.script(Reply(status=401, body="invalid token"))
    async with LokiSink(LokiSettings(url=loki.url, bearer_token_file=token)) as sink:
        token.write_text("new\n")
        outcomes = await sink.push_with_retry(batch_of(entry(1)), sleep=Sleeps())
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED]
    assert [r.headers["authorization"] for r in loki.requests[-2:]] == ["Bearer old", "Bearer new"]


async def test_url_with_a_path_is_used_as_given(loki):
    """A configured push path is not rewritten (a gateway's own route)."""
    async with LokiSink(LokiSettings(url=loki.url + "/gateway/push")) as sink:
        outcome = await sink.push(batch_of(entry(0)))
    assert (outcome.verdict, outcome.status) == (Verdict.AUTH, 404)
    assert loki.requests[0].path == "/gateway/push"


async def test_injected_client_is_used_and_not_closed():
    """A client passed in (mock transport) carries the request and stays open."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with LokiSink(LokiSettings(url="http://loki:3100"), client=client) as sink:
        outcome = await sink.push(batch_of(entry(0)))
    assert outcome.verdict is Verdict.DELIVERED
    assert str(seen[0].url) == "http://loki:3100/loki/api/v1/push"
    assert not client.is_closed
    await client.aclose()


async def test_error_bodies_are_bounded_to_one_line():
    """A huge multi-line error body is read only up to the limit and joined into one line."""
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(400, content=b"bad entry\n" * 100_000))
    )
    async with LokiSink(LokiSettings(url="http://loki:3100"), client=client) as sink:
        outcome = await sink.push(batch_of(entry(0)))
    await client.aclose()
    assert outcome.verdict is Verdict.PARTIAL
    assert outcome.message.startswith("bad entry bad entry")
    assert outcome.message.endswith(" ...")
    assert len(outcome.message) < 20_000


class TestTls:
    @pytest.fixture(name="ca")
    def _ca(self):
        return trustme.CA()

    def server_context(self, ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        if require_client_cert:
            ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def test_verifies_loki_with_the_configured_ca(self, ca, tmp_path):
        """With ca_file the push succeeds; without it the certificate is refused (RETRY)."""
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        with FakeLoki(ssl_context=self.server_context(ca)) as loki:
            async with LokiSink(LokiSettings(url=loki.url, ca_file=ca_file)) as sink:
                assert (await sink.push(batch_of(entry(0)))).verdict is Verdict.DELIVERED
            async with LokiSink(LokiSettings(url=loki.url)) as sink:
                refused = await sink.push(batch_of(entry(1)))
            async with LokiSink(LokiSettings(url=loki.url, insecure_skip_verify=True)) as sink:
                assert (await sink.push(batch_of(entry(2)))).verdict is Verdict.DELIVERED
        assert (refused.verdict, refused.status) == (Verdict.RETRY, None)
        assert [e.line for e in loki.entries()] == ["line 0", "line 2"]

    async def test_presents_a_client_certificate(self, ca, tmp_path):
        """cert_file/key_file are offered for mutual TLS."""
        ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
        ca.cert_pem.write_to_path(str(ca_file))
        client_cert = ca.issue_cert("fluentforward")
        client_cert.cert_chain_pems[0].write_to_path(str(cert_file))
        client_cert.private_key_pem.write_to_path(str(key_file))
        with FakeLoki(ssl_context=self.server_context(ca, require_client_cert=True)) as loki:
            settings = LokiSettings(url=loki.url, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            async with LokiSink(settings) as sink:
                assert (await sink.push(batch_of(entry(0)))).verdict is Verdict.DELIVERED
            async with LokiSink(LokiSettings(url=loki.url, ca_file=ca_file)) as sink:
                assert (await sink.push(batch_of(entry(1)))).verdict is Verdict.RETRY

    def test_unreadable_tls_files_are_config_errors(self, tmp_path):
        """A missing CA file fails at construction with ConfigError."""
        with pytest.raises(ConfigError, match="TLS"):
            LokiSink(LokiSettings(url="https://loki:3100", ca_file=tmp_path / "nope.pem"))


async def test_batcher_follows_the_settings():
    """sink.batcher() uses the configured batch bytes and wait."""
    async with LokiSink(LokiSettings(url="http://loki:3100", max_batch_bytes=123, batch_wait_s=0.25)) as sink:
        batcher = sink.batcher()
    assert (batcher.max_bytes, batcher.max_wait_s) == (123, 0.25)
