"""Invocation timeouts on one coarse timer."""
from __future__ import annotations

import asyncio

from capfaas.core.deadlines import Deadlines


async def test_a_deadline_expires_once_soon_after_it_passes_and_an_unwatched_one_never() -> None:
    deadlines = Deadlines(resolution=0.005)
    loop = asyncio.get_running_loop()
    expired: list[tuple[str, float]] = []
    start = loop.time()
    deadlines.watch(start + 0.02, lambda: expired.append(("due", loop.time())))
    cancelled = deadlines.watch(start + 0.02, lambda: expired.append(("cancelled", loop.time())))
    deadlines.watch(start + 10, lambda: expired.append(("later", loop.time())))
    deadlines.unwatch(cancelled)
    await asyncio.sleep(0.1)
    assert [name for name, _ in expired] == ["due"]
    assert 0.02 <= expired[0][1] - start < 0.09


async def test_the_timer_runs_only_while_deadlines_are_pending() -> None:
    deadlines = Deadlines(resolution=0.005)
    key = deadlines.watch(asyncio.get_running_loop().time() + 10, lambda: None)
    assert deadlines._timer is not None
    deadlines.unwatch(key)
    await asyncio.sleep(0.02)  # the next check finds nothing pending and sets no timer
    assert deadlines._timer is None
