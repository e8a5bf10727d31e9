"""The runtime inside a cVM: confine the process, load the function, serve invocations.

It speaks to the intravisor over one control socket (``wire`` messages) and touches shared memory
only through its own region and the capabilities it was handed. The same code runs on every
backend: forked from the emulated backend's template, or under Intravisor on Morello.
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import resource
import select
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import wire
from .capability import Capability, representable_alignment_mask
from .capfiles import Files, install_open
from .grants import Grant, Grants, ring
from .perms import Perm
from .handlers import (CallResult, Context, Event, FunctionCallError, HandlerResultError, Response, SharedBuffer,
                       StreamCall, StreamedEvent, adapt, streamed_response)
from .ring import RingReader, RingWriter
from .spec import FunctionSpec
from .spin import spin_until_readable

INLINE_LIMIT = 64 << 10
"""Bodies up to this size travel inside the control message; larger ones as capabilities."""
RECEIVE_SIZE = 64 << 10
"""Bytes asked of the control socket per read. ``recv`` allocates what it is asked for: a megabyte
would be mapped and unmapped by malloc on every message (microseconds each); larger messages
simply take several reads."""
_PLAIN_RESULTS = frozenset((type(None), str, bytes))
"""Results that can be neither awaited nor streamed: the usual ones skip both checks."""
CALL_INLINE_MAX = 4 << 20
"""The largest call argument a concurrent cVM may send inside a control message."""
QUICK_GAP = 50e-6
"""When the intravisor's last message came within this many seconds of this cVM's previous one,
the runtime busy-waits up to as long for the next before it blocks: messages that come back to
back (a caller invoking in a loop, a chain of calls) then find the cVM running rather than asleep,
and waking it would cost more than the wait. A cVM whose messages come slower never spins."""
USAGE_AFTER = 0.001
USAGE_EVERY = 16
"""Resident memory and CPU time go with the reply (for the pool's recycling) after an invocation
that ran USAGE_AFTER seconds or more, and after every USAGE_EVERY-th one: a quicker one cannot
have grown much, and skips the system call."""


@dataclass
class Region:
    """This cVM's memory: its window of the segment and the capabilities the intravisor gave it."""

    memory: Any
    ddc: Capability
    heap_start: int

    def __post_init__(self) -> None:
        self.heap_next = self.heap_start

    def reset(self) -> None:
        self.heap_next = self.heap_start

    def share(self, data: Any) -> tuple[Capability, int]:
        """Copy ``data`` once into this region's heap; return a read-only capability and the length."""
        view = memoryview(data).cast("B")
        length = len(view)
        mask = representable_alignment_mask(length)
        address = (self.heap_next + ~mask) & mask & ((1 << 64) - 1)
        if address + length > self.ddc.top:
            raise MemoryError(f"{length} bytes do not fit in this cVM's region "
                              f"({self.ddc.top - address} bytes left)")
        self.memory.store(self.ddc, address, view)
        self.heap_next = address + length
        cap = self.ddc.set_address(address).set_bounds(length).and_permissions(Perm.LOAD | Perm.GLOBAL)
        return cap, length


def error_report(kind: str, exc: BaseException, spec: FunctionSpec) -> dict[str, Any]:
    """An error report that says what and where (file and line inside the bundle)."""
    where = None
    if isinstance(exc, SyntaxError) and exc.filename:
        where = (exc.filename, exc.lineno)
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(spec.bundle))]
        if frames:
            where = (frames[-1].filename, frames[-1].lineno)
    error: dict[str, Any] = {"stage": kind, "type": type(exc).__name__, "message": str(exc)}
    if where:
        error["file"] = os.path.relpath(where[0], spec.bundle)
        error["line"] = where[1]
    return error


def load_function(spec: FunctionSpec) -> tuple[Any, Any]:
    """Import the function's module from its bundle; return it and its handler."""
    path = spec.bundle / spec.module
    sys.path.insert(0, str(spec.bundle))
    module_spec = importlib.util.spec_from_file_location(spec.module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {spec.module}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[spec.module_name] = module
    module_spec.loader.exec_module(module)
    handler = getattr(module, spec.handler, None)
    if not callable(handler):
        raise AttributeError(f"{spec.module} defines no callable {spec.handler!r}")
    return module, handler


def load_handler(spec: FunctionSpec) -> Any:
    """Import the function and run its optional ``init()``; return its handler."""
    module, handler = load_function(spec)
    init = getattr(module, "init", None)
    if callable(init):
        init()
    return handler


def _packed(pack: Callable[[dict[str, Any]], bytes], reply: dict[str, Any]) -> bytes:
    """The reply on the wire, or an error reply when the function's result cannot be sent."""
    try:
        return pack(reply)
    except (TypeError, ValueError, OverflowError) as exc:
        return pack({"op": "result", "id": reply.get("id"), "status": 500,
                     "error": {"stage": "result", "type": type(exc).__name__,
                               "message": f"the result cannot be sent: {exc}"}})


def _chunk(chunk: Any) -> Any:
    """A yielded chunk as bytes-like: text is sent as UTF-8."""
    return chunk.encode() if isinstance(chunk, str) else chunk


def _whole(streamed: Response, body: bytes) -> dict[str, Any]:
    """A streamed response as an ordinary one, its chunks joined."""
    return {"statusCode": streamed.status, "headers": streamed.headers, "body": body}


def _label(function: str | Capability) -> str:
    """How errors name a call target."""
    return function if isinstance(function, str) else "a function by entry capability"


def _flush(*streams: Any) -> None:
    for stream in streams:
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # replaced or closed by the function
            pass


class Runtime:
    """Serves one cVM's control channel until told to stop or the intravisor goes away."""

    def __init__(self, sock: socket.socket, spec: FunctionSpec, region: Region, grants: Grants | None = None) -> None:
        self.sock = sock
        self.spec = spec
        self.region = region
        self.grants = grants
        """Shared objects granted to this cVM; None where the backend cannot pass them (copies instead)."""
        self.files = Files(self.request, lambda announced: self._accept(announced, transient=False),
                           lambda grant: self.grants.release(grant) if self.grants is not None else None)
        self._entries: dict[str, Capability] = {}
        """Entry capabilities of the functions this cVM called, by name."""
        self._streams: list[RingReader] = []
        """CAP_Streams of the running invocation, closed when it ends."""
        self._lengths: dict[Capability, int] = {}
        """The exact length of each payload capability the running invocations were handed or made.
        Bounds round a large length up to what they can represent; passing such a capability on
        sends these bytes, not the rounding."""
        self.unpacker = wire.unpacker(max_buffer_size=1 << 31)  # the intravisor is trusted
        self.pack = wire.packer()
        """The runtime's encoder. Messages go out from one thread (the handler's, or this cVM's loop)."""
        self._readable: select.poll | None = None
        if isinstance(sock, socket.socket):  # a channel object of a backend's own is not polled
            self._readable = select.poll()
            self._readable.register(sock.fileno(), select.POLLIN)
        self._sent_at = 0.0
        self._quick = False
        """Whether the last message came within QUICK_GAP of what this cVM sent before it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unreported = 0
        """Invocations since resident memory and CPU time were last reported."""
        self._next_call = 0
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._sending: asyncio.Lock | None = None
        self.logger = logging.getLogger(spec.name)
        self.logger.propagate = False
        if not self.logger.handlers:  # a clone inherits its template's logger, handler included
            handler = logging.StreamHandler(sys.stderr)  # the console: the intravisor reads it
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            self.logger.addHandler(handler)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """Made on the first ``async def`` call: a cold start of a plain handler never pays for it."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def send(self, message: dict[str, Any]) -> None:
        self._sendall(self.pack(message))

    def _sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        self._sent_at = time.perf_counter()

    def receive(self) -> dict[str, Any] | None:
        unpacker = self.unpacker
        while True:
            for message in unpacker:
                return message
            if self._quick and self._readable is not None:  # see QUICK_GAP
                spin_until_readable(self._readable, self._sent_at + QUICK_GAP)
            data = self.sock.recv(RECEIVE_SIZE)
            self._quick = time.perf_counter() - self._sent_at < QUICK_GAP
            if not data:
                return None
            unpacker.feed(data)

    def start(self, handler_loader: Any) -> Any:
        """Load the function; report ``ready`` or, with file and line, why it cannot run."""
        try:
            handler = handler_loader(self.spec)
            if self.spec.limits.concurrency > 1 and not inspect.iscoroutinefunction(handler):
                raise TypeError(f"concurrency {self.spec.limits.concurrency} needs an async def handler; "
                                f"{self.spec.handler!r} is a plain function")
        except BaseException as exc:  # import-time failures of user code, SystemExit included
            self.send({"op": "failed", "error": error_report("import", exc, self.spec)})
            return None
        self.call, self.convert = adapt(handler, self.spec.signature)
        install_open(lambda: self.files)
        self.send({"op": "ready", "pid": os.getpid()})
        return handler

    def serve(self) -> None:
        if self.spec.limits.concurrency > 1:
            self.loop.run_until_complete(self._serve_concurrently())
            return
        while True:
            message = self.receive()
            if message is None or message.get("op") == "stop":
                return
            if message.get("op") == "invoke":
                self._sendall(_packed(self.pack, self.invoke(message)))
                for stream in self._streams:
                    stream.close()  # the writer sees the reader gone if it is still sending
                self._streams.clear()
                if self.grants is not None:
                    self.grants.drop_transient()  # the payloads granted for it, once nothing views them

    async def _serve_concurrently(self) -> None:
        """Several invocations at once, each a task on this cVM's loop; replies go out by id."""
        loop = self.loop
        self.sock.setblocking(False)
        self._sending = asyncio.Lock()  # one message at a time on the socket, never interleaved
        running: set[asyncio.Task[None]] = set()

        async def run(message: dict[str, Any]) -> None:
            reply = await self.invoke_async(message)
            async with self._sending:
                await loop.sock_sendall(self.sock, _packed(self.pack, reply))
            if len(running) == 1:  # the last one running: no payload of theirs is still held
                self._lengths.clear()

        while data := await loop.sock_recv(self.sock, RECEIVE_SIZE):
            self.unpacker.feed(data)
            for message in self.unpacker:
                if message.get("op") == "stop":
                    return
                if message.get("op") == "invoke":
                    task = loop.create_task(run(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
                elif message.get("op") == "called" and message.get("call") in self._calls:
                    self._calls[message["call"]].set_result(message)

    def rehearse(self, rounds: int = 32) -> None:
        """Run the invocation path on a no-op handler, replies discarded.

        In a template this is done once before cloning: the interpreter specialises (quickens)
        the bytecode of everything an invocation runs, and those writes then live in pages every
        clone shares instead of being copied into each clone on its first request.
        """
        self.call, self.convert = adapt(lambda event, context: b"", "native")
        message = {"op": "invoke", "id": "rehearsal", "method": "POST", "path": "/", "query": {},
                   "headers": {}, "body": b"", "length": None, "deadline": 0.0}
        for _ in range(rounds):
            unpacker = wire.unpacker()
            unpacker.feed(self.pack(message))
            self.pack(self.invoke(next(unpacker)))

    def _accept(self, announced: dict[str, Any], *, transient: bool) -> Grant:
        if self.grants is None:
            raise ConnectionError("the intravisor announced a grant this cVM cannot receive")
        return self.grants.accept(announced, transient=transient)

    def view(self, cap: Capability, length: int, announced: dict[str, Any] | None = None) -> memoryview:
        """The bytes a capability handed to this cVM reaches: in a grant (mapped now if it was just
        announced) or in this cVM's own region."""
        if announced is not None:
            return self._accept(announced, transient=True).view(cap, cap.address, length)
        grant = self.grants.find(cap, length) if self.grants is not None else None
        if grant is not None:
            return grant.view(cap, cap.address, length)
        return self.region.memory.view(cap, cap.address, length)

    def share(self, data: Any) -> Capability:
        """``data`` copied once into shared memory; a read-only capability to it. Into a fresh shared
        object where this cVM can receive grants, so a function it calls maps it without a copy."""
        if self.grants is None or self.spec.limits.concurrency > 1:
            return self._remember(*self.region.share(data))
        view = memoryview(data).cast("B")
        buffer = self.buffer(len(view))
        buffer.view[:] = view
        return self._remember(buffer.capability.and_permissions(Perm.LOAD | Perm.GLOBAL), len(view))

    def _remember(self, cap: Capability, length: int) -> Capability:
        self._lengths[cap] = length
        return cap

    def _sized(self, body: Capability | SharedBuffer) -> tuple[Capability, int]:
        """A payload as a read-only capability and its length: the exact one when this cVM made or
        was handed it, else (capability-aware code's own bounds) the bytes from address to top."""
        if isinstance(body, SharedBuffer):
            return body.capability.and_permissions(Perm.LOAD | Perm.GLOBAL), len(body.view)
        length = self._lengths.get(body)
        return body, (min(max(body.top - body.address, 0), (1 << 64) - 1) if length is None else length)

    def buffer(self, size: int) -> SharedBuffer:
        """A writable shared buffer of ``size`` bytes for this invocation, filled in place."""
        if self.grants is None or self.spec.limits.concurrency > 1:
            raise RuntimeError("shared buffers need a backend that passes grants, and concurrency 1")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"a buffer's size must be a positive number of bytes, got {size!r}")
        reply = self.request({"op": "buffer", "size": size})
        if reply.get("error"):
            raise MemoryError(str(reply["error"].get("message")))
        grant = self._accept(reply["grant"], transient=True)
        return SharedBuffer(grant.capability, grant.view(grant.capability, grant.capability.base, size, writable=True))

    def _event(self, message: dict[str, Any]) -> Event:
        if message.get("stream") is not None:  # a chunked request: its body arrives as it is sent
            grant = self._accept(message["stream"], transient=True)
            reader = RingReader(ring(grant), *grant.events, timeout=max(0.0, message.get("deadline", 0.0) - time.time()))
            self._streams.append(reader)
            return StreamedEvent(message.get("method", "GET"), message.get("path", "/"), message.get("query") or {},
                                 message.get("headers") or {}, None, None, reader)
        body = message.get("body", b"")
        capability = None
        if isinstance(body, Capability):
            capability = self._remember(body, message["length"])
            body = self.view(body, message["length"], message.get("grant"))
        return Event(message.get("method", "GET"), message.get("path", "/"), message.get("query") or {},
                     message.get("headers") or {}, body, capability)

    def _begin(self, message: dict[str, Any]) -> tuple[Event, Context, dict[str, Any]]:
        call_id = message.get("id", "")
        context = Context(self.spec.name, call_id, message.get("deadline", 0.0), self.logger, self.share, self,
                          self.files, tuple(message.get("chain") or ()))
        reply = {"op": "result", "id": call_id}
        if "seq" in message:  # one of several at once: the intravisor matches the reply by it
            reply["seq"] = message["seq"]
        return self._event(message), context, reply

    # -- calls to other functions (CAP_Calls) ----------------------------------------------------

    def entry(self, function: str | Capability) -> Capability:
        """The sealed entry capability that calls ``function`` (asked for once, then kept)."""
        if isinstance(function, Capability):
            return function
        entry = self._entries.get(function)
        if entry is None:
            entry = self._entries[function] = self._entry_from(function, self.request({"op": "entry", "function": function}))
        return entry

    async def aentry(self, function: str | Capability) -> Capability:
        if isinstance(function, Capability) or function in self._entries:
            return self.entry(function)
        reply = await self._arequest({"op": "entry", "function": function})
        entry = self._entries[function] = self._entry_from(function, reply)
        return entry

    @staticmethod
    def _entry_from(function: str, reply: dict[str, Any]) -> Capability:
        error = reply.get("error")
        if error or not isinstance(reply.get("entry"), Capability):
            error = error or {}
            raise FunctionCallError(function, str(error.get("type", "BadCall")), str(error.get("message", "no entry")),
                                    int(reply.get("status", 400)))
        return reply["entry"]

    def _call_message(self, context: Context, target: Capability, data: Any, headers: dict[str, str]) -> dict[str, Any]:
        self._next_call += 1
        message: dict[str, Any] = {"op": "call", "call": f"{context.invocation_id}/{self._next_call}",
                                   "target": target, "headers": dict(headers), "deadline": context.deadline,
                                   "chain": [*context.chain, self.spec.name]}
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (Capability, SharedBuffer)) and len(data) > INLINE_LIMIT:
            if self.spec.limits.concurrency > 1:  # no heap to spare: it must fit a control message
                if len(data) > CALL_INLINE_MAX:
                    raise ValueError(f"call data above {CALL_INLINE_MAX} bytes needs a capability from "
                                     "context.share, or concurrency 1")
            else:
                data = self.share(data)  # into shared memory once; the callee maps it there
        if isinstance(data, (Capability, SharedBuffer)):
            data, length = self._sized(data)
            message.update(body=data, length=length)
        else:
            message["body"] = bytes(data)
        return message

    def _call_result(self, function: str, reply: dict[str, Any]) -> CallResult:
        error = reply.get("error")
        if error:
            raise FunctionCallError(function, str(error.get("type", "Error")), str(error.get("message", "")),
                                    int(reply.get("status", 500)))
        body = reply.get("body", b"")
        capability = None
        if isinstance(body, Capability):
            length = int(reply.get("length", 0))
            capability = self._remember(body, length)
            body = self.view(body, length, reply.get("grant"))
        return CallResult(int(reply.get("status", 200)), dict(reply.get("headers") or {}), body, capability)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Ask the intravisor something mid-invocation (a call, a buffer, a CAP_File) and wait for
        its answer: this cVM serves one invocation at a time, so nothing else waits."""
        if self.spec.limits.concurrency > 1:
            raise RuntimeError("a handler serving invocations concurrently must use await context.acall(...); "
                               "shared buffers and CAP_Files need concurrency 1")
        if "call" not in message:
            self._next_call += 1
            message = {**message, "call": f"request/{self._next_call}"}
        self.send(message)
        return self._reply_to(message["call"])

    def _reply_to(self, call_id: str) -> dict[str, Any]:
        while True:
            reply = self.receive()
            if reply is None or reply.get("op") == "stop":
                raise SystemExit(0)  # the intravisor went away or stopped us mid-call
            if reply.get("op") == "called" and reply.get("call") == call_id:
                return reply

    def call_function(self, context: Context, function: str | Capability, data: Any,
                      headers: dict[str, str]) -> CallResult:
        message = self._call_message(context, self.entry(function), data, headers)
        return self._call_result(_label(function), self.request(message))

    def stream_call(self, context: Context, function: str | Capability, headers: dict[str, str]) -> StreamCall:
        """Call ``function`` with a CAP_Stream as its body: it runs, reading ``event.stream``, while
        this function writes to the returned stream; closing it ends the body and gives the result."""
        target = self.entry(function)
        granted = self.request({"op": "stream", "to": _label(function)})
        if granted.get("error"):
            raise RuntimeError(f"cannot open a stream to {_label(function)!r}: {granted['error'].get('message')}")
        grant = self._accept(granted["grant"], transient=True)
        writer = RingWriter(ring(grant), *grant.events, timeout=max(context.remaining_time(), 0.001))
        message = self._call_message(context, target, b"", headers)
        message["stream"] = grant.id
        self.send(message)  # the callee starts now; its answer is read when the stream is closed
        name = _label(function)
        return StreamCall(name, writer, lambda: self._call_result(name, self._reply_to(message["call"])))

    async def acall_function(self, context: Context, function: str | Capability, data: Any,
                             headers: dict[str, str]) -> CallResult:
        if self.spec.limits.concurrency == 1:
            return self.call_function(context, function, data, headers)
        message = self._call_message(context, await self.aentry(function), data, headers)
        return self._call_result(_label(function), await self._arequest(message))

    async def _arequest(self, message: dict[str, Any]) -> dict[str, Any]:
        """``request`` for a cVM serving invocations concurrently: the answer comes by id."""
        if "call" not in message:
            self._next_call += 1
            message = {**message, "call": f"request/{self._next_call}"}
        answer = self.loop.create_future()
        self._calls[message["call"]] = answer
        try:
            async with self._sending:
                await self.loop.sock_sendall(self.sock, self.pack(message))
            return await answer
        finally:
            self._calls.pop(message["call"], None)

    def _complete(self, reply: dict[str, Any], value: Any, *, inline: bool, called: bool = False) -> dict[str, Any]:
        response = self.convert(value, Capability)
        reply["status"] = response.status
        if response.headers:
            reply["headers"] = response.headers
        body = response.body
        if type(body) is bytes and len(body) <= INLINE_LIMIT:  # the usual result: as it is, or nothing
            if body:
                reply["body"] = body
        else:
            reply.update(self._body(body, inline=inline, called=called))
        return reply

    def _finish(self, reply: dict[str, Any], exc: BaseException | None, started: float = 0.0) -> dict[str, Any]:
        """The reply, with the handler's failure if it raised. ``started`` (``perf_counter``) says
        whether the invocation was quick enough to skip measuring memory; 0 always measures."""
        if exc is not None:  # the handler's failure is the invocation's result
            if isinstance(exc, KeyboardInterrupt):
                raise exc
            traceback.print_exception(exc)
            stage = "result" if isinstance(exc, HandlerResultError) else "handler"
            reply.update(status=500, error=error_report(stage, exc, self.spec))
        _flush(sys.stdout, sys.stderr)  # all of this invocation's output is in the pipes before the reply
        self._unreported += 1
        if self._unreported >= USAGE_EVERY or time.perf_counter() - started >= USAGE_AFTER:
            self._unreported = 0
            usage = resource.getrusage(resource.RUSAGE_SELF)
            reply["rss"] = usage.ru_maxrss * 1024
            reply["cpu"] = usage.ru_utime + usage.ru_stime
        return reply

    def invoke(self, message: dict[str, Any]) -> dict[str, Any]:
        """One invocation at a time: the region's heap is this invocation's alone."""
        started = time.perf_counter()
        self.region.reset()
        self._lengths.clear()
        event, context, reply = self._begin(message)
        try:
            value = self.call(event, context)
            if type(value) not in _PLAIN_RESULTS:
                if inspect.isawaitable(value):
                    value = self.loop.run_until_complete(value)
                streamed = streamed_response(value)
                if streamed is not None and self.grants is not None:
                    return self._stream(reply, streamed, context)
                if streamed is not None:  # no stream to this cVM's caller here: the body goes whole
                    value = _whole(streamed, b"".join(self._chunks(streamed.body)))
            return self._finish(self._complete(reply, value, inline=False, called="chain" in message), None, started)
        except BaseException as exc:
            return self._finish(reply, exc, started)

    def _stream(self, reply: dict[str, Any], response: Response, context: Context) -> dict[str, Any]:
        """Answer with status and headers now, then write what the generator yields into a
        CAP_Stream; returns the closing ``streamed`` message (with the error, if it raised)."""
        granted = self.request({"op": "stream"})
        if granted.get("error"):
            raise RuntimeError(f"cannot stream the response: {granted['error'].get('message')}")
        grant = self._accept(granted["grant"], transient=True)
        writer = RingWriter(ring(grant), *grant.events, timeout=max(context.remaining_time(), 0.001))
        self.send({**reply, "status": response.status, "headers": response.headers, "stream": True})
        closing: dict[str, Any] = {"op": "streamed", "id": reply["id"]}
        try:
            for chunk in self._chunks(response.body):
                writer.write(chunk)
        except BrokenPipeError:
            pass  # the receiver went away: nothing more is wanted
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exception(exc)
            closing["error"] = error_report("handler", exc, self.spec)
        finally:
            writer.close()
        return self._finish(closing, None)

    def _chunks(self, body: Any) -> Any:
        """The byte chunks of a generator or an async generator (run on this cVM's loop)."""
        if inspect.isasyncgen(body):
            while True:
                try:
                    chunk = self.loop.run_until_complete(body.__anext__())
                except StopAsyncIteration:
                    return
                yield _chunk(chunk)
        for chunk in body:
            yield _chunk(chunk)

    async def invoke_async(self, message: dict[str, Any]) -> dict[str, Any]:
        """One of several concurrent invocations: results travel inline (no shared heap to split)."""
        event, context, reply = self._begin(message)
        try:
            value = self.call(event, context)
            if inspect.isawaitable(value):
                value = await value
            streamed = streamed_response(value)
            if streamed is not None:  # concurrent invocations share one channel: the body goes whole
                chunks = streamed.body
                parts = [c async for c in chunks] if inspect.isasyncgen(chunks) else list(chunks)
                value = _whole(streamed, b"".join(map(_chunk, parts)))
            return self._finish(self._complete(reply, value, inline=True), None)
        except BaseException as exc:
            return self._finish(reply, exc)

    def _body(self, body: Any, *, inline: bool, called: bool = False) -> dict[str, Any]:
        """A result as the reply carries it. For a calling function, a large one goes into a shared
        object, which the intravisor grants to the caller as it is."""
        if isinstance(body, (Capability, SharedBuffer)):
            body, length = self._sized(body)
            return {"body": body, "length": length}
        if inline or len(body) <= INLINE_LIMIT:
            return {"body": bytes(body)}
        if called:
            return {"body": self.share(body), "length": len(body)}
        cap, length = self.region.share(body)
        return {"body": cap, "length": length}
