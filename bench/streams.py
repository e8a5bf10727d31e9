"""CAP_Stream transport: the shared-memory ring against a pipe, between two processes.

Run: ``python bench/streams.py`` (``--quick`` for a short run). A child process sends N MiB in
64 KiB writes to this process, through a ring (read with ``readinto`` a preallocated buffer) and
through a pipe (read with ``os.readv`` into the same kind of buffer), both in this run. Prints each
way's median throughput over a few rounds and their ratio. Figures, never pass/fail.
"""
from __future__ import annotations

import os
import sys

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/http.py must not shadow the standard library's http

import argparse
import mmap
import statistics
import time
from collections.abc import Callable

from capfaas.core.ring import DEFAULT_CAPACITY, RingReader, RingWriter, create_ring

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
    ring_rate, pipe_rate = statistics.median(ring), statistics.median(pipe)
    print(f"{mib} MiB in {WRITE >> 10} KiB writes, child to parent, median of {rounds} rounds")
    rows = ((f"ring ({args.capacity >> 10} KiB, readinto {READ >> 10} KiB)", ring_rate, ring),
            (f"pipe (readv {READ >> 10} KiB)", pipe_rate, pipe))
    for label, rate, samples in rows:
        print(f"{label:<34} {rate:7.0f} MiB/s  (rounds: {', '.join(f'{sample:.0f}' for sample in samples)})")
    print(f"ring/pipe: {ring_rate / pipe_rate:.2f}x")


if __name__ == "__main__":
    main()
