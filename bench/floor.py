"""The floor: the least any Python Forward receiver can do per record (trio + msgpack decode + ack).

``python -m bench.floor [--port N]`` prints ``LISTENING <port>`` on stdout and serves until SIGTERM or
SIGINT. Per connection it reads like the server does (``fluentforward.server.RECEIVE_BYTES`` at a
time), decodes every request with msgpack into Python objects (``raw=False``), decodes packed and
gzip entries fully too, and answers ``{"ack": chunk}``. Nothing else: no validation, no spool, no
fsync, no normalization. The server's CPU per record is reported as a multiple of this one's.

The cyclic garbage collector is off (``--gc`` turns it on): decoded msgpack holds no reference cycles,
so the least a receiver can do does not include paying for a collector. With it on, 120 connections
each part-way through a 2 MB frame keep about a million decoded containers alive, every collection
walks them all, and this receiver acked nothing in a 10-second window (measured; 40k records/s off).

Invariants: it must stay the cheapest correct acknowledger, so it never grows features; a request it
cannot decode closes the connection (the load generator then reports an error).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import zlib

import msgpack
import trio

from fluentforward.server import RECEIVE_BYTES

__all__ = ["decode_request", "main", "serve"]

# Frames up to the server's default --max-frame-bytes (32 MiB) decode here too.
MAX_FRAME_BYTES = 32 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


def decode_request(request: object) -> tuple[int, str | None]:
    """Decode a request's entries completely; return how many there were and its chunk id.

    Raises:
        ValueError: the request is not a Forward/PackedForward/Message request.
    """
    if type(request) is not list or len(request) < 2:
        raise ValueError("not a Forward request")
    second = request[1]
    options = request[-1] if type(request[-1]) is dict else None
    chunk = None if options is None else options.get("chunk")
    if type(second) is list:  # Forward: the unpacker already built every entry
        return len(second), chunk
    if isinstance(second, bytes):  # PackedForward / CompressedPackedForward
        payload = zlib.decompress(second, wbits=31) if second.startswith(_GZIP_MAGIC) else second
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(payload), 1))
        unpacker.feed(payload)
        return sum(1 for _ in unpacker), chunk
    return 1, chunk  # Message mode


async def _handle(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_FRAME_BYTES)
    packer = msgpack.Packer()
    try:
        while data := await stream.receive_some(RECEIVE_BYTES):
            unpacker.feed(data)
            acks = [
                packer.pack({"ack": chunk})
                for request in unpacker
                if (chunk := decode_request(request)[1]) is not None
            ]
            if acks:
                await stream.send_all(b"".join(acks))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:  # undecodable input: say so, close, keep serving the others
        print(f"floor: closing a connection: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        await trio.aclose_forcefully(stream)


async def serve(port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on 127.0.0.1:``port`` (0 picks one) until cancelled or signalled; report the bound port."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _handle, listeners)
            task_status.started(bound)
            print(f"LISTENING {bound}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--gc", action="store_true", help="keep the cyclic garbage collector on")
    args = parser.parse_args(argv)
    if not args.gc:
        gc.disable()
    trio.run(serve, args.port)
    sys.exit(0)


if __name__ == "__main__":
    main()
