"""The control channel to agents in cVMs: a loopback listener, one-time tokens, and inline payloads.

An agent inside a cVM reaches the host only through Intravisor's host-socket hostcalls, so the
backend listens on a loopback TCP port and each agent connects back. Any local process can
connect too, so the first line must carry the one-time token written into that cVM's YAML; a
token is consumed by its first use and compared in constant time. After the handshake the
connection is the cVM's control channel: core reads and writes it with the wire protocol.

Two things differ from the emulated backend's channel, both because neither side can map the
other's memory: a request body core placed in the staging area travels inline (the writer below
copies it into the message), and the agent inlines large results itself. Besides core's messages,
the backend answers the agent's console syncs on the same connection (``console-synced``): core
never sees those, since the agent asks for one only while it holds a result back.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capfaas.core import wire
from capfaas.core.capability import Capability

HELLO = b"capfaas-agent"
HELLO_LIMIT = 256
CAPABILITY_MARK = b"\xc7\x11\x01"
"""How msgpack encodes a capability (ext 8, 17 bytes, type 1): a write without it carries none."""



def inline_capabilities(data: bytes, memory: Any) -> bytes:
    """Replace each capability body in ``data`` (packed messages) with the bytes it points to in
    ``memory``: on Morello the other side cannot map this process's memory, so payloads go inline."""
    unpacker = wire.unpacker(max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    out = bytearray()
    for message in unpacker:
        body = message.get("body") if isinstance(message, dict) else None
        if isinstance(body, Capability):
            length = message.pop("length", None)
            length = body.length if length is None else length
            message["body"] = memory.view(body, body.address, length).tobytes()
        out += wire.pack(message)
    return bytes(out)

class HandshakeError(Exception):
    """An agent's first line was not a valid hello for a pending cVM."""


@dataclass
class Hello:
    version: str
    pid: int


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: Hello


class WatchedReader(asyncio.StreamReader):
    """A stream reader that tells the supervisor when the agent's side closed.

    Core reads the channel only during an invocation; an agent that ended while its cVM sat idle
    would otherwise go unnoticed, with its monitor possibly spinning."""

    on_eof: Callable[[], None] | None = None

    def feed_eof(self) -> None:
        super().feed_eof()
        if self.on_eof is not None:
            self.on_eof()


class InliningWriter:
    """Core's writer for one cVM: a capability body into the staging area is sent as its bytes.

    Core writes one whole message per ``write``; only messages that contain a capability are
    decoded and re-encoded, the rest pass through untouched."""

    def __init__(self, writer: asyncio.StreamWriter, memory: Any) -> None:
        self._writer = writer
        self._memory = memory

    def write(self, data: bytes) -> None:
        if CAPABILITY_MARK in data:
            data = inline_capabilities(data, self._memory)
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport  # type: ignore[return-value]

    def close(self) -> None:
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def send_control(self, message: dict[str, Any]) -> None:
        """A backend message to the agent (not core's): written whole, between core's messages."""
        if not self._writer.is_closing():
            self._writer.write(wire.pack(message))


@dataclass
class ControlListener:
    """Accepts agents on a loopback port and hands each to the launch that owns its token."""

    host: str = "127.0.0.1"
    handshake_timeout: float = 10.0
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _pending: dict[bytes, asyncio.Future[Connection]] = field(default_factory=dict)
    rejected: int = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:
            reader = WatchedReader(limit=1 << 20, loop=loop)
            return asyncio.StreamReaderProtocol(reader, self._accepted, loop=loop)

        self._server = await loop.create_server(protocol, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def expect(self) -> tuple[str, asyncio.Future[Connection]]:
        """A fresh one-time token and the future its agent's connection will resolve."""
        token = secrets.token_hex(16)
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._pending[_key(token)] = future
        return token, future

    def forget(self, token: str) -> None:
        future = self._pending.pop(_key(token), None)
        if future is not None and not future.done():
            future.cancel()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.handshake_timeout):
                line = await reader.readline()
            token, hello = parse_hello(line)
        except (HandshakeError, TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            self.rejected += 1
            writer.close()
            return
        future = self._pending.pop(_key(token), None)
        if future is None or future.done():
            self.rejected += 1
            writer.close()
            return
        future.set_result(Connection(reader, writer, hello))

    async def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def _key(token: str) -> bytes:
    """Pending launches are looked up by a digest of the token, so lookup time says nothing of it."""
    return hashlib.sha256(token.encode()).digest()


def hello_line(token: str, version: str, pid: int) -> bytes:
    return b"%s %s %s %d\n" % (HELLO, token.encode(), version.encode(), pid)


def parse_hello(line: bytes) -> tuple[str, Hello]:
    if len(line) > HELLO_LIMIT or not line.endswith(b"\n"):
        raise HandshakeError("no hello line")
    parts = line.split()
    if len(parts) != 4 or not hmac.compare_digest(parts[0], HELLO):
        raise HandshakeError("malformed hello")
    token = parts[1].decode("ascii")
    if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        raise HandshakeError("malformed token")
    return token, Hello(parts[2].decode("ascii", "replace"), int(parts[3]))
