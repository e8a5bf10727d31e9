"""Asynchronous invocations: 202 at once, the work later, the result POSTed to a callback.

The queue is bounded (429 beyond it); callbacks are retried with exponential backoff and carry
OpenFaaS's headers (X-Call-Id, X-Duration-Seconds, X-Function-Status, X-Function-Name).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .calls import Call, call_of

log = logging.getLogger("capfaas.async")
CALLBACK_ATTEMPTS = 4
CALLBACK_TIMEOUT = 10.0


@dataclass
class Queued:
    call: Call
    body: bytes
    callback: URL | None


class AsyncCalls:
    """The queue and the workers that drain it."""

    def __init__(self, invoke: Any, size: int, workers: int, backoff: float = 0.5,
                 max_body: int = 256 << 20, max_bytes: int = 1 << 30) -> None:
        self.invoke = invoke
        self.max_body = max_body
        self.max_bytes = max_bytes
        """Bytes of bodies the queue may hold at once: it is bounded in memory, not only in calls."""
        self.queued_bytes = 0
        """``await invoke(queued) -> (status, headers, body, duration)``."""
        self.queue: asyncio.Queue[Queued] = asyncio.Queue(maxsize=size)
        self.backoff = backoff
        self.workers = [asyncio.ensure_future(self._work()) for _ in range(workers)]
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT))

    async def accept(self, request: web.Request) -> web.Response:
        call = call_of(request)
        callback = request.headers.get("X-Callback-Url")
        url = None
        if callback:
            url = URL(callback)
            if url.scheme not in ("http", "https") or not url.host:
                return web.Response(status=400, text=f"X-Callback-Url must be an http(s) URL, got {callback!r}\n")
        if request.content_length is not None and request.content_length > self.max_body:
            return web.Response(status=413, text=f"request body larger than {self.max_body} bytes\n")
        if self.queued_bytes + (request.content_length or 0) > self.max_bytes:
            return self._full("bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():  # not request.read(): client_max_size is for deploys
            size += len(chunk)
            if size > self.max_body:
                return web.Response(status=413, text=f"request body larger than {self.max_body} bytes\n")
            chunks.append(chunk)
        queued = Queued(call, b"".join(chunks), url)
        if self.queued_bytes + len(queued.body) > self.max_bytes:
            return self._full("bytes")
        try:
            self.queue.put_nowait(queued)
        except asyncio.QueueFull:
            return self._full("calls")
        self.queued_bytes += len(queued.body)
        return web.Response(status=202, headers={"X-Call-Id": call.call_id, "X-Served-By": "capfaas"})

    def _full(self, what: str) -> web.Response:
        limit = f"{self.max_bytes} bytes of bodies" if what == "bytes" else f"{self.queue.maxsize} calls"
        return web.Response(status=429, text=f"the asynchronous queue is full (it holds at most {limit})\n",
                            headers={"Retry-After": "1"})

    async def _work(self) -> None:
        while True:
            queued = await self.queue.get()
            try:
                status, headers, body, duration = await self.invoke(queued)
                if queued.callback is not None:
                    await self._deliver(queued, status, headers, body, duration)
            except Exception:  # one failed call must not stop the worker
                log.exception("asynchronous call %s to %s failed", queued.call.call_id, queued.call.name)
            finally:
                self.queued_bytes -= len(queued.body)
                self.queue.task_done()

    async def _deliver(self, queued: Queued, status: int, headers: dict[str, str], body: bytes, duration: float) -> None:
        assert queued.callback is not None
        out = {"X-Call-Id": queued.call.call_id, "X-Duration-Seconds": f"{duration:.6f}",
               "X-Function-Status": str(status), "X-Function-Name": queued.call.name}
        if "Content-Type" in headers:
            out["Content-Type"] = headers["Content-Type"]
        delay = self.backoff
        for attempt in range(1, CALLBACK_ATTEMPTS + 1):
            try:
                async with self.session.post(queued.callback, data=body, headers=out) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if attempt < CALLBACK_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        log.warning("gave up delivering call %s to %s after %d attempts", queued.call.call_id, queued.callback,
                    CALLBACK_ATTEMPTS)

    async def close(self, drain_timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.queue.join(), drain_timeout)
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        await self.session.close()
