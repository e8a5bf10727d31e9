"""The CAP_Stream ring: real processes, each with its own mapping of one memfd, and real eventfds."""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from capfaas.core.ring import RingFds, RingReader, RingWriter, create_ring, init_ring, ring_size


@pytest.fixture
def fds() -> Iterator[Callable[[int], RingFds]]:
    """Makes rings of a given capacity and closes their descriptors afterwards."""
    made: list[RingFds] = []

    def make(capacity: int) -> RingFds:
        made.append(create_ring(capacity))
        return made[-1]

    yield make
    for ring in made:
        ring.close()


def mapped(fds: RingFds) -> mmap.mmap:
    return mmap.mmap(fds.memory, 0)


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a child process; it exits 0 only if ``body`` returned."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def join(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child process failed (its traceback is in the captured stderr)"


def writer_process(fds: RingFds, chunks: list[bytes], delay: float = 0.0, linger: float = 0.0) -> int:
    """A child that maps the ring itself, waits ``delay``, writes ``chunks``, waits ``linger``, ends the stream."""

    def body() -> None:
        with mapped(fds) as memory, RingWriter(memory, fds.data, fds.space, timeout=30) as writer:
            time.sleep(delay)
            for chunk in chunks:
                assert writer.write(chunk) == len(chunk)
            time.sleep(linger)

    return fork(body)


def reader_process(fds: RingFds, expected: bytes, delay: float = 0.0) -> int:
    """A child that waits ``delay``, then reads the stream to its end and checks it is ``expected``."""

    def body() -> None:
        with mapped(fds) as memory, RingReader(memory, fds.data, fds.space, timeout=30) as reader:
            time.sleep(delay)
            assert reader.read() == expected

    return fork(body)


def test_round_trip_wraps_around_with_odd_sizes(fds) -> None:
    ring = fds(1000)
    payload = random.Random(1).randbytes(20_000)
    sizes = [1, 7, 999, 1000, 1001, 4321, 3, 2500]
    chunks, at = [], 0
    while at < len(payload):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(payload[at:at + size])
        at += size
    pid = writer_process(ring, chunks)
    received = bytearray()
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        for size in [13, 1000, 1, 777, 4096] * 1000:
            data = reader.read(size)
            if not data:
                break
            assert 0 < len(data) <= min(size, 1000)
            received += data
    join(pid)
    assert received == payload


def test_end_of_stream(fds) -> None:
    ring = fds(4096)
    pid = writer_process(ring, [b"abc"])
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        assert reader.read() == b"abc"
        assert reader.read() == b""
        assert reader.read(5) == b""
        assert reader.readinto(bytearray(5)) == 0
    join(pid)


def test_read_returns_what_is_there_without_waiting_for_more(fds) -> None:
    ring = fds(4096)
    pid = writer_process(ring, [b"0123456789"], linger=0.3)
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        assert reader.read(4) == b"0123"
        start = time.monotonic()
        assert reader.read(100) == b"456789"
        assert time.monotonic() - start < 0.4
        assert reader.read(0) == b""
        assert reader.read() == b""
    join(pid)


@pytest.mark.parametrize("how", ["read", "readinto"])
def test_one_call_reads_across_the_wrap(fds, how) -> None:
    ring = fds(1000)
    pid = writer_process(ring, [bytes(900), bytes(range(200))])
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        skip = bytearray(900)
        while skip:
            del skip[:reader.readinto(skip)]
        join(pid)  # the last 200 bytes now sit at the end of the ring and at its start
        if how == "read":
            assert reader.read(150) == bytes(range(150))
        else:
            target = bytearray(b"?" * 160)
            assert reader.readinto(memoryview(target)[5:155]) == 150
            assert target == b"?" * 5 + bytes(range(150)) + b"?" * 5
        assert reader.read() == bytes(range(150, 200))


def test_a_writer_into_a_full_ring_times_out(fds) -> None:
    ring = fds(4096)
    with mapped(ring) as ours, mapped(ring) as theirs, \
            RingWriter(ours, ring.data, ring.space, timeout=0.2) as writer, \
            RingReader(theirs, ring.data, ring.space) as reader:
        writer.write(bytes(4096))
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="reader made no room for 0.2 s"):
            writer.write(b"x")
        assert 0.2 <= time.monotonic() - start < 1.0
        assert len(reader.read(5000)) == 4096


def test_a_writer_waits_for_the_reader_then_completes(fds) -> None:
    ring = fds(4096)
    payload = random.Random(2).randbytes(3 * 4096 + 5)
    pid = reader_process(ring, payload, delay=0.2)
    with mapped(ring) as memory, RingWriter(memory, ring.data, ring.space, timeout=30) as writer:
        start = time.monotonic()
        assert writer.write(payload) == len(payload)
        assert 0.15 <= time.monotonic() - start < 4
    join(pid)


def test_a_closed_reader_breaks_the_pipe(fds) -> None:
    ring = fds(4096)

    def read_a_little() -> None:
        with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
            assert reader.read(10) == b"x" * 10

    pid = fork(read_a_little)
    with mapped(ring) as memory, RingWriter(memory, ring.data, ring.space, timeout=30) as writer:
        writer.write(b"x" * 10)
        join(pid)
        with pytest.raises(BrokenPipeError):
            writer.write(b"more")


def test_closing_the_reader_wakes_a_blocked_writer(fds) -> None:
    ring = fds(4096)

    def leave_later() -> None:
        with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30):
            time.sleep(0.1)

    with mapped(ring) as memory, RingWriter(memory, ring.data, ring.space, timeout=30) as writer:
        pid = fork(leave_later)
        start = time.monotonic()
        with pytest.raises(BrokenPipeError):
            writer.write(bytes(3 * 4096))
        assert time.monotonic() - start < 2
    join(pid)


def test_closing_the_writer_wakes_a_blocked_reader(fds) -> None:
    ring = fds(4096)
    pid = writer_process(ring, [], delay=0.1)
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        start = time.monotonic()
        assert reader.read(10) == b""
        assert time.monotonic() - start < 2
    join(pid)


def test_a_reader_times_out_when_nothing_arrives(fds) -> None:
    ring = fds(4096)
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=0.2) as reader:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="writer sent nothing for 0.2 s"):
            reader.readinto(bytearray(10))
        assert 0.2 <= time.monotonic() - start < 1.0


def test_64_mib_arrive_intact_between_processes(fds) -> None:
    ring = fds(1 << 20)
    payload = memoryview(random.Random(3).randbytes(64 << 20))

    def send() -> None:
        with mapped(ring) as memory, RingWriter(memory, ring.data, ring.space, timeout=30) as writer:
            at, step = 0, (64 << 10) + 17
            while at < len(payload):
                writer.write(payload[at:at + step])
                at += step

    pid = fork(send)
    digest, received = hashlib.sha256(), 0
    target = memoryview(bytearray((48 << 10) + 5))
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=30) as reader:
        while n := reader.readinto(target):
            digest.update(target[:n])
            received += n
    join(pid)
    assert received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()


def test_file_interfaces_compose(fds) -> None:
    ring = fds(4096)
    lines = [b"first\n", b"second\n", b"x" * 5000 + b"\n"]

    def send() -> None:
        with mapped(ring) as memory, io.BufferedWriter(RingWriter(memory, ring.data, ring.space, timeout=30)) as out:
            out.writelines(lines)

    pid = fork(send)
    with mapped(ring) as memory, io.BufferedReader(RingReader(memory, ring.data, ring.space, timeout=30)) as reader:
        assert list(reader) == lines
    join(pid)


def test_any_shared_memory_can_hold_a_ring() -> None:
    data, space = os.eventfd(0), os.eventfd(0)
    payload = bytes(range(256)) * 40
    try:
        with mmap.mmap(-1, ring_size(3000)) as memory:  # anonymous, shared with children by fork
            init_ring(memory, 3000)

            def send() -> None:
                with RingWriter(memory, data, space, timeout=30) as writer:
                    writer.write(payload)

            pid = fork(send)
            with RingReader(memory, data, space, timeout=30) as reader:
                assert reader.read() == payload
            join(pid)
    finally:
        os.close(data)
        os.close(space)


def test_ends_and_their_state_are_checked(fds) -> None:
    ring = fds(4096)
    with mapped(ring) as memory:
        writer = RingWriter(memory, ring.data, ring.space)
        reader = RingReader(memory, ring.data, ring.space)
        assert writer.writable() and not writer.readable()
        assert reader.readable() and not reader.writable()
        writer.close()
        reader.close()
        assert writer.closed and reader.closed
        with pytest.raises(ValueError, match="closed"):
            writer.write(b"x")
        with pytest.raises(ValueError, match="closed"):
            reader.read(1)


def test_a_corrupt_header_is_refused(fds) -> None:
    ring = fds(4096)
    with mapped(ring) as memory, RingReader(memory, ring.data, ring.space, timeout=1) as reader:
        memory[128:136] = (5000).to_bytes(8, "little")  # the writer's head, per the documented layout
        with pytest.raises(ValueError, match="corrupt ring: head 5000, tail 0, capacity 4096"):
            reader.read(1)


def test_bad_arguments_are_refused(fds) -> None:
    for capacity in (0, -1):
        with pytest.raises(ValueError, match="capacity must be positive"):
            create_ring(capacity)
    with pytest.raises(TypeError, match="must be an int"):
        ring_size(4.0)
    with pytest.raises(ValueError, match="needs 5096 bytes, the buffer has 5000"):
        init_ring(bytearray(5000), 1000)
    ring = fds(4096)
    with mapped(ring) as memory:
        with pytest.raises(ValueError, match="two descriptors"):
            RingWriter(memory, ring.data, ring.data)
        with pytest.raises(ValueError, match="timeout"):
            RingReader(memory, ring.data, ring.space, timeout=-1)
        with pytest.raises(ValueError, match="needs 8192 bytes, the buffer has 5000"):
            RingReader(bytearray(memory[:5000]), ring.data, ring.space)
    with pytest.raises(TypeError, match="writable"):
        RingWriter(bytes(8192), ring.data, ring.space)
    with pytest.raises(ValueError, match="at least 4096 header bytes"):
        RingWriter(bytearray(100), ring.data, ring.space)
    with pytest.raises(ValueError, match="no ring header"):
        RingReader(bytearray(8192), ring.data, ring.space)
