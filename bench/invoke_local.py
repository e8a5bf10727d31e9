"""Invoking a warm cVM, against the IPC floor, and handing payloads over by capability or by copy.

Run: ``python bench/invoke_local.py`` (``--quick`` for a short run). Prints

1. round-trip latency (p50, p99) of a bare socketpair echo between two processes (the IPC floor)
   and of a no-op invocation intravisor -> warm cVM -> intravisor, and their ratios; the two are
   measured in alternating blocks, so both see the same drift of a shared machine;
2. for 1 KiB ... 64 MiB, the time to hand a payload already in shared memory to an echo function
   and get it back as a capability, against sending the same bytes through the control channel.

Figures and ratios only, never pass/fail.
"""
from __future__ import annotations

import os
import sys

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/http.py must not shadow the standard library's http (aiohttp imports it)

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from capfaas.core.backend import select_backend
from capfaas.core.cvm import CVM
from capfaas.core.intravisor import Intravisor, Invocation
from capfaas.core.spec import FunctionSpec, Limits
from capfaas.plugin_manager import make_plugin_manager

NOOP = "def handle(event, context):\n    return None\n"
ECHO = "def handle(event, context):\n    return event.capability or bytes(event.body)\n"
SIZES = [(1 << 10, "1 KiB"), (64 << 10, "64 KiB"), (1 << 20, "1 MiB"), (16 << 20, "16 MiB"), (64 << 20, "64 MiB")]
MESSAGE = b"x" * 96


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


BLOCKS = 10
"""Alternating blocks of floor and invocation round trips."""


class EchoPeer:
    """A child process that echoes what arrives on a socketpair: the IPC floor's other end."""

    def __init__(self) -> None:
        self.parent, child = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self.parent.close()
            while data := child.recv(4096):
                child.sendall(data)
            os._exit(0)
        child.close()

    def round_trips(self, rounds: int) -> list[float]:
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            self.parent.sendall(MESSAGE)
            self.parent.recv(4096)
            samples.append(time.perf_counter() - start)
        return samples

    def close(self) -> None:
        self.parent.close()
        os.waitpid(self.pid, 0)


def function(directory: Path, name: str, code: str) -> FunctionSpec:
    bundle = directory / name
    bundle.mkdir()
    (bundle / "fn.py").write_text(code)
    return FunctionSpec(name=name, bundle=bundle, module="fn.py", limits=Limits(memory=1 << 30, timeout=120))


async def invocation_latency(iv: Intravisor, cvm: CVM, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await iv.invoke(cvm, Invocation())
        samples.append(time.perf_counter() - start)
    return samples


async def handoff(iv: Intravisor, spec: FunctionSpec, quick: bool) -> list[tuple[str, float, float]]:
    """Median round trip per size: by capability on one cVM, by copy on another (so neither path
    leaves buffers behind that the other then pays for)."""
    by_cap_cvm = await iv.create(spec)
    by_copy_cvm = await iv.create(spec)
    repeat = 5 if quick else 20
    rows = []
    for size, label in SIZES:
        payload = os.urandom(size)
        cap, view = iv.receive_buffer(by_cap_cvm, size)
        view[:] = payload  # already in shared memory, as the gateway leaves a request body
        view.release()
        by_cap = await timed(iv, by_cap_cvm, lambda: Invocation(body=cap, length=size), size, repeat)
        by_copy = await timed(iv, by_copy_cvm, lambda: Invocation(body=payload, inline=True), size, repeat)
        rows.append((label, by_cap, by_copy))
    await iv.stop(by_cap_cvm)
    await iv.stop(by_copy_cvm)
    return rows


async def timed(iv: Intravisor, cvm, make, size: int, repeat: int) -> float:
    await iv.invoke(cvm, make())  # warm: first touches of the pages and buffers are not the path
    samples = []
    for _ in range(repeat):
        invocation = make()
        start = time.perf_counter()
        result = await iv.invoke(cvm, invocation)
        samples.append(time.perf_counter() - start)
        assert result.status == 200 and len(result.body) == size, result.error
    return statistics.median(samples)


async def run(quick: bool) -> None:
    rounds = 2000 if quick else 20000
    pm = make_plugin_manager()
    backend = select_backend([c for group in pm.hook.capfaas_backends() for c in group], "emulated")
    floor: list[float] = []
    invoke: list[float] = []
    peer = EchoPeer()  # forked before the intravisor starts
    try:
        with tempfile.TemporaryDirectory() as scratch:
            async with Intravisor(backend(), pm) as iv:
                cvm = await iv.create(function(Path(scratch), "noop", NOOP))
                await invocation_latency(iv, cvm, 100)  # warm
                for _ in range(BLOCKS):
                    floor += peer.round_trips(rounds // BLOCKS)
                    invoke += await invocation_latency(iv, cvm, rounds // BLOCKS)
                await iv.stop(cvm)
                rows = await handoff(iv, function(Path(scratch), "echo", ECHO), quick)
    finally:
        peer.close()
    print(f"no-op round trip over {rounds} calls (microseconds):")
    print(f"  socketpair echo (IPC floor): p50 {percentile(floor, .5) * 1e6:7.1f}   p99 {percentile(floor, .99) * 1e6:7.1f}")
    print(f"  intravisor -> cVM -> back:   p50 {percentile(invoke, .5) * 1e6:7.1f}   p99 {percentile(invoke, .99) * 1e6:7.1f}")
    print(f"  ratio to the floor:          p50 {percentile(invoke, .5) / percentile(floor, .5):6.2f}x"
          f"   p99 {percentile(invoke, .99) / percentile(floor, .99):6.2f}x")
    print("\nhanding a payload to an echo function and back (median, milliseconds):")
    for label, by_cap, by_copy in rows:
        print(f"  {label:>7}: capability {by_cap * 1e3:8.3f}   copy through the channel {by_copy * 1e3:9.3f}")
    first, last = rows[0], rows[-1]
    print(f"  {last[0]} / {first[0]}: capability {last[1] / first[1]:5.2f}x   copy {last[2] / first[2]:8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke run)")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the gateway's loop
        runner.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
