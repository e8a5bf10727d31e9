"""CAP_Streams: the shared-memory ring against a pipe, between two processes and between two functions.

Run: ``python bench/streams.py`` (``--quick`` for a short run). A child process sends N MiB in
64 KiB writes to this process, through a ring (read with ``readinto`` a preallocated buffer) and
through a pipe (read with ``os.readv`` into the same kind of buffer). Then function A streams N MiB
in 64 KiB writes to function B with ``context.stream_call`` (two cVMs on the emulated backend, B
reading ``event.stream`` with ``readinto``), timed inside A. All in this run; prints each way's
median throughput over a few rounds and the ratios to the pipe. Figures, never pass/fail.
"""
from __future__ import annotations

import os
import sys

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/http.py must not shadow the standard library's http

import argparse
import asyncio
import json
import mmap
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from capfaas.core.intravisor import Invocation
from capfaas.core.ring import DEFAULT_CAPACITY, RingReader, RingWriter, create_ring
from capfaas.gateway.app import Settings
from capfaas.gateway.server import close_gateway, open_gateway
from capfaas.registry import DeploymentRecord

WRITE = 64 << 10
READ = 64 << 10


def _fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a child process that then exits; returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError("the sending child failed")


def through_ring(total: int, capacity: int) -> float:
    """Seconds from fork to the last byte, received by ``readinto`` from the ring."""
    fds = create_ring(capacity)

    def send() -> None:
        payload = memoryview(os.urandom(WRITE))
        with mmap.mmap(fds.memory, 0) as memory, RingWriter(memory, fds.data, fds.space) as writer:
            for _ in range(total // WRITE):
                writer.write(payload)

    try:
        buffer = bytearray(READ)
        received = 0
        start = time.perf_counter()
        pid = _fork(send)
        with mmap.mmap(fds.memory, 0) as memory, RingReader(memory, fds.data, fds.space) as reader:
            while n := reader.readinto(buffer):
                received += n
        elapsed = time.perf_counter() - start
        _reap(pid)
    finally:
        fds.close()
    if received != total:
        raise RuntimeError(f"the ring delivered {received} of {total} bytes")
    return elapsed


def through_pipe(total: int) -> float:
    """Seconds from fork to the last byte, received by ``os.readv`` from a pipe."""
    read_end, write_end = os.pipe()

    def send() -> None:
        os.close(read_end)
        payload = memoryview(os.urandom(WRITE))
        for _ in range(total // WRITE):
            done = 0
            while done < WRITE:
                done += os.write(write_end, payload[done:])

    try:
        buffer = bytearray(READ)
        received = 0
        start = time.perf_counter()
        pid = _fork(send)
        os.close(write_end)
        while n := os.readv(read_end, [buffer]):
            received += n
        elapsed = time.perf_counter() - start
        _reap(pid)
    finally:
        os.close(read_end)
    if received != total:
        raise RuntimeError(f"the pipe delivered {received} of {total} bytes")
    return elapsed


SOURCE = """
import time
CHUNK = memoryview(bytes(range(256)) * 256)
def handle(event, context):
    writes = int(event.query["writes"])
    start = time.perf_counter()
    with context.stream_call("sink") as stream:
        for _ in range(writes):
            stream.write(CHUNK)
    seconds = time.perf_counter() - start
    return {"body": {"seconds": seconds, "received": int(stream.result.text)}}
"""
SINK = """
BUFFER = bytearray(64 << 10)
def handle(event, context):
    total = 0
    while n := event.stream.readinto(BUFFER):
        total += n
    return str(total)
"""


async def between_functions(total: int, rounds: int) -> list[float]:
    """Seconds for function A to stream ``total`` bytes to function B, per round."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        gateway = await open_gateway(Settings(state_dir=Path(scratch), admin_password="bench"), "emulated")
        try:
            for name, source in (("source", SOURCE), ("sink", SINK)):
                await gateway.service.deploy(DeploymentRecord(name=name, limits={"timeout": 120}),
                                             {"handler.py": source.encode()}, replace=False, max_bundle_bytes=1 << 20)
            samples = []
            for _ in range(rounds):
                deployed = gateway.service.get("source")
                cvm, _ = await deployed.pool.acquire()
                try:
                    result = await gateway.intravisor.invoke(cvm, Invocation(query={"writes": str(total // WRITE)}))
                finally:
                    deployed.pool.release(cvm)
                answer = json.loads(bytes(result.body))
                if answer["received"] != total:
                    raise RuntimeError(f"the stream delivered {answer['received']} of {total} bytes")
                samples.append(answer["seconds"])
            return samples
        finally:
            await close_gateway(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB and 3 rounds (for a smoke run)")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="ring data bytes")
    args = parser.parse_args()
    mib = 128 if args.quick else 512
    rounds = 3 if args.quick else 5
    total = mib << 20
    ring, pipe = [], []
    for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
        ring.append(mib / through_ring(total, args.capacity))
        pipe.append(mib / through_pipe(total))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        functions = [mib / seconds for seconds in runner.run(between_functions(total, rounds))]
    ring_rate, pipe_rate = statistics.median(ring), statistics.median(pipe)
    functions_rate = statistics.median(functions)
    print(f"{mib} MiB in {WRITE >> 10} KiB writes, child to parent, median of {rounds} rounds")
    rows = ((f"ring ({args.capacity >> 10} KiB, readinto {READ >> 10} KiB)", ring_rate, ring),
            (f"pipe (readv {READ >> 10} KiB)", pipe_rate, pipe),
            ("function to function (stream_call)", functions_rate, functions))
    for label, rate, samples in rows:
        print(f"{label:<34} {rate:7.0f} MiB/s  (rounds: {', '.join(f'{sample:.0f}' for sample in samples)})")
    print(f"ring/pipe: {ring_rate / pipe_rate:.2f}x; function to function/pipe: {functions_rate / pipe_rate:.2f}x")


if __name__ == "__main__":
    main()
