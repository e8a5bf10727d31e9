"""Streaming a chunked request body into a function through a CAP_Stream.

A request without a Content-Length may be of any size. Rather than hold all of it, the gateway
writes each chunk into a ring in shared memory as it arrives, and the function reads
``event.stream`` while the client is still sending; a full ring holds the gateway back, and so
the client (backpressure). Neither process ever holds the whole body.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web

from capfaas.core.ring import RingWriter

STREAM_CAPACITY = 4 << 20


class BodyTooLarge(Exception):
    """The streamed body passed the gateway's maximum."""


async def pump(request: web.Request, writer: RingWriter, prefix: bytes, limit: int) -> int:
    """Copy the request body into the ring until its end; returns the bytes sent. The stream ends
    (EOF for the function) only when the whole body arrived."""
    loop = asyncio.get_running_loop()
    room = asyncio.Event()

    def reader_made_room() -> None:
        try:
            os.eventfd_read(writer.space_fd)
        except BlockingIOError:
            pass
        room.set()

    async def put(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            room.clear()
            sent = writer.write_some(view)  # after clear(): a wakeup from now on is not lost
            view = view[sent:]
            if view and not sent:
                await room.wait()

    loop.add_reader(writer.space_fd, reader_made_room)
    try:
        total = len(prefix)
        await put(prefix)
        while chunk := await request.content.readany():
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
            await put(chunk)
        writer.close()  # end of stream
        return total
    except BrokenPipeError:  # the function stopped reading: the rest is not wanted
        return total
    finally:
        loop.remove_reader(writer.space_fd)


async def invoke_streaming(gateway: Any, cvm: Any, invocation: Any, request: web.Request, prefix: bytes) -> Any:
    """Run ``invocation`` with its body streamed from ``request``; returns the Result, or an HTTP
    error response when the body could not be delivered (too large, or the client went away)."""
    broker = gateway.intravisor.broker
    obj = broker.stream(cvm.spec.name, STREAM_CAPACITY)
    writer = broker.stream_end(obj, writer=True)
    invocation.stream = obj
    sending = asyncio.ensure_future(pump(request, writer, prefix, gateway.settings.max_body))
    problem: web.Response | None = None

    def body_failed(task: asyncio.Future[int]) -> None:
        nonlocal problem
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        problem = web.Response(status=413 if isinstance(exc, BodyTooLarge) else 400,
                               text=str(exc) if isinstance(exc, BodyTooLarge) else
                               "the client closed the connection before sending the whole body")
        asyncio.ensure_future(gateway.intravisor.stop(cvm, "its request body failed"))

    sending.add_done_callback(body_failed)
    try:
        result = await gateway.intravisor.invoke(cvm, invocation)
    finally:
        if not sending.done():
            sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        broker.area.free(obj)
    return problem if problem is not None else result
