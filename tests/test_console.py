"""The intravisor's side of a cVM's console: output kept per invocation, hang-ups let go."""
from __future__ import annotations

import asyncio
import os

from capfaas.core.console import Console, console_pipes


async def test_output_is_kept_per_take_and_bounded() -> None:
    (out_r, out_w), (err_r, err_w) = console_pipes()
    console = Console(out_r, err_r, limit=8)
    os.write(out_w, b"hello, world")
    os.write(err_w, b"oops")
    assert console.take() == (b"hello, w\n[truncated 4 bytes]\n", b"oops")
    assert console.take() == (b"", b"")
    for fd in (out_w, err_w):
        os.close(fd)
    console.close()


async def test_a_hung_up_console_is_no_longer_watched() -> None:
    """A cVM that died leaves pipes that stay readable (end of file) until the intravisor closes
    them; watching them meanwhile would wake the event loop over and over."""
    (out_r, out_w), (err_r, err_w) = console_pipes()
    console = Console(out_r, err_r, limit=1 << 10)
    os.write(out_w, b"last words")
    os.close(out_w)
    os.close(err_w)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        await asyncio.sleep(0.01)
    assert not console.watched
    assert loop.remove_reader(out_r) is False and loop.remove_reader(err_r) is False
    assert console.take() == (b"last words", b"")
    console.close()
