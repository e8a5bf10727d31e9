"""Cold-start pooling: a template per function version, warm instances cloned from it.

The template imports the function and runs its initialisation once; instances are cloned from it
(copy-on-write), so a cold start costs a fork, not an import. A burst at a cold function starts
only the instances it needs, up to the maximum (single-flight); requests beyond the instances and
the queue are refused at once (the gateway answers 429 with Retry-After). Idle instances stop
after an idle timeout (scale to zero), instances are recycled after a number of invocations or
past a memory threshold, and a global budget stops the least recently used idle instances of
other functions before it lets the host run out of instances or memory.
"""
from __future__ import annotations

import asyncio
import collections
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from capfaas.core.cvm import CVM, STOPPED
from capfaas.core.intravisor import Intravisor
from capfaas.core.spec import FunctionSpec
from capfaas.hookspecs import hookimpl


CPU_RECYCLE_SHARE = 0.5
"""An instance is recycled once it used this share of its lifetime CPU limit: the rest must cover
one more invocation, which the timeout bounds."""


class PoolBusy(Exception):
    """Every instance is busy and the queue is full."""

    def __init__(self, name: str, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"function {name!r} is at its concurrency limit and its queue is full")


class BudgetExhausted(Exception):
    """The host-wide instance or memory budget is spent and nothing idle can be stopped."""


@dataclass(frozen=True)
class Scaling:
    min: int = 0
    max: int = 4
    queue: int = 64
    """Requests that may wait for an instance before the pool refuses more."""
    scale_to_zero: bool = True
    idle_timeout: float = 300.0
    """Seconds an instance may sit idle before it is stopped (down to ``min``)."""
    recycle_after: int = 100_000
    """Invocations after which an instance is replaced by a fresh clone."""
    recycle_rss: int = 512 << 20
    """Peak resident memory (bytes) past which an instance is replaced after its invocation."""


MEMORY_READ_INTERVAL = 0.1
"""Seconds a reading of the host's available memory is used for (reading it costs a cold start
about 0.15 ms); starts in between count their memory limit against it."""


def memory_available() -> int:
    """Bytes the kernel could give without swapping (``MemAvailable``)."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def _reserve() -> int:
    """Memory left for everything else: a tenth of the machine, at least 1 GiB."""
    return max(1 << 30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 10)


@dataclass
class Budget:
    """Limits for all pools of one intravisor together: a number of instances, and host memory.

    A new instance may start only while the host could still give it its whole memory limit and
    keep ``reserve`` bytes free; otherwise idle instances of other functions are stopped first,
    least recently used first.
    """

    instances: int = 1000
    reserve: int = field(default_factory=_reserve)
    pools: weakref.WeakSet[FunctionPool] = field(default_factory=weakref.WeakSet)
    _available: int = field(default=0, init=False)
    """Host memory available at the last reading, less the limits of instances started since."""
    _read_at: float = field(default=float("-inf"), init=False)

    def fits(self, asking: FunctionPool) -> bool:
        count = sum(len(pool.instances) + pool.starting for pool in self.pools)
        if count >= self.instances:
            return False
        if time.monotonic() - self._read_at > MEMORY_READ_INTERVAL:
            self._available, self._read_at = memory_available(), time.monotonic()
        return self._available - asking.spec.limits.memory >= self.reserve

    async def make_room(self, asking: FunctionPool) -> None:
        """Stop least recently used idle instances of other functions until one more fits."""
        while not self.fits(asking):
            victims = [(stamp, pool) for pool in self.pools if pool is not asking
                       for stamp in pool.idle_since.values()]
            if not victims:
                raise BudgetExhausted(f"the host's budget is spent ({self.instances} instances, "
                                      f"{self.reserve >> 20} MiB kept free) and no other function "
                                      "has an idle instance to stop")
            _, pool = min(victims, key=lambda pair: pair[0])
            await pool.stop_oldest_idle("budget: room for another function")
            self._read_at = float("-inf")  # memory was freed: read it again
        self._available -= asking.spec.limits.memory  # counted as used until the next reading shows it


_BUDGETS: weakref.WeakKeyDictionary[Intravisor, Budget] = weakref.WeakKeyDictionary()


def budget_of(intravisor: Intravisor) -> Budget:
    """The one budget all pools on ``intravisor`` share."""
    return _BUDGETS.setdefault(intravisor, Budget())


class FunctionPool:
    """The template and the cVMs of one function version."""

    def __init__(self, intravisor: Intravisor, spec: FunctionSpec, scaling: Scaling) -> None:
        self.intravisor = intravisor
        self.spec = spec
        self.scaling = scaling
        self.idle: collections.deque[CVM] = collections.deque()
        self.idle_since: dict[CVM, float] = {}
        self.partial: set[CVM] = set()
        """Instances running some invocations with room for more (concurrency above 1)."""
        self.instances: set[CVM] = set()
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[CVM]] = collections.deque()
        self.cold_starts = 0
        self.start_seconds: list[float] = []
        self.closed = False
        self.template: Any = None
        self._template_ready: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The pool's event loop, once it queued a request: asking for the running loop costs a
        getpid() system call each time."""
        self.budget = budget_of(intravisor)
        self.budget.pools.add(self)

    @property
    def replicas(self) -> int:
        return len(self.instances) + self.starting

    @property
    def available(self) -> int:
        return len(self.idle)

    async def prepare(self) -> None:
        """Start the template; instances wait for it. A failure surfaces on every start."""
        if self._template_ready is None:
            self._template_ready = asyncio.ensure_future(self.intravisor.create_template(self.spec))
        self.template = await asyncio.shield(self._template_ready)

    async def acquire(self) -> tuple[CVM, bool]:
        """A slot in a busy instance, an idle instance, a new one, or a place in the queue;
        returns (cvm, cold). Every acquire is paired with one ``release``."""
        taken = self.take()
        if taken is None:
            return self._lease(await self._start()), True
        if isinstance(taken, CVM):
            return taken, False
        try:
            return await taken, False
        except asyncio.CancelledError:
            if taken.done() and not taken.cancelled():
                self.release(taken.result())
            raise

    def take(self) -> CVM | asyncio.Future[CVM] | None:
        """What ``acquire`` does without a coroutine, when no instance must be started: a slot in a
        busy instance or an idle one, or the future of one from the queue (cancelled when this
        version is replaced); None when an instance must be started (``acquire`` starts it);
        PoolBusy when the queue is full. Every instance taken is paired with one ``release``."""
        if self.partial:
            for cvm in list(self.partial):
                if cvm.state is not STOPPED:
                    return self._lease(cvm)
                self.partial.discard(cvm)
        while self.idle:
            cvm = self.idle.pop()  # the most recently used: its pages are the warmest
            self.idle_since.pop(cvm, None)
            if cvm.state is not STOPPED:
                return self._lease(cvm)
            self.instances.discard(cvm)
        if self.replicas < self.scaling.max:
            return None
        if len(self.waiters) >= self.scaling.queue:
            raise PoolBusy(self.spec.name, retry_after=max(1, round(self.spec.limits.timeout / 10)))
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[CVM] = self._loop.create_future()
        self.waiters.append(waiter)
        return waiter

    async def _start(self) -> CVM:
        await self.budget.make_room(self)  # counts this start once it is under way, just below
        self.starting += 1
        try:
            await self.prepare()
            began = time.monotonic()
            cvm = await self.intravisor.create(self.spec, self.template)
            self.start_seconds.append(time.monotonic() - began)
            del self.start_seconds[:-1000]
        finally:
            self.starting -= 1
        self.cold_starts += 1
        self.instances.add(cvm)
        return cvm

    async def scale_to(self, count: int) -> None:
        """Start instances until ``count`` exist, or stop idle ones until no more than ``count`` do."""
        count = min(count, self.scaling.max)
        while self.replicas < count and not self.closed:
            self._hand_over(await self._start())
        while self.replicas > count and self.idle:
            await self.stop_oldest_idle("scaled down")

    async def stop_oldest_idle(self, reason: str) -> None:
        cvm = self.idle.popleft()
        self.idle_since.pop(cvm, None)
        self.instances.discard(cvm)
        await self.intravisor.stop(cvm, reason)

    def _worn_out(self, cvm: CVM) -> bool:
        """Replace an instance after many invocations, past its memory threshold, or before its
        lifetime CPU limit (RLIMIT_CPU) would kill it mid-invocation."""
        return (cvm.invocations >= self.scaling.recycle_after or cvm.peak_rss > self.scaling.recycle_rss
                or cvm.cpu_seconds > CPU_RECYCLE_SHARE * self.spec.limits.cpu_seconds)

    def _lease(self, cvm: CVM) -> CVM:
        """Count one more invocation on ``cvm``, then share its remaining slots (one at a time, it
        has none left)."""
        cvm.in_flight += 1
        if self.spec.limits.concurrency > 1:
            self._fill(cvm)
        return cvm

    def _fill(self, cvm: CVM) -> None:
        """Hand ``cvm``'s free slots to waiters; keep it on offer while slots remain."""
        slots = self.spec.limits.concurrency
        waiters = self.waiters
        while waiters and cvm.in_flight < slots:
            waiter = waiters.popleft()
            if not waiter.done():
                cvm.in_flight += 1
                waiter.set_result(cvm)
        if slots > 1:  # one at a time, an instance is never partly taken
            if 0 < cvm.in_flight < slots:
                self.partial.add(cvm)
            else:
                self.partial.discard(cvm)

    def release(self, cvm: CVM) -> None:
        """Give an instance back after an invocation; a stopped or worn-out one is replaced on
        demand (once its last concurrent invocation is back)."""
        cvm.in_flight -= 1
        retiring = self.closed or (cvm.state is not STOPPED and self._worn_out(cvm))
        if retiring or cvm.state is STOPPED:
            self.partial.discard(cvm)
            if cvm.in_flight:
                return
            self.instances.discard(cvm)
            if retiring:
                asyncio.ensure_future(self.intravisor.stop(cvm, "version retired" if self.closed else "recycled"))
            if not self.closed:
                self._replace_for_waiters()
            return
        self._hand_over(cvm)

    def _replace_for_waiters(self) -> None:
        if self.waiters and self.replicas < self.scaling.max:
            asyncio.ensure_future(self._start_for_waiter())

    def _hand_over(self, cvm: CVM) -> None:
        """After a release or a start: free slots to waiters; an instance with nothing in flight
        goes idle."""
        self._fill(cvm)
        if not cvm.in_flight:
            self.idle.append(cvm)
            self.idle_since[cvm] = time.monotonic()

    async def _start_for_waiter(self) -> None:
        try:
            cvm = await self._start()
        except Exception as exc:  # the waiter gets the error rather than hanging
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():  # not one whose request went away
                    waiter.set_exception(exc)
                    break
            return
        self._hand_over(cvm)

    async def reap_idle(self, now: float) -> None:
        """Stop instances idle longer than the idle timeout, down to the minimum (or one, when the
        function must not scale to zero)."""
        floor = self.scaling.min if self.scaling.scale_to_zero else max(self.scaling.min, 1)
        while (self.idle and self.replicas > floor
               and now - self.idle_since[self.idle[0]] >= self.scaling.idle_timeout):
            await self.stop_oldest_idle("idle: scaled to zero" if self.replicas == 1 else "idle")

    async def close(self) -> None:
        """Stop the template and the idle instances (busy ones stop when released)."""
        self.closed = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.cancel()
        while self.idle:
            await self.stop_oldest_idle("version retired")
        if self._template_ready is not None:
            if not self._template_ready.done():
                self._template_ready.cancel()
            elif not self._template_ready.cancelled() and self._template_ready.exception() is None:
                template = self._template_ready.result()
                if template is not None:  # None: the backend starts every instance fresh
                    template.kill()


def make_pool(intravisor: Intravisor, spec: FunctionSpec, scaling: Scaling) -> FunctionPool:
    return FunctionPool(intravisor, spec, scaling)


@hookimpl
def capfaas_pool_factory() -> Any:
    return make_pool
