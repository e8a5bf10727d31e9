"""CPU placement: while the gateway is busy, its event loop keeps a CPU to itself.

The gateway is one event loop. A cVM woken on the loop's CPU either preempts it (a context switch
per invocation) or, under SCHED_BATCH, waits behind it for the rest of its time slice, holding a
reply the loop is waiting for: under a flood of quick invocations, both cost throughput and
lengthen the latency tail. So while the loop is busy it runs on one CPU and the cVMs on the others; once it is not
(functions doing real work, or nothing), everything shares every CPU again and no cVM loses a core.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from capfaas.core.backend import Backend

log = logging.getLogger("capfaas.gateway")

AUTO, SHARED, DEDICATED = "auto", "shared", "dedicated"
MODES = (AUTO, SHARED, DEDICATED)
INTERVAL = 0.5
"""Seconds between two readings of the gateway's CPU time."""
BUSY = 0.8
"""The share of one CPU the gateway used over an interval from which it takes a CPU of its own."""
IDLE = 0.4
"""The share below which it gives that CPU back (apart from BUSY, so that it does not flap)."""


@dataclass(frozen=True)
class Layout:
    """Where the gateway's event loop and the cVMs may run."""

    gateway: frozenset[int]
    cvms: frozenset[int]


def layouts(cpus: frozenset[int]) -> tuple[Layout, Layout] | None:
    """The shared layout and the dedicated one (the loop on the first CPU, the cVMs on the rest);
    None with a single CPU, where there is nothing to place."""
    if len(cpus) < 2:
        return None
    first = min(cpus)
    return Layout(cpus, cpus), Layout(frozenset((first,)), cpus - {first})


def dedicate(dedicated: bool, busy_share: float) -> bool:
    """Whether the loop should have its own CPU after an interval in which it used ``busy_share``
    of one, given whether it has one now."""
    return busy_share > IDLE if dedicated else busy_share >= BUSY


class Placement:
    """Applies a mode (``auto``, ``shared`` or ``dedicated``) to the calling thread's event loop
    and the backend's cVMs. Start it from the loop's thread: that thread is the one pinned."""

    def __init__(self, backend: Backend, mode: str = AUTO, *, interval: float = INTERVAL) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown CPU placement {mode!r}: choose one of {', '.join(MODES)}")
        self.backend = backend
        self.mode = mode
        self.interval = interval
        self.cpus = frozenset(os.sched_getaffinity(0))
        self.layouts = layouts(self.cpus)
        self.dedicated = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Dedicate a CPU now (``dedicated``) or watch the loop's load (``auto``)."""
        if self.layouts is None or self.mode == SHARED:
            return
        if self.mode == DEDICATED:
            self._apply(True)
        else:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        used, at = time.process_time(), loop.time()
        settling = False
        while True:
            await asyncio.sleep(self.interval)
            now_used, now = time.process_time(), loop.time()
            share = (now_used - used) / max(now - at, 1e-9)
            used, at = now_used, now
            wanted = dedicate(self.dedicated, share)
            if wanted != self.dedicated:
                if not self._apply(wanted):
                    return
                settling = True
            elif settling:  # once more: a cVM cloned while the change was made may have missed it
                self.backend.confine(self._layout(wanted).cvms)
                settling = False

    def _layout(self, dedicated: bool) -> Layout:
        assert self.layouts is not None
        return self.layouts[1] if dedicated else self.layouts[0]

    def _apply(self, dedicated: bool) -> bool:
        """Whether the layout could be applied (if not, the CPUs are left as they are)."""
        layout = self._layout(dedicated)
        try:
            if not self.backend.confine(layout.cvms) and dedicated:
                return False  # a backend that cannot move its cVMs: pinning the loop alone would only cost
            os.sched_setaffinity(0, layout.gateway)
        except OSError as exc:  # a CPU taken offline, a sandbox that forbids it
            log.warning("CPU placement stopped: %s", exc)
            return False
        self.dedicated = dedicated
        log.info("CPU placement: %s", f"the gateway on CPU {min(layout.gateway)}, cVMs on the others"
                 if dedicated else "the gateway and cVMs share every CPU")
        return True

    def close(self) -> None:
        """Stop watching, and share every CPU again."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.dedicated:
            self._apply(False)
