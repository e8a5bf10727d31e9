"""The intravisor's end of a cVM's control channel: whole messages, each handed straight to the
invocation waiting for it.

Read through an asyncio ``StreamReader``, every reply cost a copy of its bytes, a wake-up through
three coroutine levels and an empty decode before the real one: at thousands of invocations a
second, more than the rest of the exchange. Here the event loop's read goes into the decoder, and
a complete message is queued for the invocation waiting for it, which is called back (or
resolves the one future waiting for it).
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from . import wire

MAX_QUEUED = 64
"""Messages held for nobody before the channel stops reading: a cVM sending more than it is asked
for is slowed down, not buffered without bound."""


class ChannelClosed(Exception):
    """The cVM's end of the control channel went away (it crashed or was killed)."""


class ProtocolViolation(Exception):
    """The cVM sent something the protocol does not allow (too large, malformed)."""


def buffer_limit(output_limit: int) -> int:
    """Bytes of one undecoded message the intravisor holds for a cVM whose output is limited to
    ``output_limit`` bytes (a result carries at most that much, plus headers and framing)."""
    return 4 * output_limit + (8 << 20)


class ControlChannel(asyncio.Protocol):
    """Messages from a cVM in order, then ``ChannelClosed`` (or the ``ProtocolViolation`` that
    ended them); writes go to the transport as they are."""

    def __init__(self, max_buffer_size: int) -> None:
        self._unpacker = wire.unpacker(max_buffer_size=max_buffer_size)
        self._fed = 0
        self._clean = True
        """Bytes fed to the streaming decoder, and whether its last message ended where they do (it
        holds no part of one back, and the next read may be decoded whole)."""
        self._messages: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[dict[str, Any]] | None = None
        self._ready: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._ended: Exception | None = None
        self._reading = True
        self._writable: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    # -- asyncio's side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool:
        self._end(ChannelClosed())
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._end(ChannelClosed())
        self.resume_writing()  # whoever drains goes on to find the channel closed

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- the intravisor's side -------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes from the cVM, read by the event loop or straight from the socket (a quick reply)."""
        if self._ended is not None:
            return
        if not data:
            self._end(ChannelClosed())
            return
        try:
            if self._clean:  # the usual: a read holds one whole message
                try:
                    message = wire.unpack_one(data)
                except ValueError:  # part of one, or several: the streaming decoder's
                    pass
                else:
                    self._arrived(message)
                    data = b""
            if data:
                unpacker = self._unpacker
                unpacker.feed(data)
                self._fed += len(data)
                self._clean = False
                for message in unpacker:
                    self._clean = unpacker.tell() == self._fed
                    self._arrived(message)
        except ProtocolViolation as exc:
            self._end(exc)
        except ValueError as exc:  # msgpack's BufferFull, malformed ext types, bad data
            self._end(ProtocolViolation(f"malformed control message: {exc}"))
        if self._ready is not None and self._messages:
            self._call_ready()
        if len(self._messages) > MAX_QUEUED and self._reading:
            self._reading = False
            self._pause_reading()

    def _arrived(self, message: Any) -> None:
        if type(message) is not dict:
            raise ProtocolViolation("a control message must be a map")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(message)
        else:
            self._messages.append(message)

    def next_message(self) -> dict[str, Any] | None:
        """The next message already received, if any; raises once they are over."""
        if self._messages:
            message = self._messages.popleft()
            if not self._reading and not self._messages:
                self._reading = True
                self._resume_reading()
            return message
        if self._ended is not None:
            raise self._ended
        return None

    @property
    def has_messages(self) -> bool:
        return bool(self._messages)

    def when_ready(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called once, from the event loop, when a message is there for
        ``next_message`` or the channel has ended (None: no longer). What a future of the next
        message does without the future: a reply costs one scheduled call."""
        self._ready = callback
        if callback is not None and (self._messages or self._ended is not None):
            self._call_ready()

    def _call_ready(self) -> None:
        callback, self._ready = self._ready, None
        assert callback is not None
        self._loop.call_soon(callback)

    def wait(self) -> asyncio.Future[dict[str, Any]]:
        """A future of the next message (when ``next_message`` had none): awaited directly, it
        costs no coroutine of its own."""
        waiter = self._waiter = self._loop.create_future()
        if self._ended is not None:
            waiter.set_exception(self._ended)
        return waiter

    @property
    def ended(self) -> bool:
        """Whether the cVM's end has closed (or broken the protocol)."""
        return self._ended is not None

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    @property
    def congested(self) -> bool:
        """Whether writes are paused until the cVM reads: ``drain()`` before writing more."""
        return self._writable is not None and not self._writable.done()

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _pause_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def _resume_reading(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def _end(self, reason: Exception) -> None:
        if self._ended is None:
            self._ended = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_exception(self._ended)
        if self._ready is not None:
            self._call_ready()


class StreamControlChannel(ControlChannel):
    """A control channel over an asyncio stream pair, for a backend whose connection to the cVM is
    one (the Morello agent's TCP connection): a task moves what the reader gets into the channel,
    and writes go through the writer, which may rewrite them."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any, max_buffer_size: int) -> None:
        super().__init__(max_buffer_size)
        self._reader = reader
        self._writer = writer
        self._taken = asyncio.Event()
        self._taken.set()
        self._pump = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while not self.ended:
                await self._taken.wait()  # a cVM flooding the channel waits until its messages are taken
                self.feed(await self._reader.read(1 << 20))
        except (ConnectionError, OSError):
            self._end(ChannelClosed())

    def _pause_reading(self) -> None:
        self._taken.clear()

    def _resume_reading(self) -> None:
        self._taken.set()

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    @property
    def congested(self) -> bool:
        transport = self._writer.transport
        return transport is not None and transport.get_write_buffer_size() > 0

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()
        self._end(ChannelClosed())
        self._taken.set()  # a paused pump sees the end and stops
