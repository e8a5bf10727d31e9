"""Invocations answered straight off the socket; every other request is aiohttp's.

aiohttp's per-request machinery (request, response and header objects, routing, middleware)
costs more CPU than a no-op invocation itself. So each connection starts with an
``InvocationProtocol``: httptools parses its requests, and a plain, complete invocation
(``/function/{name}[/path]`` over HTTP/1.1, a body of at most ``INLINE_LIMIT`` bytes framed by
Content-Length, all of it already arrived) is answered with the same statuses and headers as the
aiohttp route: by callbacks on a warm instance (``WarmCall``), otherwise from a task through the
route's own code (``run_call``, ``answer``, ``relay_view``, ``relay_stream``).

Anything else (another route, HTTP/1.0, HEAD, a large or chunked body, ``Expect``, an upgrade, a
percent-encoded path or query, a head or body still on its way, malformed HTTP) hands the
connection over to aiohttp's ``RequestHandler`` with the bytes from the start of that request,
once the answers under way are sent. aiohttp serves the connection from then on, so routing,
limits, slow clients and error statuses stay aiohttp's.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from capfaas.core.runtime import INLINE_LIMIT

from .app import STATE, Answer, Gateway, answer, finished_call, relay_stream, relay_view, run_call
from .calls import HIDDEN_HEADERS, Call, header_text, new_call_id
from .warm import Outcome, WarmCall

log = logging.getLogger("capfaas.gateway")

MAX_HEAD = 8 << 10
MAX_HEADERS = 100
"""A request with a longer head, or more header lines, goes to aiohttp, which applies its limits."""
MAX_TARGETS = 4096
"""URLs whose function, path and query are kept parsed."""
MAX_PIPELINED = 16
"""Complete requests waiting for their turn on one connection before it stops reading."""
_METHODS = {method.encode(): method for method in ("GET", "POST", "PUT", "PATCH", "DELETE")}
_VERSION = b"HTTP/1.1\r\n"
"""What ends the request line of a request this protocol answers, read where it must be when the
line is written the usual way (one space each side of the URL); any other way goes to aiohttp.
Cheaper than asking the parser, which formats its version as text."""
_HANDED_OVER_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_PREFIX = b"/function/"
_LEFT_TO_AIOHTTP = re.compile(rb"[%;#]|/\.|//")
"""Marks in a URL whose decoding or normalising is aiohttp's."""
_HIDDEN = frozenset(name.encode() for name in HIDDEN_HEADERS)
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class _HandOver(Exception):
    """Raised inside the parser: this request is aiohttp's."""


class InvocationProtocol(asyncio.Protocol):
    """One client connection, until it hands itself over to aiohttp."""

    def __init__(self, front: FrontDoor) -> None:
        self._front = front
        self._gateway: Gateway = front.gateway
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._raw = b""
        self._start = 0
        """The last read, and where in it the request being parsed starts (what aiohttp gets of it
        on a hand-over): an offset, so that many requests in one read cost no copies."""
        self._in_message = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._head_size = 0
        self._length = 0
        self._target: tuple[str, str, dict[str, str]] = ("", "", {})
        self._method = ""
        self._seen: dict[str, str] = {}
        self._call_id = ""
        """The method, the headers a function sees, and X-Call-Id (text, as ``call_id_of`` makes
        it), of the request being parsed."""
        self._ready: deque[tuple[Call, bytes, bool]] = deque()
        self._under_way: WarmCall | asyncio.Task[None] | None = None
        """The answer being made: a ``WarmCall``, or a task where one is needed."""
        self._looping = False
        """Whether ``_answer_next`` is answering requests (one answered at once lets it go on)."""
        self._current: Call | None = None
        self._keep_alive = True
        """The request under way, and whether its connection stays open after its answer."""
        self._handover: bytes | None = None
        """Set when the connection is aiohttp's as soon as the answers under way are sent."""
        self._closing = False
        self._reading = True
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False
        self._last_active = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio.Transport's subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._last_active = self._loop.time()
        self._idle = self._loop.call_at(self._last_active + self._gateway.settings.keepalive_timeout, self._check_idle)
        self._front.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._under_way is not None:  # the client left mid-invocation: its instance is retired
            self._under_way.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("the client closed the connection"))
        self._forget()

    def _forget(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._front.forgot(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def _check_idle(self) -> None:
        """Close a connection idle for ``keepalive_timeout`` (a new one that never sent a request too)."""
        timeout = self._gateway.settings.keepalive_timeout
        now = self._loop.time()
        if self._under_way is None and now - self._last_active >= timeout:
            self._transport.close()
            return
        self._idle = self._loop.call_at(max(self._last_active, now) + timeout, self._check_idle)

    def close_when_idle(self) -> None:
        """Graceful shutdown: finish the answer under way, then close."""
        self._closing = True
        if self._under_way is None:
            self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- parsing (httptools' callbacks) --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._handover is not None:  # already aiohttp's, once the answers under way are sent
            self._handover += data
            return
        self._raw, self._start = data, 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:  # not an invocation this protocol serves, or not valid HTTP
            self._hand_over()
            return
        if self._in_message:  # a head or body still on its way: aiohttp waits for it, with its timeouts
            self._hand_over()
            return
        self._raw = b""
        if self._ready and self._under_way is None:
            self._answer_next()
        if len(self._ready) > MAX_PIPELINED and self._reading:
            self._reading = False
            self._transport.pause_reading()

    def on_message_begin(self) -> None:
        self._in_message = True
        raw, start = self._raw, self._start
        while start < len(raw) and raw[start] in b"\r\n":  # blank lines between requests: the parser skips them
            start += 1
        self._start = start
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        url = self._url
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        target = _targets.get(url) or _target(url)
        if (method is None or target is None
                or not self._raw.startswith(_VERSION, self._start + len(raw_method) + len(url) + 2)
                or parser.should_upgrade()):
            raise _HandOver
        end = self._raw.find(b"\r\n\r\n", self._start, self._start + MAX_HEAD) - self._start
        if end < 0 or end + 4 > MAX_HEAD or len(self._headers) > MAX_HEADERS:
            raise _HandOver
        length = 0
        seen: dict[str, str] = {}
        call_id = ""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if not value.isdigit():
                    raise _HandOver
                length = int(value)
            elif lowered in _HANDED_OVER_HEADERS:
                raise _HandOver
            elif lowered in _HIDDEN:
                continue
            text = _text_of(value.rstrip(b" \t"))  # the parser strips the leading whitespace
            if lowered == b"x-call-id" and not call_id:
                call_id = text
            seen[name.decode("latin-1")] = text
        if length > INLINE_LIMIT or length > self._gateway.settings.max_body:
            raise _HandOver
        self._head_size = end + 4
        self._length = length
        self._target = target
        self._method = method
        self._seen = seen
        self._call_id = call_id

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._start += self._head_size + self._length
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._ready.append((self._call(), body, self._parser.should_keep_alive()))

    def _hand_over(self) -> None:
        self._handover, self._raw = self._raw[self._start:], b""
        if self._under_way is None and not self._ready:
            self._give_to_aiohttp()
            return
        if self._reading:
            self._reading = False
            self._transport.pause_reading()
        if self._under_way is None:  # requests before this one came in the same read: answered first
            self._answer_next()

    def _give_to_aiohttp(self) -> None:
        data, self._handover = self._handover, None
        transport = self._transport
        self._forget()
        handler = self._front.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:  # the transport tells only the protocol it had when writing paused
            handler.pause_writing()
        if not self._reading:
            transport.resume_reading()
        if data:
            handler.data_received(data)

    # -- answering -------------------------------------------------------------------------------

    def _answer_next(self) -> None:
        """Answer the complete requests in order, each at once or from a callback."""
        self._looping = True
        try:
            while self._ready and self._under_way is None and not self._transport.is_closing():
                call, body, keep_alive = self._ready.popleft()
                self._keep_alive = keep_alive and not self._closing
                self._current = call
                warm = self._under_way = WarmCall(self._gateway, call, body, self._outcome)
                warm.begin()
        except Exception:  # a bug of the gateway's: logged, and the connection dropped
            log.exception("error answering an invocation")
            self._transport.abort()
            return
        finally:
            self._looping = False
        if self._under_way is None and not self._transport.is_closing():
            self._caught_up()

    def _caught_up(self) -> None:
        """Every complete request is answered: hand over, close or read on, as is due."""
        self._last_active = self._loop.time()
        if self._closing:  # shutting down: a request left for aiohttp is not taken up any more
            self._transport.close()
        elif self._handover is not None:
            self._give_to_aiohttp()
        elif not self._reading:
            self._reading = True
            self._transport.resume_reading()

    def _outcome(self, outcome: Outcome) -> None:
        """Write the response to the invocation under way: at once when its body is the gateway's
        bytes, from a task when it is relayed from the cVM (or when ``run_call`` must make it)."""
        if outcome is None:
            warm = self._under_way
            assert type(warm) is WarmCall
            self._under_way = self._loop.create_task(self._run_call(warm.call, warm.body))
            return
        if type(outcome) is not tuple:  # the call ended early: 404, 429, 502 and the like
            try:
                self._send(outcome, self._keep_alive)
            except Exception:
                self._failed()
                return
            self._answered()
            return
        deployed, result, cold, cvm = outcome
        call = self._current
        try:
            reply = answer(self._gateway, deployed, call, result, cold)
            if reply.streamed or (type(reply.body) is not bytes and reply.status not in (204, 304)):
                relay = self._relay(reply, call, result, deployed, cvm)
            else:
                relay = None
                length = self._send_bytes(reply.status, reply.headers, reply.body, self._keep_alive,
                                          reply.invocation_lines())
        except Exception:
            self._failed()
            finished_call(deployed.pool.release, cvm, self._gateway.metrics.meter(call.name), result.duration,
                          None, None)
            return
        if relay is not None:
            self._under_way = self._loop.create_task(relay)
            return
        finished_call(deployed.pool.release, cvm, self._gateway.metrics.meter(call.name), result.duration,
                      reply.status, length)
        self._answered()

    def _answered(self) -> None:
        """The answer under way is written: go on to the next request, unless that must wait."""
        self._under_way = None
        if not self._keep_alive:
            self._transport.close()
        elif self._write_paused:  # a client that does not read its answers is sent no more until it does
            self._under_way = self._loop.create_task(self._until_writable())
        elif self._looping:
            return
        elif self._ready:
            self._answer_next()
        elif not self._transport.is_closing():
            self._caught_up()

    def _failed(self) -> None:
        """A bug of the gateway's: logged, and the connection dropped."""
        log.exception("error answering an invocation")
        self._transport.abort()

    async def _until_writable(self) -> None:
        try:
            async with asyncio.timeout(self._gateway.settings.body_timeout):
                await self._drained()
        except TimeoutError:
            self._transport.abort()
            return
        self._under_way = None
        self._answer_next()

    async def _run_call(self, call: Call, body: bytes) -> None:
        """An invocation ``WarmCall`` leaves to ``run_call``: an instance must be started first."""
        try:
            outcome = await run_call(self._gateway, call, body, True, None)
        except Exception:
            self._failed()
            return
        self._outcome(outcome)

    async def _relay(self, reply: Answer, call: Call, result: Any, deployed: Any, cvm: Any) -> None:
        """Write an answer whose body is in the cVM's memory or streamed from it."""
        transport = self._transport
        status = length = None
        try:
            if reply.streamed:
                transport.write(self._response_head(reply.status, reply.headers, None, self._keep_alive,
                                                    reply.invocation_lines()))
                if await relay_stream(self._gateway, call, result.stream, self._write_chunk):
                    transport.write(b"0\r\n\r\n")
                else:
                    transport.abort()
            else:
                body = reply.body  # a view of the cVM's memory
                transport.write(self._response_head(reply.status, reply.headers, len(body), self._keep_alive,
                                                    reply.invocation_lines()))
                if not await relay_view(self._gateway, body, self._write):
                    transport.abort()
                length = len(body)
            status = reply.status
        except Exception:
            self._failed()
            return
        finally:
            finished_call(deployed.pool.release, cvm, self._gateway.metrics.meter(call.name), result.duration,
                          status, length)
        self._answered()

    def _call(self) -> Call:
        """The invocation the request just parsed asks for."""
        name, path, query = self._target
        return Call(name, self._call_id or new_call_id(), self._method, path, query, self._seen, time.time_ns())

    def _send_bytes(self, status: int, headers: dict[str, str], body: Any, keep_alive: bool, more: str = "") -> int:
        if status in (204, 304):  # no body may follow these (whatever the function returned)
            self._transport.write(self._response_head(status, headers, 0, keep_alive, more))
            return 0
        self._transport.write(self._response_head(status, headers, len(body), keep_alive, more) + body)
        return len(body)

    def _send(self, response: web.Response, keep_alive: bool) -> None:
        body = response.body
        assert isinstance(body, bytes)
        self._send_bytes(response.status, dict(response.headers), body, keep_alive)

    async def _write(self, data: Any) -> None:
        self._transport.write(data)
        if self._write_paused:
            await self._drained()

    async def _drained(self) -> None:
        """Until the transport's buffer is below its high-water mark again."""
        self._writable = self._loop.create_future()
        await self._writable

    async def _write_chunk(self, chunk: bytes) -> None:
        if chunk:  # an empty chunk would end the body
            await self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))

    def _response_head(self, status: int, headers: dict[str, str], length: int | None, keep_alive: bool,
                       more: str = "") -> bytes:
        """The head of a response with ``headers``, then ``more`` (header lines already made)."""
        lines = ""
        for item in headers.items():
            line = _header_lines.get(item)
            if line is None:
                line = f"{item[0]}: {item[1]}\r\n"
                if len(_header_lines) < 4096 and len(line) <= 256:  # bounded: values may differ every time
                    _header_lines[item] = line
            lines += line
        if length and "Content-Type" not in headers and not any(key.lower() == "content-type" for key in headers):
            lines += "Content-Type: application/octet-stream\r\n"
        if length is None:
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = "" if status in (204, 304) else f"Content-Length: {length}\r\n"
        end = "\r\n" if keep_alive else "Connection: close\r\n\r\n"
        global _date_second, _date_and_server
        now = int(time.time())
        if now != _date_second:  # the Date and Server lines, made once a second
            _date_second = now
            _date_and_server = f"Date: {formatdate(now, usegmt=True)}\r\nServer: {SERVER_SOFTWARE}\r\n"
        return f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n{lines}{more}{framing}{_date_and_server}{end}".encode()


_header_lines: dict[tuple[str, str], str] = {}
"""Response header lines already made, by (name, value): functions send the same few again and again."""
_date_second = 0
_date_and_server = ""


def _target(url: bytes) -> tuple[str, str, dict[str, str]] | None:
    """The function, path and query a URL asks for, or None when the URL is aiohttp's; kept for
    the next request to it (most requests repeat a few URLs)."""
    if not url.startswith(_PREFIX) or _LEFT_TO_AIOHTTP.search(url) or not url.isascii():
        return None
    target, _, query_text = url[len(_PREFIX):].decode("ascii").partition("?")
    name, _, path = target.partition("/")
    query: dict[str, str] = {}
    if query_text:
        for part in query_text.split("&"):
            if part:
                key, _, value = part.replace("+", " ").partition("=")
                query.setdefault(key, value)
    parsed = (name, "/" + path, query)
    if len(_targets) < MAX_TARGETS and len(url) <= 256:  # bounded: a client may send endless new URLs
        _targets[url] = parsed
    return parsed


_targets: dict[bytes, tuple[str, str, dict[str, str]]] = {}
"""What each URL seen asks for: its query dict is shared by every request to it, and only read."""


def _text_of(value: bytes) -> str:
    """A header value as text, as aiohttp and ``header_text`` make it: UTF-8, else Latin-1."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return header_text(value.decode("latin-1"))


class FrontDoor:
    """What a site serves each new connection with: an ``InvocationProtocol``, in front of
    aiohttp's ``Server``, which takes over the connections handed to it (and everything else)."""

    def __init__(self, server: web.Server, gateway: Gateway) -> None:
        self._server = server
        self.gateway = gateway
        self._open: set[InvocationProtocol] = set()

    def __call__(self) -> InvocationProtocol:
        return InvocationProtocol(self)

    def __getattr__(self, name: str) -> Any:  # the rest of aiohttp's Server, for its runner
        return getattr(self._server, name)

    def aiohttp_handler(self) -> asyncio.Protocol:
        return self._server()

    def opened(self, protocol: InvocationProtocol) -> None:
        self._open.add(protocol)

    def forgot(self, protocol: InvocationProtocol) -> None:
        self._open.discard(protocol)

    def pre_shutdown(self) -> None:
        for protocol in list(self._open):
            protocol.close_when_idle()
        self._server.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Wait for the answers under way (as aiohttp does for its connections), then close."""
        async def ours() -> None:
            waiting = [protocol.closed for protocol in self._open]
            if waiting:
                await asyncio.wait(waiting, timeout=timeout)
            for protocol in list(self._open):
                protocol.abort()
        await asyncio.gather(ours(), self._server.shutdown(timeout))


class GatewayRunner(web.AppRunner):
    """aiohttp's AppRunner, whose sites answer invocations with ``InvocationProtocol``."""

    async def _make_server(self) -> Any:
        return FrontDoor(await super()._make_server(), self.app[STATE])
