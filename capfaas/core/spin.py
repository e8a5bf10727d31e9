"""Busy-waiting for a socket, for waits shorter than sleeping and being woken.

On a virtual machine a process that blocks and is woken pays tens of microseconds; a peer that
answers within a few is better waited for on the CPU. Both ends of a cVM's control channel do so,
each only when its last wait was that short.
"""
from __future__ import annotations

import select
import time


def spin_until_readable(readable: select.poll, deadline: float) -> bool:
    """Poll ``readable`` without blocking until it reports something or ``perf_counter`` passes
    ``deadline``; whether it did."""
    while not readable.poll(0):
        if time.perf_counter() >= deadline:
            return False
    return True
