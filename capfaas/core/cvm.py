"""One cVM as the intravisor tracks it: its authority, its process, its lifecycle."""
from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .backend import CVMProcess, Region
from .capability import Capability
from .channels import is_request
from .control import ChannelClosed, ProtocolViolation
from .spec import FunctionSpec


_pack = wire.packer()
"""The intravisor's encoder: every cVM's channel is written from the event loop's one thread."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    IDLE = "idle"
    STOPPED = "stopped"


STARTING, READY, BUSY, IDLE, STOPPED = State.STARTING, State.READY, State.BUSY, State.IDLE, State.STOPPED
"""The states by plain name, for the hot paths: on Python 3.11 each ``State.X`` goes through
``EnumType.__getattr__``, which costs more than the comparison it serves."""


@dataclass(eq=False)
class CVM:
    """A function instance: region, root capabilities and the process running the runtime."""

    id: int
    spec: FunctionSpec
    region: Region
    ddc: Capability
    pcc: Capability
    process: CVMProcess
    state: State = STARTING
    invocations: int = 0
    peak_rss: int = 0
    """Bytes of the cVM's peak resident memory, as it last reported."""
    cpu_seconds: float = 0.0
    """CPU time the cVM has used over its life, as it last reported."""
    stop_reason: str = ""
    expired: bool = False
    """Whether an invocation's timeout fired and killed this cVM."""
    fault: str = ""
    """Why the intravisor stopped this cVM for breaking a capability rule, if it did."""
    reply_seconds: float = 0.0
    """How long the cVM took to answer its last invocation (one at a time)."""
    _sent: float = field(default=0.0, repr=False)
    """When its last invocation was sent (``time.perf_counter``)."""
    answered_directly: bool = False
    """Whether its last reply was read straight from the socket while the event loop waited:
    output it wrote before that reply may still be in the console's pipes."""
    in_flight: int = 0
    """Invocations handed to this cVM and not yet released by whoever acquired it (the pool's count)."""
    busy: int = 0
    """Invocations the cVM is running right now (the intravisor's count)."""
    grants: dict[int, Capability] = field(default_factory=dict)
    """Shared objects granted to this cVM besides its own region, by object id, with the
    capability it holds to each."""
    transient: set[int] = field(default_factory=set)
    """Grants of payloads for the running invocation: the cVM unmaps them when it ends."""
    root: str = ""
    """The id of the top-level invocation the running one serves (its own, or a caller's)."""
    output: tuple[Any, Any] | None = None
    """The CAP_Stream (object, reading end) the running invocation streams its response into."""
    entries: set[Capability] = field(default_factory=set)
    """The entry capabilities (call targets) the intravisor issued to this cVM."""
    buffered: int = 0
    """Bytes of shared buffers made for this cVM in its running invocation."""
    pipes: dict[int, Any] = field(default_factory=dict)
    """CAP_Streams the running invocation opened to functions it is calling, by object id."""
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict, repr=False)
    """Concurrent invocations awaiting their replies, by sequence number (invocation ids are the
    client's to choose, and two at once may share one)."""
    _sequence: Any = field(default_factory=itertools.count, repr=False)
    _reader: asyncio.Task[None] | None = field(default=None, repr=False)
    on_call: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = field(default=None, repr=False)
    """Answers a request the cVM makes mid-invocation (a call to another function, a shared
    buffer, a CAP_File; set by the intravisor)."""
    _calls: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    @property
    def authorities(self) -> list[Capability]:
        """What this cVM may legitimately hand back: its DDC and every grant."""
        return [self.ddc, *self.grants.values()]

    @property
    def receive_area(self) -> tuple[int, int]:
        """Where the intravisor places payloads for this cVM: the lower half of its region."""
        return self.region.base, self.region.size // 2

    async def send(self, message: dict[str, Any]) -> None:
        channel = self.process.channel
        channel.write(_pack(message))
        if channel.congested:  # not all sent at once: wait until it drains
            await channel.drain()

    def post(self, message: dict[str, Any], spin: float = 0.0) -> dict[str, Any] | None:
        """Send an invocation (one at a time); its reply when it came within ``spin`` seconds of
        busy-waiting, read straight from the socket (a quick reply then needs no event loop turn)."""
        channel = self.process.channel
        channel.write(_pack(message))
        self._sent = time.perf_counter()
        if spin and not channel.congested and not channel.has_messages:
            data = self.process.read_reply(spin)
            if data is not None:
                channel.feed(data)
                return self.next_reply()
        return None

    def next_reply(self, through_loop: bool = False) -> dict[str, Any] | None:
        """The running invocation's reply if it has come (requests sent before it are served);
        None while it has not; ChannelClosed or ProtocolViolation once the channel has ended.
        ``through_loop``: the event loop read it, after any output written before it."""
        channel = self.process.channel
        while True:
            message = channel.next_message()
            if message is None:
                self.answered_directly = False
                return None
            if is_request(message):
                self._answer(message)
                continue
            self.reply_seconds = time.perf_counter() - self._sent
            self.answered_directly = not through_loop
            return message

    def post_concurrently(self, message: dict[str, Any]) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Send one of several invocations running at once: one reader hands each reply to the
        future returned here, by sequence number (``forget`` it once it is no longer awaited)."""
        waiter = asyncio.get_running_loop().create_future()
        sequence = message["seq"] = next(self._sequence)
        self._pending[sequence] = waiter
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_replies())
        self.process.channel.write(_pack(message))
        return sequence, waiter

    def forget(self, sequence: int) -> None:
        self._pending.pop(sequence, None)

    def expire(self) -> None:
        """An invocation outlived its timeout: kill the cVM from outside (it may be looping in C
        code with signals blocked); the invocation sees its channel close and reports the timeout."""
        if self.state is not STOPPED:
            self.expired = True
            self.process.kill()

    def _answer(self, call: dict[str, Any]) -> None:
        """Serve a request (a call to another function, a buffer, a CAP_File, a stream) while this
        cVM's invocation goes on."""
        async def answer() -> None:
            if self.on_call is None:
                reply = {"op": "called", "call": call.get("call"), "status": 501,
                         "error": {"type": "CallUnavailable", "message": "this cVM cannot call other functions"}}
            else:
                reply = await self.on_call(call)
            try:
                await self.send(reply)
            except ConnectionError:
                pass  # the caller is gone; its invocation reports that
        task = asyncio.ensure_future(answer())
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await self.receive()
                if is_request(reply):
                    self._answer(reply)
                    continue
                waiter = self._pending.get(reply.get("seq"))
                if waiter is None or waiter.done():
                    raise ProtocolViolation(f"a reply to no pending invocation ({reply.get('seq')!r})")
                waiter.set_result(reply)
        except (ChannelClosed, ProtocolViolation, ConnectionError) as exc:
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(exc)

    async def receive(self) -> dict[str, Any]:
        """The next message from the cVM; ChannelClosed at end of stream."""
        channel = self.process.channel
        message = channel.next_message()
        self.answered_directly = message is not None
        if message is None:
            message = await channel.wait()
        return message
