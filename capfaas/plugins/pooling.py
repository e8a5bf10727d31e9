"""Warm cVMs per function version, started single-flight, with a bounded queue in front.

A burst at a cold function starts only as many cVMs as it needs, up to the maximum; requests
beyond the instances and the queue are refused at once (the gateway answers 429 with
Retry-After) rather than left to time out.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

from capfaas.core.cvm import CVM, State
from capfaas.core.intravisor import Intravisor
from capfaas.core.spec import FunctionSpec
from capfaas.hookspecs import hookimpl


class PoolBusy(Exception):
    """Every instance is busy and the queue is full."""

    def __init__(self, name: str, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"function {name!r} is at its concurrency limit and its queue is full")


@dataclass(frozen=True)
class Scaling:
    min: int = 0
    max: int = 4
    queue: int = 64
    """Requests that may wait for an instance before the pool refuses more."""


class FunctionPool:
    """The cVMs of one function version."""

    def __init__(self, intravisor: Intravisor, spec: FunctionSpec, scaling: Scaling) -> None:
        self.intravisor = intravisor
        self.spec = spec
        self.scaling = scaling
        self.idle: collections.deque[CVM] = collections.deque()
        self.instances: set[CVM] = set()
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[CVM]] = collections.deque()
        self.cold_starts = 0
        self.closed = False

    @property
    def replicas(self) -> int:
        return len(self.instances) + self.starting

    @property
    def available(self) -> int:
        return len(self.idle)

    def adopt(self, cvm: CVM) -> None:
        """Take a ready cVM started elsewhere (the one that validated a deploy) as an idle instance."""
        self.instances.add(cvm)
        self._hand_over(cvm)

    async def acquire(self) -> tuple[CVM, bool]:
        """An idle instance, a new one, or a place in the queue; returns (cvm, cold)."""
        while self.idle:
            cvm = self.idle.popleft()
            if cvm.state is not State.STOPPED:
                return cvm, False
            self.instances.discard(cvm)
        if self.replicas < self.scaling.max:
            return await self._start(), True
        if len(self.waiters) >= self.scaling.queue:
            raise PoolBusy(self.spec.name, retry_after=max(1, int(self.spec.limits.timeout // 10) or 1))
        waiter: asyncio.Future[CVM] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter, False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    async def _start(self) -> CVM:
        self.starting += 1
        try:
            cvm = await self.intravisor.create(self.spec)
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
            cvm = self.idle.pop()
            self.instances.discard(cvm)
            await self.intravisor.stop(cvm, "scaled down")

    def release(self, cvm: CVM) -> None:
        """Give an instance back after an invocation; a stopped one is replaced on demand."""
        if self.closed:
            self.instances.discard(cvm)
            asyncio.ensure_future(self.intravisor.stop(cvm, "version retired"))
            return
        if cvm.state is State.STOPPED:
            self.instances.discard(cvm)
            if self.waiters and self.replicas < self.scaling.max:
                asyncio.ensure_future(self._start_for_waiter())
            return
        self._hand_over(cvm)

    def _hand_over(self, cvm: CVM) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(cvm)
                return
        self.idle.append(cvm)

    async def _start_for_waiter(self) -> None:
        try:
            cvm = await self._start()
        except Exception as exc:  # the waiter gets the error rather than hanging
            if self.waiters:
                self.waiters.popleft().set_exception(exc)
            return
        self._hand_over(cvm)

    async def close(self) -> None:
        """Stop every instance of this version (in-flight invocations finish first)."""
        self.closed = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.cancel()
        for cvm in list(self.idle):
            await self.intravisor.stop(cvm, "scaled down")
        self.idle.clear()


def make_pool(intravisor: Intravisor, spec: FunctionSpec, scaling: Scaling) -> FunctionPool:
    return FunctionPool(intravisor, spec, scaling)


@hookimpl
def capfaas_pool_factory() -> Any:
    return make_pool
