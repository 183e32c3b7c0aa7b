"""A minimal local Loki push endpoint that only counts what it receives (for ``make bench``).

``python -m bench.lokisink [--port N]`` prints ``LISTENING <port>`` on stdout and serves until SIGTERM
or SIGINT:

* ``POST /loki/api/v1/push``: a snappy-block ``logproto.PushRequest`` (``application/x-protobuf``) or
  JSON, optionally gzip (``Content-Encoding: gzip``); bodies may be chunked. The entries are counted
  (protobuf: the wire is walked field by field, nothing is materialised) and 204 is answered. A body
  that does not decode gets 400 with the reason, like Loki.
* ``GET /stats``: JSON ``{"requests", "entries", "streams", "bytes", "errors", "last_push_monotonic"}``.

It runs in its own process so its CPU never counts as the server's. Invariants: bodies are bounded
(``MAX_BODY_BYTES``), the counters only grow, and nothing is stored.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import signal
import sys
import threading
import time
from typing import Any

import cramjam
import orjson

__all__ = ["Counters", "count_json", "count_protobuf", "main"]

# Loki's default grpc_server_max_recv_msg_size (100 MB) is the most a real Loki would take.
MAX_BODY_BYTES = 100 * 1024 * 1024
PUSH_PATH = "/loki/api/v1/push"

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class Counters:
    """What the sink has received; updated under a lock (the HTTP server is threaded)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.entries = 0
        self.streams = 0
        self.bytes = 0
        self.errors = 0
        self.last_push_monotonic = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-able dict."""
        with self.lock:
            return {
                "requests": self.requests,
                "entries": self.entries,
                "streams": self.streams,
                "bytes": self.bytes,
                "errors": self.errors,
                "last_push_monotonic": self.last_push_monotonic,
            }


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(data: bytes, start: int, end: int) -> Any:
    """Yield (field number, wire type, value start, value end) of a protobuf message slice."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == _WIRE_LEN:
            length, pos = _varint(data, pos)
            value_end = pos + length
        elif wire == _WIRE_VARINT:
            _, value_end = _varint(data, pos)
        elif wire == _WIRE_I64:
            value_end = pos + 8
        elif wire == _WIRE_I32:
            value_end = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if value_end > end:
            raise ValueError("field runs past the end of its message")
        yield key >> 3, wire, pos, value_end
        pos = value_end


def count_protobuf(body: bytes) -> tuple[int, int]:
    """Count (streams, entries) in a snappy-block-compressed ``logproto.PushRequest``.

    Raises:
        ValueError: not snappy block data, or not a PushRequest.
    """
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise ValueError(f"not snappy block data: {exc}") from exc
    streams = entries = 0
    for number, wire, start, end in _fields(raw, 0, len(raw)):
        if number != 1 or wire != _WIRE_LEN:  # PushRequest.streams = 1
            continue
        streams += 1
        # StreamAdapter.entries = 2; labels (1) and hash (3) are skipped.
        entries += sum(1 for n, w, _, _ in _fields(raw, start, end) if n == 2 and w == _WIRE_LEN)
    return streams, entries


def count_json(body: bytes) -> tuple[int, int]:
    """Count (streams, entries) in a JSON push body (``{"streams": [{"values": [...]}]}``).

    Raises:
        ValueError: not a JSON push body.
    """
    try:
        payload = orjson.loads(body)
        streams = payload["streams"]
        return len(streams), sum(len(stream["values"]) for stream in streams)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a JSON push body: {exc}") from exc


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Loki clients expect
    counters: Counters  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # one line per request would cost more than the counting

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and status != 204:
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            size = 0
            while True:
                length = int(self.rfile.readline(64).split(b";")[0].strip(), 16)
                if length == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                size += length
                if size > MAX_BODY_BYTES:
                    raise ValueError("body too large")
                parts.append(self.rfile.read(length))
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._reply(200, orjson.dumps(self.counters.snapshot()), "application/json")
        elif self.path == "/ready":
            self._reply(200, b"ready\n")
        else:
            self._reply(404, b"not found\n")

    def do_POST(self) -> None:
        if self.path != PUSH_PATH:
            self._reply(404, b"not found\n")
            return
        try:
            body = self._read_body()
            size = len(body)
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            if "protobuf" in self.headers.get("Content-Type", ""):
                streams, entries = count_protobuf(body)
            else:
                streams, entries = count_json(body)
        except (ValueError, OSError, EOFError) as exc:
            with self.counters.lock:
                self.counters.errors += 1
            self._reply(400, f"bench lokisink: {exc}\n".encode())
            return
        counters = self.counters
        with counters.lock:
            counters.requests += 1
            counters.entries += entries
            counters.streams += streams
            counters.bytes += size
            counters.last_push_monotonic = time.monotonic()
        self._reply(204)


def make_server(port: int = 0) -> tuple[http.server.ThreadingHTTPServer, Counters]:
    """Bind 127.0.0.1:``port`` (0 picks one); return the server (not yet serving) and its counters."""
    counters = Counters()
    handler = type("Handler", (_Handler,), {"counters": counters})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server, counters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lokisink", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server, _ = make_server(args.port)

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
