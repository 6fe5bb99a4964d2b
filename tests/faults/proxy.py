"""A fault-injecting HTTP proxy on loopback, in front of a real server, for the regeneration fault cases.

Each connection carries one request. For each, a seeded draw picks what happens:

- ``pass``: forwarded; the answer goes back (with ``Connection: close``);
- ``slow``: forwarded after a delay;
- ``throttle`` / ``error``: a 429 (``Retry-After: 0``) or a 500 comes back and nothing is forwarded;
- ``reset``: the connection is reset before anything is forwarded;
- ``lost``: forwarded and answered by the server, then the connection is reset before the client gets the answer
  (the server did the work; the client must ask again, and must not write it twice).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

FAULTS = ("slow", "throttle", "error", "reset", "lost")
_CANNED = {
    "throttle": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\n",
    "error": b"HTTP/1.1 500 Internal Server Error\r\n",
}


class FaultyProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` (host, port), injecting faults at the given rates."""

    def __init__(self, upstream: tuple[str, int], rates: Mapping[str, float], seed: int = 0, delay: float = 0.2):
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) >= 1:
            raise ValueError(f"rates must name faults of {FAULTS} and leave room for passing requests: {rates}")
        self.upstream = upstream
        self.rates = dict(rates)
        self.delay = delay
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()

    def _draw(self) -> str:
        roll, edge = self.random.random(), 0.0
        for fault, rate in self.rates.items():
            edge += rate
            if roll < edge:
                return fault
        return "pass"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            if request is None:
                return
            fault = self._draw()
            self.counts[fault] += 1
            if fault in _CANNED:
                body = b'{"error": {"message": "injected"}}'
                head = _CANNED[fault] + b"Content-Type: application/json\r\nConnection: close\r\n"
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                return
            if fault == "reset":
                _reset(writer)
                return
            if fault == "slow":
                await asyncio.sleep(self.delay)
            response = await self._forward(request)
            if fault == "lost":
                _reset(writer)
                return
            writer.write(response)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _forward(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(request)
            await writer.drain()
            response = await reader.read()  # the request asked the server to close after answering
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 request, rewritten to ``Connection: close``; None when the client sent nothing."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    length = 0
    kept = []
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() != b"connection":
            kept.append(line)
    body = await reader.readexactly(length)
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0), as a crashed peer or a dropping load balancer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextmanager
def faulty_proxy(
    upstream_url: str, rates: Mapping[str, float], seed: int = 0, delay: float = 0.2
) -> Iterator[tuple[str, FaultyProxy]]:
    """Run a :class:`FaultyProxy` in front of ``upstream_url`` (``http://host:port``) in a background thread;
    yields its base URL and the proxy (whose ``counts`` say what was injected)."""
    host, _, port = upstream_url.removeprefix("http://").rstrip("/").partition(":")
    proxy = FaultyProxy((host, int(port)), rates, seed, delay)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.AbstractServer] = {}

    async def start() -> None:
        holder["server"] = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the fault proxy did not start")
    bound = holder["server"].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}", proxy
    finally:
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
