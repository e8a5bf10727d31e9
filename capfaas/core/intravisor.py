"""The intravisor: creates cVMs, owns their authority, and checks everything that crosses.

Every cVM gets a region of the one shared segment and root capabilities bounded to it (a DDC with
the data permissions Intravisor gives, a PCC with the code ones). Payloads larger than a control
message are placed once in the cVM's region and handed over as read-only capabilities; every
capability a cVM sends back must be derivable from its own authority, or the message is rejected
with a capability fault and the cVM, which has shown it cannot be trusted, is stopped.
"""
from __future__ import annotations

import asyncio
import itertools
import resource
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from .backend import Backend, LaunchRequest, Region, TemplateFailed, TemplateProcess
from .broker import Broker, SharingUnavailable
from .capability import Capability
from .channels import ChannelRefused, channel_table
from .control import ChannelClosed, ProtocolViolation
from .cvm import BUSY, CVM, IDLE, READY, STOPPED
from .deadlines import Deadlines
from .entries import EntryTable
from .faults import CapabilityFault, TagFault
from .outstream import OutputStream
from .perms import CODE_PERMS, DATA_PERMS, Perm
from .runtime import INLINE_LIMIT
from .spec import FunctionSpec

GiB = 1 << 30
DEFAULT_REGION_SIZE = 1 * GiB
DEFAULT_SEGMENT_SIZE = 1024 * GiB
"""Address space, not memory: the segment is sparse, and a region costs only what its cVM touches."""
DEFAULT_SHARED_BUDGET = 4 * GiB
"""Bytes that shared objects (payload buffers, CAP_Files) may hold together."""
READ_ONLY = int(Perm.LOAD | Perm.GLOBAL)
MAX_CALL_DEPTH = 8
REPLY_SPIN = 200e-6
"""Seconds the intravisor busy-waits for a reply before it yields to the event loop, when nothing
else is running and the cVM last answered within that time. On a virtual machine, sleeping and
being woken costs tens of microseconds: more than a quick function takes."""


class FunctionLoadError(Exception):
    """The function's code cannot run: syntax, import-time failure, missing handler."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        message = str(error.get("message", ""))
        where = ""
        if "file" in error and f"line {error.get('line')}" not in message:  # SyntaxError says it already
            where = f" ({error['file']}, line {error['line']})"
        super().__init__(f"{error.get('type', 'Error')}: {message}{where}")


class CVMStartError(Exception):
    """A cVM died or hung before it was ready."""


@dataclass(slots=True)
class Invocation:
    """One request for a cVM. ``body`` is bytes, or a capability to bytes already in its region."""

    method: str = "POST"
    path: str = "/"
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | memoryview | Capability = b""
    length: int | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    inline: bool = False
    """Send a bytes body inside the control message whatever its size (the copying path)."""
    chain: Sequence[str] = ()
    """The functions that called their way to this invocation, outermost first."""
    root: str = ""
    """The scope of the shared buffers this invocation and the calls it makes use, released when
    the top-level invocation (the one without a ``chain``) ends; a new one when empty."""
    stream: Any = None
    """The CAP_Stream (a shared object) the body arrives on while the function runs: a chunked
    request, or a calling function writing to it."""


@dataclass(slots=True)
class Result:
    """What came back. ``outcome`` is ``ok``, ``error`` (the handler raised), ``timeout``,
    ``crashed`` or ``fault`` (the cVM broke a capability rule); ``body`` may be a zero-copy view.
    The hot path makes one (and an ``Invocation``) with positional arguments: on Python 3.11 a
    class called with keywords first gathers them into a dict."""

    status: int
    headers: dict[str, str]
    body: bytes | memoryview
    outcome: str = "ok"
    error: dict[str, Any] | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0
    capability: Capability | None = None
    """The capability to ``body`` when it is a shared object, which can be granted on as it is."""
    stream: Any = None
    """An ``OutputStream`` when the function streams its body (then ``body`` is empty): read its
    ``chunks()``, then ``finish()``; the cVM stays busy until then."""


_WAITING = "waiting"
_ENDED = "ended"


class Running:
    """An invocation sent to its cVM: what the intravisor needs to end it, however it ends."""

    __slots__ = ("owner", "cvm", "invocation", "done", "started", "timeout", "top_level", "phase", "watched",
                 "waiter", "sequence")

    def __init__(self, owner: Intravisor, cvm: CVM, invocation: Invocation,
                 done: Callable[[Result | None, Exception | None], None], started: float, timeout: float,
                 top_level: str | None) -> None:
        self.owner = owner
        self.cvm = cvm
        self.invocation = invocation
        self.done = done
        self.started = started
        """``time.monotonic()`` when it was sent; its deadline is ``timeout`` seconds later."""
        self.timeout = timeout
        self.top_level = top_level
        """Its own id when it is a top-level invocation, whose shared buffers end with it."""
        self.phase = _WAITING
        self.watched: int | None = None
        """Its deadline's key in ``Deadlines``."""
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        """The future of its reply, when it is one of several invocations its cVM runs at once."""
        self.sequence: int | None = None
        """Its number among the invocations a cVM runs at once (None: one at a time)."""

    def reply_ready(self) -> None:
        """A message came for its cVM, running it alone: its reply, or a request to serve."""
        if self.phase is not _WAITING:  # abandoned
            return
        try:
            reply = self.cvm.next_reply(through_loop=True)
        except (ChannelClosed, ProtocolViolation) as exc:
            self.owner._end(self, None, exc)
            return
        if reply is None:  # a request, served: the reply is still to come
            self.cvm.process.channel.when_ready(self.reply_ready)
            return
        self.owner._end(self, reply, None)

    def replied(self, waiter: asyncio.Future[dict[str, Any]]) -> None:
        self.owner._replied(self, waiter)


class _Outcome:
    """What ``invoke`` awaits: a future only when the result did not come at once."""

    __slots__ = ("result", "error", "waiter")

    def __init__(self) -> None:
        self.result: Result | None = None
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    def __call__(self, result: Result | None, error: Exception | None) -> None:
        self.result, self.error = result, error
        if self.waiter is not None and not self.waiter.done():  # not cancelled
            self.waiter.set_result(None)


class Intravisor:
    """The monitor of all cVMs on one backend."""

    def __init__(self, backend: Backend, pm: pluggy.PluginManager, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 region_size: int = DEFAULT_REGION_SIZE, shared_budget: int = DEFAULT_SHARED_BUDGET) -> None:
        if segment_size % region_size:
            raise ValueError("the segment size must be a multiple of the region size")
        self.backend = backend
        self.pm = pm
        self.segment_size = segment_size
        self.region_size = region_size
        self.memory: Any = None
        self.root: Capability | None = None
        self._free_regions: list[int] = []
        self._next_id = 1
        self.cvms: dict[int, CVM] = {}
        self.broker = Broker(shared_budget, max_file_size=region_size // 2)
        """Shared objects: payload buffers handed between cVMs, and CAP_Files."""
        self.broker.cvms = self.cvms
        self._scopes = itertools.count(1)
        self._running = 0
        """Invocations under way on every cVM: the intravisor busy-waits for a reply only when alone."""
        self._failing: set[asyncio.Task[None]] = set()
        """Invocations being ended without a valid reply (their cVM stopped first)."""
        self.deadlines = Deadlines()
        """Every waiting invocation's timeout."""
        self.entries = EntryTable()
        """Sealed entry capabilities: the only call targets a cVM can name."""
        self.channels = channel_table(pm.hook.capfaas_channels())
        """Which channel plugin serves each request op."""
        self.router: Callable[[str, Invocation, float], Awaitable[Result]] | None = None
        """Runs a call from one function to another by name (set by the gateway's service)."""
        self._invoke_hooks = bool(pm.hook.capfaas_before_invoke.get_hookimpls()
                                  or pm.hook.capfaas_after_invoke.get_hookimpls())
        """Whether any plugin listens to invocations; the hot path skips the calls when none does."""

    async def start(self) -> None:
        _raise_descriptor_limit()
        self.memory = await self.backend.start(self.segment_size)
        self.root = self.memory.root_capability()
        self._free_regions = list(range(self.segment_size // self.region_size - 1, -1, -1))

    async def close(self) -> None:
        for cvm in list(self.cvms.values()):
            await self.stop(cvm, "intravisor shutting down")
        self.broker.close()
        await self.backend.close()

    async def __aenter__(self) -> Intravisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- creating and stopping cVMs ------------------------------------------------------------

    def _region(self) -> Region:
        if not self._free_regions:
            raise CVMStartError(f"no free region: all {self.segment_size // self.region_size} cVM slots are in use")
        slot = self._free_regions.pop()
        offset = slot * self.region_size
        return Region(self.memory.base + offset, self.region_size, offset)

    async def create_template(self, spec: FunctionSpec) -> TemplateProcess | None:
        """A template of ``spec`` to clone instances from (None if the backend cannot clone)."""
        try:
            return await self.backend.launch_template(spec, self.region_size)
        except TemplateFailed as exc:
            raise FunctionLoadError(exc.error) from None

    async def create(self, spec: FunctionSpec, template: TemplateProcess | None = None) -> CVM:
        """Start a cVM for ``spec`` (cloned from ``template`` when given); wait until it is ready."""
        assert self.root is not None, "start() the intravisor first"
        region = self._region()
        bounded = self.root.set_address(region.base).set_bounds_exact(region.size)
        ddc = bounded.and_permissions(DATA_PERMS)
        pcc = bounded.and_permissions(CODE_PERMS)
        cvm_id, self._next_id = self._next_id, self._next_id + 1
        try:
            request = LaunchRequest(cvm_id, spec, region, ddc, pcc)
            process = await (template.fork(request) if template is not None else self.backend.launch(request))
        except BaseException:
            self._free_regions.append(region.offset // self.region_size)
            raise
        cvm = CVM(cvm_id, spec, region, ddc, pcc, process)
        cvm.on_call = lambda request: self._route_request(cvm, request)
        self.cvms[cvm_id] = cvm
        timeout = self.backend.ready_timeout
        try:
            async with asyncio.timeout(timeout):
                message = await cvm.receive()
        except (ChannelClosed, ProtocolViolation, asyncio.TimeoutError) as exc:
            how = await self.stop(cvm, "failed to start")
            reason = (f"did not become ready within {timeout:g} s (ready_timeout of the {self.backend.name!r} "
                      "backend)" if isinstance(exc, asyncio.TimeoutError) else how)
            raise CVMStartError(f"cVM for {spec.name!r} {reason}") from None
        if message.get("op") == "failed":
            await self.stop(cvm, "function failed to load")
            raise FunctionLoadError(message.get("error") or {})
        if message.get("op") != "ready":
            await self.stop(cvm, "protocol violation")
            raise CVMStartError(f"cVM for {spec.name!r} sent {message.get('op')!r} instead of ready")
        cvm.state = READY
        self.pm.hook.capfaas_cvm_started(cvm=cvm)
        return cvm

    async def stop(self, cvm: CVM, reason: str = "stopped") -> str:
        """Stop ``cvm`` (idempotent); returns how its process ended."""
        if cvm.state is STOPPED:
            return cvm.stop_reason
        cvm.state = STOPPED
        cvm.process.kill()
        if cvm.output is not None:  # a stream it asked for and never answered with
            self.broker.area.free(cvm.output[0])
            cvm.output = None
        how = await cvm.process.wait()
        cvm.stop_reason = how
        self.cvms.pop(cvm.id, None)
        self._free_regions.append(cvm.region.offset // self.region_size)
        forget = getattr(self.backend, "forget", None)
        if forget is not None and cvm.process.pid is not None:
            forget(cvm.process.pid)
        self.pm.hook.capfaas_cvm_stopped(cvm=cvm, reason=f"{reason}: {how}")
        return how

    # -- payloads ------------------------------------------------------------------------------

    def receive_buffer(self, cvm: CVM, size: int) -> tuple[Capability, memoryview]:
        """A read-only capability and a writable view of ``size`` bytes in ``cvm``'s receive area.

        Whoever holds the view (the gateway reading a request body from its socket) writes the
        payload straight into shared memory; the capability is what the cVM receives.
        """
        assert self.root is not None
        base, limit = cvm.receive_area
        if size > limit:
            raise ValueError(f"a {size}-byte payload exceeds the cVM's {limit}-byte receive area")
        cap = self.root.set_address(base).set_bounds(size).and_permissions(READ_ONLY)
        return cap, self.memory.writable_view(self.root, base, size)

    def place(self, cvm: CVM, body: bytes | memoryview) -> Capability:
        """Copy ``body`` once into ``cvm``'s receive area; return the read-only capability to it."""
        cap, view = self.receive_buffer(cvm, len(body))
        view[:] = body
        return cap

    def admit(self, cvm: CVM, cap: Any, length: int) -> None:
        """Accept a capability from ``cvm`` only if its own authority could have derived it."""
        if not isinstance(cap, Capability) or not cap.tag:
            raise TagFault(cap, getattr(cap, "address", 0), length, "hand over",
                           "the capability is not tagged: a cVM cannot forge one")
        if not isinstance(length, int) or length < 0 or cap.address + length > cap.top or cap.address < cap.base:
            raise CapabilityFault(cap, cap.address, length if isinstance(length, int) else 0, "hand over",
                                  f"the length {length!r} does not fit the capability's bounds")
        if not any(cap.build(authority).tag for authority in cvm.authorities):
            raise CapabilityFault(cap, cap.address, length, "hand over",
                                  f"[{cap.base:#x}, {cap.top:#x}) is not derivable from cVM {cvm.id}'s authority "
                                  f"(its region is [{cvm.ddc.base:#x}, {cvm.ddc.top:#x}))")

    # -- requests from a running cVM ------------------------------------------------------------

    async def _route_request(self, cvm: CVM, request: dict[str, Any]) -> dict[str, Any]:
        """A cVM asks mid-invocation; the channel serving the request's op answers it."""
        reply: dict[str, Any] = {"op": "called", "call": request.get("call")}
        channel = self.channels.get(request.get("op"))  # type: ignore[arg-type]
        if channel is None:
            return {**reply, "status": 501, "error": {"type": "ChannelUnavailable",
                                                      "message": f"no channel serves {request.get('op')!r} requests"}}
        try:
            reply.update(await channel.serve(self, cvm, request))
        except ChannelRefused as exc:
            reply.update(status=exc.status, error={"type": exc.kind, "message": str(exc)})
        except (ValueError, MemoryError, SharingUnavailable) as exc:
            kind = "MemoryError" if isinstance(exc, MemoryError) else type(exc).__name__
            reply.update(status=400, error={"type": kind, "message": str(exc)})
        return reply

    # -- invoking ------------------------------------------------------------------------------

    async def invoke(self, cvm: CVM, invocation: Invocation, timeout: float | None = None) -> Result:
        """Run one invocation on a ready or idle cVM; timeouts and crashes stop the cVM.

        ``timeout`` can only shorten the function's own (a caller's remaining time). Cancelled,
        the invocation is abandoned: its cVM is left busy, for the caller to stop."""
        outcome = _Outcome()
        running = self.dispatch(cvm, invocation, outcome, timeout)
        if outcome.result is None and outcome.error is None:  # not answered within the busy-wait
            outcome.waiter = asyncio.get_running_loop().create_future()
            try:
                await outcome.waiter
            except asyncio.CancelledError:
                self.abandon(running)
                raise
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result is not None
        return outcome.result

    def dispatch(self, cvm: CVM, invocation: Invocation, done: Callable[[Result | None, Exception | None], None],
                 timeout: float | None = None) -> Running:
        """Send one invocation to a ready or idle cVM; ``done(result, None)`` is called with its
        result (already before this returns when the cVM answered within the busy-wait), or
        ``done(None, error)`` with an error that is not the function's. Callbacks, not a coroutine:
        the gateway answers a warm invocation without a task of its own."""
        limits = cvm.spec.limits
        state = cvm.state
        if state is not IDLE and state is not READY and not (
                state is BUSY and limits.concurrency > 1):
            raise RuntimeError(f"cVM {cvm.id} is {state.value}, not ready")
        cvm.state = BUSY
        cvm.busy += 1
        cvm.invocations += 1
        cvm.root = scope = invocation.root or f"{invocation.id}#{next(self._scopes)}"  # ids can repeat
        running = Running(self, cvm, invocation, done, time.monotonic(),
                          limits.timeout if timeout is None or timeout > limits.timeout else timeout,
                          None if invocation.chain else scope)
        if self._invoke_hooks:
            self.pm.hook.capfaas_before_invoke(spec=cvm.spec, invocation_id=invocation.id)
        self._running += 1
        try:
            message = self._invoke_message(cvm, invocation, time.time() + running.timeout)
            if limits.concurrency > 1:
                running.sequence, running.waiter = cvm.post_concurrently(message)
                reply = None
            else:
                reply = cvm.post(message, REPLY_SPIN if self._running == 1 and cvm.reply_seconds < REPLY_SPIN else 0.0)
        except (ChannelClosed, ConnectionError, SharingUnavailable, ProtocolViolation, CapabilityFault) as exc:
            self._end(running, None, exc)
            return running
        except BaseException:
            self._running -= 1
            raise
        if reply is not None:
            self._end(running, reply, None)
            return running
        running.watched = self.deadlines.watch(running.started + running.timeout, cvm.expire)  # the loop's clock
        self._await_reply(running)
        return running

    def abandon(self, running: Running) -> bool:
        """Stop waiting for an invocation's reply (its caller went away): ``done`` is not called.
        The cVM stays busy, for the caller to stop, since its reply would come to the next
        invocation. False when the invocation was ending already (``done`` will be called)."""
        if running.phase is not _WAITING:
            return False
        running.phase = _ENDED
        self._running -= 1
        if running.watched is not None:
            self.deadlines.unwatch(running.watched)
        if running.sequence is not None:
            assert running.waiter is not None
            running.waiter.cancel()
            running.cvm.forget(running.sequence)
        else:
            running.cvm.process.channel.when_ready(None)
        return True

    def _await_reply(self, running: Running) -> None:
        if running.sequence is not None:  # one of several at once: its reply resolves its future
            assert running.waiter is not None
            running.waiter.add_done_callback(running.replied)
            return
        running.cvm.process.channel.when_ready(running.reply_ready)  # one at a time (maybe queued already)

    def _replied(self, running: Running, waiter: asyncio.Future[dict[str, Any]]) -> None:
        """The reply to one of several invocations a cVM runs at once."""
        if running.phase is not _WAITING:  # abandoned
            if not waiter.cancelled():
                waiter.exception()  # retrieved: what came after nobody waited is not an error to report
            return
        error = waiter.exception()
        self._end(running, None if error is not None else waiter.result(), error)

    def _end(self, running: Running, reply: dict[str, Any] | None, error: BaseException | None) -> None:
        running.phase = _ENDED
        if running.watched is not None:
            self.deadlines.unwatch(running.watched)
        if running.sequence is not None:
            running.cvm.forget(running.sequence)
        if reply is not None:
            try:
                result = self._settle(running, reply)
            except (ProtocolViolation, CapabilityFault) as exc:
                error = exc
            except Exception as exc:  # a plugin's capfaas_after_invoke failed: the caller reports it
                running.done(None, exc)
                return
            else:
                running.done(result, None)
                return
        task = asyncio.ensure_future(self._fail(running, error))
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)

    def _settle(self, running: Running, reply: dict[str, Any]) -> Result:
        """The result of an invocation its cVM answered."""
        cvm = running.cvm
        result = self._result(cvm, reply)
        self._running -= 1
        if result.stream is not None:  # the body follows through a CAP_Stream: the cVM stays busy
            result.stream = OutputStream(self, cvm, *result.stream, running.started + running.timeout,
                                         running.top_level)
            result.stdout, result.stderr = cvm.process.console.take()
            return result
        cvm.busy -= 1
        if not cvm.busy:
            cvm.state = IDLE
        return self._finish(running, result)

    async def _fail(self, running: Running, error: BaseException | None) -> None:
        """The result of an invocation that ended without a valid reply, to ``done``."""
        self._running -= 1
        cvm, timeout = running.cvm, running.timeout
        try:
            if isinstance(error, (ChannelClosed, ConnectionError)):
                how = await self.stop(cvm, "timeout" if cvm.expired else "crashed")
                if cvm.expired:
                    result = _failure(504, "timeout", "TimeoutError",
                                      f"function {cvm.spec.name!r} ran longer than its {timeout:g} s timeout "
                                      "(limit: timeout); its cVM was stopped")
                elif cvm.fault:  # stopped for what it sent while calling another function
                    result = _failure(502, "fault", "CapabilityFault",
                                      f"function {cvm.spec.name!r} broke the rules and its cVM was stopped: {cvm.fault}")
                else:
                    result = _failure(502, "crashed", "CVMCrashed",
                                      f"function {cvm.spec.name!r} crashed: its cVM {how}{_limit_hint(how)}")
            elif isinstance(error, SharingUnavailable):  # nothing was sent: the cVM is as it was
                cvm.busy -= 1
                if not cvm.busy:
                    cvm.state = IDLE
                result = _failure(501, "error", "StreamUnavailable",
                                  f"function {cvm.spec.name!r} cannot receive a stream ({error}): it must serve one "
                                  "invocation at a time on a backend that maps shared objects")
            else:  # ProtocolViolation, CapabilityFault
                await self.stop(cvm, "fault")
                result = _failure(502, "fault", type(error).__name__,
                                  f"function {cvm.spec.name!r} broke the rules and its cVM was stopped: {error}")
            result = self._finish(running, result)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the invocation
            running.done(None, exc)
            return
        running.done(result, None)

    def _finish(self, running: Running, result: Result) -> Result:
        """An ended invocation's bookkeeping: its buffers released, its output and duration taken."""
        cvm = running.cvm
        self.broker.end_invocation(cvm, running.top_level)
        result.stdout, result.stderr = cvm.process.console.take(settled=not cvm.answered_directly)
        result.duration = time.monotonic() - running.started
        if self._invoke_hooks:
            self.pm.hook.capfaas_after_invoke(spec=cvm.spec, invocation_id=running.invocation.id,
                                              status=result.status, duration=result.duration)
        return result

    def _invoke_message(self, cvm: CVM, invocation: Invocation, deadline: float) -> dict[str, Any]:
        body: Any = invocation.body
        length = invocation.length
        message = {"op": "invoke", "id": invocation.id, "method": invocation.method, "deadline": deadline}
        if type(body) is bytes and length is None and len(body) <= INLINE_LIMIT:  # the usual: inside the message
            if body:
                message["body"] = body
        else:
            self._place_body(cvm, invocation, message)
        if invocation.path != "/":  # what the runtime assumes is left out: smaller and quicker
            message["path"] = invocation.path
        if invocation.query:
            message["query"] = invocation.query
        if invocation.headers:
            message["headers"] = invocation.headers
        if invocation.chain:
            message["chain"] = invocation.chain
        if invocation.stream is not None:
            message["stream"] = self.broker.grant_stream(cvm, invocation.stream)
        return message

    def _place_body(self, cvm: CVM, invocation: Invocation, message: dict[str, Any]) -> None:
        """A body the control message does not carry: granted as the shared object it is in, or
        placed once in the cVM's region (``inline`` bodies are carried whatever their size)."""
        body: Any = invocation.body
        length = invocation.length
        if isinstance(body, Capability):
            length = body.length if length is None else length
            if self.broker.find(body, length) is not None:
                try:
                    message["grant"] = self.broker.grant(cvm, self.broker.find(body, length), writable=False,
                                                         transient=True, within=body)
                except SharingUnavailable:  # its backend cannot map it: one copy into its region
                    body = self.place(cvm, self.broker.area.view(body, body.address, length))
        elif len(body) > INLINE_LIMIT and not invocation.inline and cvm.spec.limits.concurrency == 1:
            length = len(body)
            body = self.place(cvm, body)
        if length is not None:
            message["body"], message["length"] = body, length
        elif body:
            message["body"] = body

    def _result(self, cvm: CVM, reply: dict[str, Any]) -> Result:
        if reply.get("op") != "result":
            raise ProtocolViolation(f"expected a result, got {reply.get('op')!r}")
        body = reply.get("body", b"")
        capability = None
        if type(body) is not bytes:
            if not isinstance(body, Capability):
                raise ProtocolViolation("a result body must be bytes or a capability")
            length = reply.get("length")
            self.admit(cvm, body, length)
            if self.broker.find(body, length) is not None:
                capability, body = body, self.broker.area.view(body, body.address, length)
            else:
                body = self.memory.view(body, body.address, length)
        status = reply.get("status", 500)
        headers = reply.get("headers")
        if headers:
            if type(headers) is not dict:
                raise ProtocolViolation("malformed result headers")
            for key, value in headers.items():  # text as the runtime sends them; anything else made text
                if type(key) is not str or type(value) is not str:
                    headers = {str(k): str(v) for k, v in headers.items()}
                    break
        else:
            headers = {}
        if not isinstance(status, int):
            raise ProtocolViolation("malformed result status")
        error = reply.get("error")
        stream = None
        if reply.get("stream"):
            if cvm.output is None:
                raise ProtocolViolation("a streamed result without a stream")
            stream, cvm.output = cvm.output, None
        if "rss" in reply:  # reported after slow invocations and every few quick ones
            if isinstance(reply["rss"], int):
                cvm.peak_rss = reply["rss"]
            if isinstance(reply.get("cpu"), float):
                cvm.cpu_seconds = reply["cpu"]
        # positionally (stdout, stderr and duration are filled in later): see Result
        return Result(status, headers, body, "error" if error else "ok", error, b"", b"", 0.0, capability, stream)


def _raise_descriptor_limit() -> None:
    """Each cVM costs the intravisor a few descriptors (control socket, console pipes, pidfd):
    lift the soft limit to the hard one so hundreds of cVMs fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _limit_hint(how: str) -> str:
    if "SIGXCPU" in how:
        return " (limit: cpu time)"
    if "SIGKILL" in how:
        return " (killed: possibly the memory limit)"
    return ""


def _failure(status: int, outcome: str, kind: str, message: str) -> Result:
    return Result(status, {"Content-Type": "text/plain; charset=utf-8"}, message.encode(), outcome,
                  {"type": kind, "message": message})

