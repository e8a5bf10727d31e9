"""A complete invocation answered by callbacks, from its request to its outcome.

At thousands of invocations a second, a task per request and the coroutine levels between the
HTTP protocol and the cVM's reply cost the gateway more CPU than the rest of its work. Here the
pool hands over an instance (at once, or through the future of its queue), the intravisor sends
the invocation and calls back with the result, and the outcome goes to whoever writes the
response: no task and no coroutine. An invocation that must wait for an instance to start is left
to ``run_call`` (the outcome ``None`` says so), as is every request whose body is still arriving.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from capfaas.core.intravisor import Result, Running
from capfaas.plugins.pooling import PoolBusy

from .app import (Gateway, acquire_failed, begin_invocation, end_invocation, invocation_failed, new_scope,
                  not_found, retire)
from .calls import Call

Outcome = Any
"""What ``run_call`` returns: (deployed, result, cold, cvm), or the response that ended the call;
or None, when the call is ``run_call``'s to make."""

_ACQUIRING, _RUNNING, _ENDED = range(3)
LEAVE_GRACE = 0.1
"""Seconds a running invocation whose client went away may still answer, to keep its instance."""


class WarmCall:
    """One invocation with its whole body: ``begin`` it, and ``done(outcome)`` is called once
    (maybe before ``begin`` returns), unless it is cancelled first."""

    __slots__ = ("gateway", "call", "body", "done", "deployed", "cvm", "waiter", "running", "phase", "grace")

    def __init__(self, gateway: Gateway, call: Call, body: bytes, done: Callable[[Outcome], None]) -> None:
        self.gateway = gateway
        self.call = call
        self.body = body
        self.done = done
        self.deployed: Any = None
        self.cvm: Any = None
        self.waiter: asyncio.Future[Any] | None = None
        """The pool's future of an instance, while queued for one."""
        self.running: Running | None = None
        self.phase = _ACQUIRING
        self.grace: asyncio.TimerHandle | None = None
        """The wait for the reply after the client went away."""

    def begin(self) -> None:
        """Take an instance of the function's current version, and invoke it."""
        name = self.call.name
        deployed = self.gateway.service.get(name)
        if deployed is None:
            self._end(not_found(name))
            return
        take = getattr(deployed.pool, "take", None)  # a pool plugin may offer only ``acquire``
        if take is None:
            self._end(None)
            return
        try:
            taken = take()
        except PoolBusy as exc:
            self._end(acquire_failed(name, exc))
            return
        if taken is None:  # an instance must be started first
            self._end(None)
            return
        self.deployed = deployed
        if isinstance(taken, asyncio.Future):
            self.waiter = taken
            taken.add_done_callback(self._taken)
        else:
            self._invoke(taken)

    def cancel(self) -> None:
        """The client went away: an instance it waited for goes back to the pool. One running its
        invocation goes back too if its reply comes within ``LEAVE_GRACE`` (a quick function's
        usually does: a load generator that stops drops dozens at once); it is stopped otherwise,
        since its reply would come to the next caller."""
        phase, self.phase = self.phase, _ENDED
        if phase == _ACQUIRING and self.waiter is not None:
            self.waiter.cancel()  # one handed over already is given back when its callback runs
        elif phase == _RUNNING:
            self.grace = asyncio.get_running_loop().call_later(LEAVE_GRACE, self._give_up)

    def _give_up(self) -> None:
        """The reply did not come within the grace: the invocation is abandoned, its cVM stopped."""
        self.grace = None
        running, self.running = self.running, None
        if running is not None and self.gateway.intravisor.abandon(running):
            end_invocation(self.gateway)
            retire(self.gateway, self.deployed.pool, self.cvm, "the client went away during the invocation")
        # otherwise the intravisor is ending it (stopping its cVM): ``_result`` gives it back

    def _taken(self, waiter: asyncio.Future[Any]) -> None:
        self.waiter = None
        if waiter.cancelled():
            if self.phase != _ACQUIRING:
                return
            if self.deployed.pool.closed:  # a new version replaced this one: queue there
                self.begin()
            else:  # not a cancellation this code knows of: run_call's to make
                self._end(None)
            return
        error = waiter.exception()
        if self.phase != _ACQUIRING:  # cancelled after the pool handed an instance over
            if error is None:
                self.deployed.pool.release(waiter.result())
            return
        if error is not None:
            self._end(acquire_failed(self.call.name, error))
            return
        self._invoke(waiter.result())

    def _invoke(self, cvm: Any) -> None:
        self.cvm = cvm
        self.phase = _RUNNING
        gateway = self.gateway
        invocation = begin_invocation(gateway, self.deployed, self.call, self.body, None, new_scope(self.call.call_id))
        try:
            running = gateway.intravisor.dispatch(cvm, invocation, self._result)
        except Exception as exc:
            self._result(None, exc)
            return
        if self.phase == _RUNNING:  # not answered yet (kept only until then: the two refer to each other)
            self.running = running

    def _result(self, result: Result | None, error: Exception | None) -> None:
        self.running = None
        gateway = self.gateway
        end_invocation(gateway)
        if self.phase != _RUNNING:  # the client went away: its answer is dropped
            if self.grace is not None:
                self.grace.cancel()
                self.grace = None
            self.deployed.pool.release(self.cvm)  # a cVM stopped meanwhile is replaced
            return
        if error is not None:
            self._end(invocation_failed(gateway, self.deployed.pool, self.cvm, self.call, error))
            return
        self._end((self.deployed, result, False, self.cvm))

    def _end(self, outcome: Outcome) -> None:
        self.phase = _ENDED
        self.done(outcome)
