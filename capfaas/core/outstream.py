"""A function's output streamed to its caller through a CAP_Stream, as the handler yields it.

A handler that returns a generator answers at once with its status and headers; the runtime then
writes each chunk it yields into a ring the intravisor reads, so a response of any size is sent
in bounded memory on both sides, and a slow client slows the generator down (backpressure). The
cVM stays busy until the runtime says the generator ended, and how.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from .channels import is_request
from .cvm import IDLE, STOPPED
from .ring import RingReader

CHUNK = 1 << 20
STREAM_CAPACITY = 4 << 20


class StreamFailed(Exception):
    """The stream broke off: the generator raised, the cVM died, or the time ran out."""


class OutputStream:
    """The intravisor's side of one streamed response."""

    def __init__(self, intravisor: Any, cvm: Any, obj: Any, reader: RingReader, deadline: float,
                 top_level_id: str | None) -> None:
        self.intravisor = intravisor
        self.cvm = cvm
        self.obj = obj
        self.reader = reader
        self.deadline = deadline
        """``time.monotonic()`` by which the whole stream must be done (the function's timeout)."""
        self.top_level_id = top_level_id
        self.error: dict[str, Any] | None = None
        self._ended = asyncio.ensure_future(self._watch_control())
        self._ended.add_done_callback(lambda ended: ended.cancelled() or ended.exception())  # seen here
        self._released = False

    async def _watch_control(self) -> dict[str, Any]:
        """Serve the cVM's requests while it streams; return its closing ``streamed`` message."""
        while True:
            message = await self.cvm.receive()
            if is_request(message):
                self.cvm._answer(message)
            elif message.get("op") == "streamed":
                return message

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the function writes it; StreamFailed when it breaks off."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.reader.data_fd, ready.set)
        try:
            while True:
                ready.clear()
                chunk = self.reader.read_ready(CHUNK)
                if chunk is None:
                    self._drain_wakeups()
                    chunk = self.reader.read_ready(CHUNK)
                if chunk is None:
                    if self._ended.done():  # the cVM died or ended without closing the stream
                        raise StreamFailed("the function's stream broke off")
                    try:
                        async with asyncio.timeout(self._remaining()):
                            await asyncio.wait([asyncio.ensure_future(ready.wait()), self._ended],
                                               return_when=asyncio.FIRST_COMPLETED)
                    except TimeoutError:
                        raise StreamFailed(f"function {self.cvm.spec.name!r} ran longer than its "
                                           f"{self.cvm.spec.limits.timeout:g} s timeout while streaming") from None
                    continue
                if not chunk:
                    return
                yield chunk
        finally:
            loop.remove_reader(self.reader.data_fd)

    def _drain_wakeups(self) -> None:
        try:
            os.eventfd_read(self.reader.data_fd)
        except BlockingIOError:
            pass

    async def finish(self) -> dict[str, Any] | None:
        """Wait for the runtime's word on how the stream ended; the error it reports, if any.
        The cVM is given back (idle) or stopped, and the ring freed."""
        try:
            async with asyncio.timeout(max(self._remaining(), 0.001)):
                message = await asyncio.shield(self._ended)
            self.error = message.get("error")
        except Exception as exc:  # timeout, crash, protocol violation
            self.error = {"type": type(exc).__name__, "message": str(exc) or "the stream did not end cleanly"}
            await self.intravisor.stop(self.cvm, "its output stream broke off")
        finally:
            self._release()
        return self.error

    async def abandon(self, reason: str) -> None:
        """The receiver went away: stop the cVM (its generator may run on) and free the ring."""
        await self.intravisor.stop(self.cvm, reason)
        self._ended.cancel()
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        cvm = self.cvm
        if cvm.state is not STOPPED:
            cvm.busy -= 1
            if not cvm.busy:
                cvm.state = IDLE
        self.intravisor.broker.end_invocation(cvm, self.top_level_id)
        self.intravisor.broker.area.free(self.obj)


async def collected(result: Any) -> Any:
    """``result`` with a streamed body read whole (for callers that need all of it at once)."""
    stream = result.stream
    if stream is None:
        return result
    parts = [chunk async for chunk in _guarded(stream)]
    error = await stream.finish()
    if error:
        return dataclasses.replace(result, status=500, body=str(error.get("message", "")).encode(), outcome="error",
                                   error=error, stream=None)
    return dataclasses.replace(result, body=b"".join(parts), stream=None)


async def _guarded(stream: OutputStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream.chunks():
            yield chunk
    except StreamFailed:
        return
