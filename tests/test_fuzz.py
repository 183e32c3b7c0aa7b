"""Fuzzing the Forward protocol core and a running server; ``make fuzz`` runs 10^6 cases.

Environment: ``FLUENTFORWARD_FUZZ_FRAMES`` sets how many mutated cases go through the protocol core
(default 20000, a few seconds on two cores); the server run sends ``max(FRAMES // 50, 2000)`` of them over
real loopback connections. ``FLUENTFORWARD_FUZZ_SEED`` picks another deterministic run and
``FLUENTFORWARD_FUZZ_REPORT`` names a file to append the run summaries to. A finding names its case as
``seed:index``; ``tests.fuzz_corpus.replay(seed, index)`` re-runs it.

Known bugs of the core are listed in ``fuzz_corpus.KNOWN_BUGS``, each with an xfail(strict) reproducer
below; when one is fixed its reproducer passes (and fails strict): delete the entry, nothing else.
"""

from __future__ import annotations

import collections
import os
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.client import (
    encode_compressed_packed_forward,
    encode_forward,
    encode_message,
    encode_packed_forward,
    frame_options,
    pack_entries,
)
from fluentforward.config import ServerConfig, parse_listen
from fluentforward.errors import RemoteProtocolError
from fluentforward.protocol import (
    DEFAULT_LIMITS,
    EntriesReceived,
    HandshakeCompleted,
    Heartbeat,
    Limits,
    Mode,
    ServerConnection,
    Signal,
    decode_frame,
)
from fluentforward.server import serve
from fluentforward.spool import Spool, SpoolSettings, read_frames
from tests import fuzz_corpus
from tests.fuzz_corpus import (
    CAPTURES,
    FAMILIES,
    FIXED_BUGS,
    KNOWN_BUGS,
    SMALL_LIMITS,
    TINY_LIMITS,
    Case,
    Report,
    active_known_bugs,
    build_corpus,
    check_accepted,
    check_case,
    compress,
    default_workers,
    excuse,
    generate,
    make_cuts,
    make_seed,
    mutate,
    run_parallel,
    split_requests,
)

FRAMES = int(os.environ.get("FLUENTFORWARD_FUZZ_FRAMES", "20000"))
SEED = int(os.environ.get("FLUENTFORWARD_FUZZ_SEED", "20240611"))
REPORT_FILE = os.environ.get("FLUENTFORWARD_FUZZ_REPORT")

# The server run: every SERVER_STRIDE-th case, at least SERVER_MIN_CASES, CONCURRENCY connections at once.
SERVER_STRIDE = 50
SERVER_MIN_CASES = 2000
CONCURRENCY = 8
# A connection whose peer has sent EOF must be closed by the server well within this (the slowest case,
# a bomb at the default limits, costs about 0.2 s).
CLOSE_SECONDS = 10.0

# Rejection reasons the short run must reach: proof that mutations get past the outer msgpack layer into
# every check of the core (frame, handshake, options, entries, times, decompression and each limit).
EXPECTED_REASONS = (
    "invalid msgpack",
    "exceeds max_frame_bytes",
    "max_decompressed_bytes",
    "max_entries_per_frame",
    "max_tag_bytes",
    "connection closed inside a request",
    "data before the handshake",
    "not a map",
    "negative time",
    "not EventTime",
    "option fluent_signal is invalid",
    "option compressed is",
    "gzip payload is corrupt",
    "gzip payload is truncated",
    "zstd payload is corrupt",
    "zstd payload is truncated",
    "packed entries are not a msgpack stream",
    "packed entries end with a truncated entry",
    "not Message, Forward or PackedForward",
)


def _publish(title: str, text: str) -> None:
    print(f"== {title}\n{text}")
    if REPORT_FILE:
        with Path(REPORT_FILE).open("a", encoding="utf-8") as out:
            out.write(f"== {title}\n{text}\n")


# --- the corpus and the mutators ------------------------------------------------------------------------


def test_corpus_holds_every_capture_request():
    """Every top-level request of every Fluent Bit capture is a seed."""
    names = {seed.name for seed in build_corpus().seeds}
    for path in sorted(CAPTURES.glob("*.bin")):
        for i in range(len(split_requests(path.read_bytes()))):
            assert f"{path.name}#{i}" in names


def test_generated_seeds_are_valid_frames_of_every_mode():
    """Generated data seeds are accepted whole and decode; together they cover every mode and signal."""
    modes, signals, compressions = set(), set(), set()
    for seed in build_corpus().seeds:
        if not seed.name.startswith("gen:") or seed.handshake is not None:
            continue
        conn = ServerConnection()
        events = conn.receive_data(seed.data) + conn.receive_data(b"")
        if seed.name == "gen:heartbeat":
            assert events == [Heartbeat()]
            continue
        assert len(events) == 1, seed.name
        for event in events:
            assert isinstance(event, EntriesReceived)
            assert event.raw == seed.data
            problems = check_accepted(event.raw, event, DEFAULT_LIMITS)
            assert problems == [], seed.name
            modes.add(event.mode)
            signals.add(event.signal)
        if seed.inner is not None:
            compressions.add(seed.inner.compression)
    assert modes == {Mode.MESSAGE, Mode.FORWARD, Mode.PACKED, Mode.COMPRESSED}
    assert signals == {Signal.LOGS, Signal.METRICS, Signal.TRACES}
    assert compressions == {"", "gzip", "gzip-multi", "zstd", "zstd-multi"}


def test_corpus_handshakes_complete():
    """Each corpus handshake's PING (captured or generated, with and without users) is accepted."""
    for handshake in build_corpus().handshakes:
        events = handshake.connection(DEFAULT_LIMITS).receive_data(handshake.ping)
        assert len(events) == 1
        assert isinstance(events[0], HandshakeCompleted)


def test_cases_are_deterministic_and_use_every_family():
    """A case is the same bytes every time it is generated, and every mutation family gets used."""
    corpus = build_corpus()
    cases = [generate(corpus, SEED, i) for i in range(3000)]
    assert cases == [generate(corpus, SEED, i) for i in range(3000)]
    assert {case.steps[0] for case in cases} == set(FAMILIES)
    assert fuzz_corpus._generated_frames() == fuzz_corpus._generated_frames()


def test_known_bug_excuses_match_only_their_shape():
    """No known-bug excuse applies to an ordinary corpus frame."""
    for seed in build_corpus().seeds:
        for bug in KNOWN_BUGS:
            assert not bug.explains(seed.data), (bug.name, seed.name)


def test_oracle_reports_foreign_exceptions(monkeypatch):
    """The oracle turns a non-protocol exception from the core or from decode_frame into a finding."""
    frame = fuzz_corpus._generated_frames()["forward-ack"]
    case = Case(seed=0, index=0, base="unit", steps=("as-is",), frame=frame)
    assert check_case(case).findings == ()

    def broken_decode(raw, limits):
        raise KeyError("boom")

    monkeypatch.setattr(fuzz_corpus, "decode_frame", broken_decode)
    (finding,) = check_case(case, KNOWN_BUGS).findings
    assert (finding.kind, finding.error, finding.known) == ("decode", "KeyError: 'boom'", None)
    monkeypatch.undo()

    def broken_receive(self, data):
        raise ValueError("bad")

    monkeypatch.setattr(ServerConnection, "receive_data", broken_receive)
    (finding,) = check_case(case).findings
    assert (finding.kind, finding.error) == ("crash", "ValueError: bad")


def test_a_case_that_never_ends_is_reported_as_a_hang(monkeypatch):
    """The per-case alarm stops a case stuck in Python code and reports it as a hang."""

    def spin(case, known):
        while True:
            pass

    monkeypatch.setattr(fuzz_corpus, "HANG_SECONDS", 0.05)
    monkeypatch.setattr(fuzz_corpus, "check_case", spin)
    report = fuzz_corpus.run_range(build_corpus(), SEED, 0, 1, ())
    assert [finding.kind for finding in report.examples] == ["hang"]


# --- the core run ---------------------------------------------------------------------------------------


def test_protocol_core_survives_mutated_frames():
    """Mutated frames raise only RemoteProtocolError; accepted ones decode and fit the spool; none hangs."""
    report = run_parallel(build_corpus(), seed=SEED, cases=FRAMES, workers=default_workers())
    _publish(f"protocol core, seed {SEED}", report.summary())
    assert report.cases == FRAMES
    assert not report.signatures, report.summary()
    assert report.accepted_frames > FRAMES // 20
    reached = " | ".join(report.reasons)
    missing = [reason for reason in EXPECTED_REASONS if reason not in reached]
    assert not missing, f"the fuzzer never reached {missing}"


# --- the server run ------------------------------------------------------------------------------------


def _server_cases() -> list[Case]:
    corpus = build_corpus()
    count = max(FRAMES // SERVER_STRIDE, SERVER_MIN_CASES)
    return [generate(corpus, SEED, i * SERVER_STRIDE) for i in range(count)]


_STYLES = ("eof", "pieces", "abrupt", "truncated")


async def _fuzz_connection(port: int, case: Case, limiter: trio.CapacityLimiter, ports, stuck) -> None:
    rng = random.Random(case.index)
    style = rng.choice(_STYLES)
    data = case.stream
    if style == "truncated":
        data = data[: rng.randrange(len(data) + 1)]
    pieces = [data]
    if style == "pieces":
        edges = [0, *make_cuts(rng, len(data))[:8], len(data)]
        pieces = [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    async with limiter:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ports[stream.socket.getsockname()[1]].append(case)
        try:
            with trio.fail_after(CLOSE_SECONDS):
                for piece in pieces:
                    await stream.send_all(piece)
                    await trio.sleep(0)
                if style == "abrupt":
                    return
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed first (a protocol error), maybe with a reset
        except trio.TooSlowError:
            stuck.append(case.name)
        finally:
            await trio.aclose_forcefully(stream)


async def _well_behaved(port: int) -> list[Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        frame = encode_forward("fuzz.after", pack_entries([(1, {"ok": True})]), {"chunk": "ZnV6ei1vaw=="})
        await stream.send_all(frame)
        unpacker = msgpack.Unpacker(raw=False)
        with trio.fail_after(CLOSE_SECONDS):
            while not (replies := list(unpacker)):
                unpacker.feed(await stream.receive_some(4096))
        return replies
    finally:
        await stream.aclose()


def _handler_bugs(logs, ports, limits) -> tuple[list[str], int]:
    """connection_handler_bug log events not explained by a known bug of the frame sent; and the excused."""
    known = active_known_bugs()
    unexplained, excused = [], 0
    for entry in logs:
        if entry["event"] != "connection_handler_bug":
            continue
        cases = ports.get(int(entry["peer"].rsplit(":", 1)[1]), [])
        # The server has no shared key and its own limits: re-check each frame the way it saw it.
        rechecks = [check_case(attrs.evolve(c, handshake=None, cuts=(), limits=limits), known) for c in cases]
        if any(f.known is not None for outcome in rechecks for f in outcome.findings):
            excused += 1
        else:
            unexplained.append(f"{entry} cases={[c.name for c in cases]}")
    return unexplained, excused


def _spool_problems(directory: Path, limits) -> tuple[list[str], int, collections.Counter[str]]:
    bad: list[str] = []
    stored = 0
    excused: collections.Counter[str] = collections.Counter()
    known = active_known_bugs()
    for frame in read_frames(
        directory, on_bad=lambda path, end: bad.append(f"{path}@{end.offset}: {end.reason}")
    ):
        stored += 1
        problems = check_accepted(frame.raw, frame.header, limits)
        for kind, error, where in problems:
            if name := excuse(kind, frame.raw, known):
                excused[name] += 1
            else:
                bad.append(f"stored frame {frame.segment}@{frame.offset}: {kind} {error} at {where}")
    return bad, stored, excused


async def test_server_survives_fuzzed_connections(tmp_path):
    """After thousands of fuzzed connections the server acks a valid chunk, holds no connection, logged no
    handler bug, and its spool verifies and decodes."""
    cases = _server_cases()
    spool = Spool.open(SpoolSettings(directory=tmp_path / "spool"))
    config = ServerConfig(listen=parse_listen("127.0.0.1:0"), spool=spool.settings, udp_heartbeat=False)
    ports: dict[int, list[Case]] = collections.defaultdict(list)
    stuck: list[str] = []
    try:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with trio.open_nursery() as nursery:
                state = await nursery.start(serve, config, spool)
                limiter = trio.CapacityLimiter(CONCURRENCY)
                async with trio.open_nursery() as clients:
                    for case in cases:
                        clients.start_soon(_fuzz_connection, state.port, case, limiter, ports, stuck)
                replies = await _well_behaved(state.port)
                with trio.fail_after(CLOSE_SECONDS):
                    while state.stats.connections_open:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        spool.close()
    bad, stored, excused = _spool_problems(spool.directory, config.limits)
    handler_bugs, handler_bugs_excused = _handler_bugs(logs, ports, config.limits)
    stats = state.stats
    _publish(
        f"server, seed {SEED}",
        f"{len(cases)} connections; {stats.frames} frames stored, {stats.frames_duplicate} duplicates, "
        f"{stats.acks} acks, {sum(stats.protocol_errors.values())} protocol errors, "
        f"{stats.handshake_failures} handshake failures; known bugs: {handler_bugs_excused} handler bug logs, "
        f"in the spool {dict(excused) or 'none'}",
    )
    assert replies == [{"ack": "ZnV6ei1vaw=="}]
    assert stuck == []
    assert handler_bugs == []
    assert bad == []
    assert stored == stats.frames  # the fuzzed frames stored, plus the well-behaved one
    assert stats.frames > 0
    assert sum(stats.protocol_errors.values()) > len(cases) // 4


# --- hypothesis ---------------------------------------------------------------------------------------------

_NS = 1_000_000_000
_text = st.text(max_size=16)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | _text
    | st.binary(max_size=16)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3)


_values = st.recursive(_scalars, _containers, max_leaves=8)
_records = st.dictionaries(_text, _values, max_size=4)
_times = st.one_of(
    st.integers(0, 2**32 - 1),
    st.builds(
        lambda s, n: msgpack.ExtType(0, struct.pack(">II", s, n)),
        st.integers(0, 0xFFFFFFFD),  # 0xFFFFFFFE and 0xFFFFFFFF are Fluent Bit group markers
        st.integers(0, _NS - 1),
    ),
    st.floats(0, 4e9),
)
_CARRIERS = ("message", "forward", "packed", "packed-str", "gzip", "gzip-multi", "zstd")


def _time_ns(value: Any) -> int:
    if isinstance(value, msgpack.ExtType):
        seconds, nanos = struct.unpack(">II", value.data)
        return int(seconds * _NS + nanos)
    return int(value * _NS)


@attrs.frozen(kw_only=True)
class Generated:
    """A valid frame and the events it carries."""

    data: bytes
    events: list[tuple[Any, dict[str, Any], dict[str, Any]]]
    v2: bool
    chunk: str | None


@st.composite
def forward_frames(draw) -> Generated:
    """Structurally valid Forward frames of every carrier, built with the client encoders."""
    carrier = draw(st.sampled_from(_CARRIERS))
    tag = draw(st.text(min_size=1, max_size=24))
    events = draw(
        st.lists(st.tuples(_times, _records, _records), min_size=1, max_size=1 if carrier == "message" else 6)
    )
    v2 = carrier != "message" and draw(st.booleans())
    chunk = draw(st.none() | st.text("abcdefABCDEF0123456789+/=", min_size=1, max_size=24))
    options = frame_options(
        chunk=chunk,
        size=len(events) if draw(st.booleans()) else None,
        fluent_signal=0 if draw(st.booleans()) else None,
    )
    if carrier == "message":
        time, record, _ = events[0]
        data = encode_message(tag, time, record, options)
        return Generated(data=data, events=events, v2=False, chunk=chunk)
    packed = pack_entries(events if v2 else [(t, r) for t, r, _ in events], v2=v2)
    if carrier == "forward":
        data = encode_forward(tag, packed, options)
    elif carrier == "packed":
        data = encode_packed_forward(tag, packed, options)
    elif carrier == "packed-str":
        data = msgpack.packb([tag, packed.data, *([options] if options else [])], use_bin_type=False)
    elif carrier == "gzip-multi":
        payload = compress(random.Random(draw(st.integers(0, 99))), packed.data, "gzip-multi")
        data = msgpack.packb([tag, payload, {**(options or {}), "compressed": "gzip"}])
    else:
        data = encode_compressed_packed_forward(tag, packed, compression=carrier, options=options)
    return Generated(data=data, events=events, v2=v2, chunk=chunk)


@given(forward_frames())
def test_generated_frames_are_accepted_and_decode_to_their_events(frame):
    """A valid generated frame is one accepted event that decodes to exactly the events it was built from."""
    (event,) = ServerConnection().receive_data(frame.data)
    assert isinstance(event, EntriesReceived)
    assert event.record_count == len(frame.events)
    assert event.chunk == frame.chunk
    decoded = decode_frame(event.raw)
    assert [entry.time_ns for entry in decoded.entries] == [_time_ns(t) for t, _, _ in frame.events]
    assert [entry.record for entry in decoded.entries] == [record for _, record, _ in frame.events]
    if frame.v2:
        assert [entry.metadata for entry in decoded.entries] == [metadata for _, _, metadata in frame.events]


@given(
    forward_frames(),
    st.randoms(use_true_random=False),
    st.sampled_from((DEFAULT_LIMITS, SMALL_LIMITS, TINY_LIMITS)),
)
def test_mutated_generated_frames_raise_only_protocol_errors(frame, rng, limits):
    """A mutated frame raises only RemoteProtocolError, and whatever the core accepts decode_frame decodes."""
    data, steps = mutate(rng, make_seed("hypothesis", frame.data), build_corpus())
    case = Case(
        seed=0,
        index=0,
        base="hypothesis",
        steps=steps,
        frame=data,
        limits=limits,
        cuts=make_cuts(rng, len(data)),
    )
    findings = [f for f in check_case(case, active_known_bugs()).findings if f.known is None]
    assert not findings, "\n".join(f.describe() for f in findings)


# --- known bugs: minimal reproducers (xfail until the core is fixed) ------------------------------------


@pytest.mark.parametrize(
    "bug",
    [pytest.param(bug, id=bug.name) for bug in FIXED_BUGS]
    + [
        pytest.param(bug, marks=pytest.mark.xfail(strict=True, reason=bug.summary), id=bug.name)
        for bug in KNOWN_BUGS
    ],
)
def test_known_bug_reproducer(bug):
    """The core rejects the reproducer, or delivery decodes what the receive path accepted and the spool stores it."""
    try:
        events = ServerConnection().receive_data(bug.reproducer)
    except RemoteProtocolError:
        return
    for event in events:
        assert isinstance(event, EntriesReceived)
        problems = check_accepted(event.raw, event, DEFAULT_LIMITS)
        assert problems == []


def test_entry_limit_is_enforced_before_the_entries_are_built():
    """Refusing a Forward frame above max_entries_per_frame allocates about the frame's size, not its entries."""
    count = 100_000
    frame = b"\x92\xa1t\xdd" + count.to_bytes(4, "big") + b"\x92\x01\x80" * count  # ["t", [[1, {}] * count]]
    conn = ServerConnection(limits=Limits(max_entries_per_frame=10))
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="max_entries_per_frame"):
            conn.receive_data(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    assert peak < 8 * len(frame)  # the array header is checked before any entry is built


def test_report_merges_examples_and_counts():
    """Merging worker reports adds their counts and keeps a bounded number of examples per signature."""
    corpus = build_corpus()
    left, right = Report(), Report()
    case = generate(corpus, SEED, 0)
    finding = fuzz_corpus.Finding(
        kind="crash",
        error="E: x",
        where="w",
        case="0:0",
        base="b",
        steps=("s",),
        frame_len=1,
        frame_head="00",
    )
    for report in (left, right):
        report.add(case, fuzz_corpus.Outcome(accepted=1, reason="r", findings=(finding,) * 3), 0.5)
    left.merge(right)
    assert (left.cases, left.accepted_frames, left.rejected) == (2, 2, 2)
    assert left.signatures[finding.signature] == 6
    assert len(left.examples) == fuzz_corpus.EXAMPLES_PER_SIGNATURE
