"""Invocation timeouts, checked on one coarse timer rather than a timer each.

Setting and cancelling an event loop timer costs about 3 µs on uvloop: at thousands of invocations
a second that was more than the rest of the intravisor's bookkeeping for a quick function. A
deadline is a dictionary entry here instead, and one timer, running only while deadlines are
pending, expires whatever is due every ``resolution`` seconds.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

RESOLUTION = 0.01
"""Seconds by which an expiry may come after its deadline."""


class Deadlines:
    """Pending deadlines (event loop time) and what to do when each passes."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, deadline: float, expire: Callable[[], None]) -> int:
        """Call ``expire`` once ``deadline`` has passed, unless ``unwatch`` comes first."""
        key = next(self._keys)
        self._pending[key] = (deadline, expire)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.resolution, self._check)
        return key

    def unwatch(self, key: int) -> None:
        self._pending.pop(key, None)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key in [key for key, (deadline, _) in self._pending.items() if deadline <= now]:
            _, expire = self._pending.pop(key)
            expire()
        self._timer = loop.call_later(self.resolution, self._check) if self._pending else None
