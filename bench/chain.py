"""Handing data from one function to another: CAP_Calls against HTTP, a pipe and a Unix socket.

Run: ``python bench/chain.py`` (``--quick`` for fewer sizes and rounds). Prints, for 1 KiB up to
256 MiB, the median time for function A to hand a payload to function B with ``context.call``
(measured inside A, around the call), against sending the same bytes to B through the gateway over
HTTP, and through a pipe and a Unix socket between two processes, all in this run. A copies the
payload into a shared buffer once (not timed) and hands it over five times; the first hand-over,
right after the copy evicted the caches, is reported on its own. Then the time of a 3-stage
sequence on a 64 MiB body. Figures, never pass/fail.
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

import aiohttp
import uvloop
from aiohttp.test_utils import TestServer

from capfaas.gateway.app import Settings, create_app
from capfaas.gateway.sequences import sequence_handler
from capfaas.gateway.server import close_gateway, open_gateway
from capfaas.registry import DeploymentRecord

SIZES = [(1 << 10, "1 KiB"), (1 << 20, "1 MiB"), (16 << 20, "16 MiB"), (64 << 20, "64 MiB"), (256 << 20, "256 MiB")]
SENDER = """
import time
PAYLOAD = memoryview(bytes(256 << 20))
SCRATCH = bytearray(256 << 20)
def handle(event, context):
    size = int(event.query["size"])
    data = context.share(PAYLOAD[:size])  # copied once into a shared buffer, not timed
    if event.query.get("evict"):  # write 256 MiB elsewhere, as copying a large payload in does
        SCRATCH[:] = PAYLOAD
    seconds = []
    for _ in range(HANDOVERS):
        start = time.perf_counter()
        answer = context.call("receiver", data)
        seconds.append(time.perf_counter() - start)
    return {"body": {"seconds": seconds, "received": int(answer.text)}}
""".replace("HANDOVERS", "5")
RECEIVER = "def handle(event, context):\n    return str(len(event.body))\n"
STAGE = "def handle(event, context):\n    return event.capability if event.capability is not None else event.body\n"


def through_pipe(size: int, rounds: int) -> float:
    return _between_processes(size, rounds, *os.pipe())


def through_socket(size: int, rounds: int) -> float:
    left, right = socket.socketpair()
    return _between_processes(size, rounds, left.detach(), right.detach())


def _between_processes(size: int, rounds: int, read_end: int, write_end: int) -> float:
    """Median time for a child to write ``size`` bytes that this process reads whole."""
    samples = []
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            payload = memoryview(bytes(size))
            written = 0
            while written < size:
                written += os.write(write_end, payload[written:written + (1 << 20)])
            os._exit(0)
        start = time.perf_counter()
        remaining = size
        while remaining:
            remaining -= len(os.read(read_end, min(remaining, 1 << 20)))
        samples.append(time.perf_counter() - start)
        os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    return statistics.median(samples)


async def run(quick: bool) -> None:
    sizes = SIZES[::2] if quick else SIZES
    rounds = 3 if quick else 7
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        gateway = await open_gateway(Settings(state_dir=Path(scratch), admin_password="bench",
                                              max_body=(256 << 20) + 1), "emulated")
        try:
            service = gateway.service
            big = {"memory": "2Gi", "timeout": 120}
            for name, source in (("sender", SENDER), ("receiver", RECEIVER), ("one", STAGE), ("two", STAGE), ("three", STAGE)):
                await service.deploy(DeploymentRecord(name=name, limits=big), {"handler.py": source.encode()},
                                     replace=False, max_bundle_bytes=1 << 20)
            server = TestServer(create_app(gateway), host="127.0.0.1")
            await server.start_server()
            await service.deploy(DeploymentRecord(name="pipeline", limits=big),
                                 {"handler.py": sequence_handler(["one", "two", "three"])},
                                 replace=False, max_bundle_bytes=1 << 20)
            rows = []
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                for size, label in sizes:
                    calls, firsts, http = [], [], []
                    for _ in range(rounds):
                        async with session.post(f"{server.make_url('/function/sender')}?size={size}") as response:
                            answer = await response.json()
                            assert answer["received"] == size, answer
                            firsts.append(answer["seconds"][0])
                            calls.extend(answer["seconds"][1:])
                        payload = bytes(size)
                        start = time.perf_counter()
                        async with session.post(server.make_url("/function/receiver"), data=payload) as response:
                            assert int(await response.text()) == size
                        http.append(time.perf_counter() - start)
                    rows.append((label, statistics.median(calls), statistics.median(firsts), statistics.median(http),
                                 through_pipe(size, rounds), through_socket(size, rounds)))
                evicted = []
                for _ in range(rounds):
                    async with session.post(f"{server.make_url('/function/sender')}?size=1024&evict=1") as response:
                        evicted.append((await response.json())["seconds"][0])
                body = bytes(64 << 20)
                sequence = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    async with session.post(server.make_url("/function/pipeline"), data=body) as response:
                        assert len(await response.read()) == len(body)
                    sequence.append(time.perf_counter() - start)
            await server.close()
        finally:
            await close_gateway(gateway)
    print("handing a payload from function A to function B (median, milliseconds):")
    print(f"  {'size':>8}  {'CAP_Calls':>10}  {'first call':>10}  {'HTTP via gateway':>16}  {'pipe':>9}  {'unix socket':>11}")
    for label, call, first_call, http, pipe, unix in rows:
        print(f"  {label:>8}  {call * 1e3:10.3f}  {first_call * 1e3:10.3f}  {http * 1e3:16.3f}  {pipe * 1e3:9.3f}"
              f"  {unix * 1e3:11.3f}")
    print("  (CAP_Calls: hand-overs of a payload already in shared memory; first call: the one right after A\n"
          "   wrote the payload, which pays for the caches that writing evicted)")
    print(f"  control: the first call of 1 KiB right after A wrote 256 MiB elsewhere: "
          f"{statistics.median(evicted) * 1e3:.3f} ms")
    first, last = rows[0], rows[-1]
    print(f"  {last[0]} / {first[0]} with CAP_Calls: {last[1] / first[1]:.1f}x (first call: {last[2] / first[2]:.1f}x)")
    for label, call, first_call, http, *_ in rows:
        print(f"  at {label}: CAP_Calls is {http / call:.1f}x faster than HTTP through the gateway "
              f"(first call: {http / first_call:.1f}x)")
    print(f"3-stage sequence on a 64 MiB body through the gateway: median {statistics.median(sequence) * 1e3:.1f} ms")
    print("CAP_Streams throughput against a pipe: bench/streams.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds (for a smoke run)")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
