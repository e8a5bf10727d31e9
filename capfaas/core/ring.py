"""A one-writer, one-reader byte ring in shared memory: the transport behind CAP_Streams.

Each side maps the same memory (usually the memfd of ``create_ring``) and wraps its own mapping in
a ``RingWriter`` or a ``RingReader``. Two eventfds wake a side blocked on a full or an empty ring,
so the sides can be separate processes that received the descriptors over a Unix socket. The ring
never closes a descriptor or unmaps memory: whoever shared them owns them.

Layout: a 4096-byte header, then ``capacity`` data bytes. The header holds the magic and the
capacity (offset 0 and 8), the writer's u64 head (bytes ever written) and u64 end-of-stream flag
(128, 136), and the reader's u64 tail (bytes ever read) and u64 reader-gone flag (256, 264). Each
word has one writing side, and the two sides' words sit on separate cache lines. ``head - tail`` is
the fill and ``position % capacity`` the index, so no space is lost telling full from empty.

The counters are read and written through a memoryview of format ``Q``: one aligned 8-byte load
or store each, never torn (``struct.pack_into`` zeroes its target before filling it in, so a peer
could read 0 mid-store). The writer copies data before it stores head and the reader loads head
before it copies data (tail likewise, the other way round): x86-64 keeps that order (TSO); pure
Python has no fence to offer a weakly-ordered CPU.
"""
from __future__ import annotations

import fcntl
import io
import mmap
import os
import select
import struct
import time
from typing import NamedTuple

HEADER_SIZE = 4096
DEFAULT_CAPACITY = 4 << 20
DEFAULT_TIMEOUT = 30.0
MAGIC = b"CAPRING1"

_IDENTITY = struct.Struct("<8sQ")
_HEAD, _WRITER_CLOSED = 16, 17  # indices of u64 words: bytes 128 and 136
_TAIL, _READER_CLOSED = 32, 33  # bytes 256 and 264

Buffer = bytes | bytearray | memoryview | mmap.mmap


class RingFds(NamedTuple):
    """The descriptors one ring needs: its memory and the data- and space-available eventfds."""

    memory: int
    data: int
    space: int

    def close(self) -> None:
        for fd in self:
            os.close(fd)


def ring_size(capacity: int) -> int:
    """Bytes to map for a ring of ``capacity`` data bytes."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"ring capacity must be an int, not {type(capacity).__name__}")
    if capacity <= 0:
        raise ValueError(f"ring capacity must be positive, not {capacity}")
    return HEADER_SIZE + capacity


def init_ring(buffer: Buffer, capacity: int) -> None:
    """Write an empty ring's header into ``buffer``, for memory that was not made by ``create_ring``."""
    with memoryview(buffer) as view:
        if view.nbytes < ring_size(capacity):
            raise ValueError(f"a ring of capacity {capacity} needs {ring_size(capacity)} bytes, "
                             f"the buffer has {view.nbytes}")
        with view.cast("B") as flat:
            flat[:HEADER_SIZE] = _empty_header(capacity)


def create_ring(capacity: int = DEFAULT_CAPACITY, name: str = "capfaas-ring") -> RingFds:
    """A memfd holding an empty ring, and its two eventfds; map the memfd whole (length 0) on each side.

    The memfd is sealed against resizing, so no side can shrink it under another's mapping (SIGBUS).
    """
    header = _empty_header(capacity)
    fds: list[int] = []
    try:
        fds.append(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        os.ftruncate(fds[0], ring_size(capacity))
        os.pwrite(fds[0], header, 0)
        fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        for _ in range(2):
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return RingFds(*fds)


def _empty_header(capacity: int) -> bytes:
    return _IDENTITY.pack(MAGIC, ring_size(capacity) - HEADER_SIZE).ljust(HEADER_SIZE, b"\0")


class _RingEnd(io.RawIOBase):
    """What both ends share: the mapped ring, the eventfds and the bounded wait on the peer."""

    _header: memoryview | None = None
    _closed_flag: int

    def __init__(self, buffer: Buffer, notify_fd: int, wait_fd: int, timeout: float | None) -> None:
        super().__init__()
        if notify_fd == wait_fd:
            raise ValueError("the data and space eventfds must be two descriptors")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or at least 0, not {timeout}")
        with memoryview(buffer) as view:
            if view.readonly:
                raise TypeError("the ring buffer must be writable")
            with view.cast("B") as flat:
                if flat.nbytes < HEADER_SIZE:
                    raise ValueError(f"a ring needs at least {HEADER_SIZE} header bytes, the buffer has {flat.nbytes}")
                magic, capacity = _IDENTITY.unpack_from(flat)
                if magic != MAGIC:
                    raise ValueError("the buffer holds no ring header (use create_ring or init_ring)")
                if capacity <= 0 or flat.nbytes < HEADER_SIZE + capacity:
                    raise ValueError(f"a ring of capacity {capacity} needs {HEADER_SIZE + capacity} bytes, "
                                     f"the buffer has {flat.nbytes}")
                self._data = flat[HEADER_SIZE:HEADER_SIZE + capacity]
                self._header = flat[:HEADER_SIZE].cast("Q")
        self.capacity = capacity
        self.timeout = timeout
        self._notify_fd = notify_fd
        self._wait_fd = wait_fd
        self._poll = select.poll()
        self._poll.register(wait_fd, select.POLLIN)

    def _fill(self, head: int, tail: int) -> int:
        fill = head - tail
        if not 0 <= fill <= self.capacity:
            raise ValueError(f"corrupt ring: head {head}, tail {tail}, capacity {self.capacity}")
        return fill

    def _wait(self, deadline: float | None, why: str) -> None:
        """Block until the peer signals or ``deadline`` passes; the caller re-checks the counters.

        The eventfd keeps a signal sent after the caller's check and before this wait, so none is
        lost; it is drained before the caller looks again, so a later one still wakes the next wait.
        """
        if deadline is None:
            ready = self._poll.poll()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{why} for {self.timeout} s")
            ready = self._poll.poll(remaining * 1000)
        if ready:
            try:
                os.eventfd_read(self._wait_fd)
            except BlockingIOError:
                pass

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _notify(self) -> None:
        os.eventfd_write(self._notify_fd, 1)

    def close(self) -> None:
        """Raise this end's closed flag and wake the peer, which may be waiting on it."""
        if self._header is not None and not self.closed:
            try:
                self._header[self._closed_flag] = 1
                self._notify()
            finally:
                self._data.release()
                self._header.release()
                self._header = None
        super().close()


class RingWriter(_RingEnd):
    """The producing end: ``write`` copies into the ring, blocking while it is full.

    ``timeout`` bounds each wait for the reader to make room, not a whole call; ``None`` waits
    forever. Closing this end ends the stream: the reader gets what was written, then EOF. Close it
    before unmapping the buffer.
    """

    _closed_flag = _WRITER_CLOSED

    def __init__(self, buffer: Buffer, data_fd: int, space_fd: int, *,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        super().__init__(buffer, data_fd, space_fd, timeout)
        self._head = self._header[_HEAD]

    def writable(self) -> bool:
        return True

    def write_some(self, b: Buffer) -> int:
        """Copy as much of ``b`` as fits now, without waiting; returns how much (0 when full).

        For a writer on an event loop, which waits for room on the space eventfd itself."""
        if self.closed:
            raise ValueError("write to a closed ring writer")
        if self._header[_READER_CLOSED]:
            raise BrokenPipeError("the ring's reader has closed")
        with memoryview(b) as view, view.cast("B") as source:
            head = self._head
            n = min(self.capacity - self._fill(head, self._header[_TAIL]), source.nbytes)
            if n:
                start = head % self.capacity
                first = min(n, self.capacity - start)
                self._data[start:start + first] = source[:first]
                if first < n:
                    self._data[:n - first] = source[first:n]
                self._head = head + n
                self._header[_HEAD] = self._head
                self._notify()
        return n

    @property
    def space_fd(self) -> int:
        """The eventfd the reader signals when it makes room."""
        return self._wait_fd

    def write(self, b: Buffer) -> int:
        """Copy all of ``b`` into the ring; bytes already published stay published if this raises."""
        if self.closed:
            raise ValueError("write to a closed ring writer")
        with memoryview(b) as view, view.cast("B") as source:
            size = source.nbytes
            done = 0
            deadline = None
            data, capacity = self._data, self.capacity
            while done < size:
                if self._header[_READER_CLOSED]:
                    raise BrokenPipeError("the ring's reader has closed")
                head = self._head
                room = capacity - self._fill(head, self._header[_TAIL])
                if not room:
                    if deadline is None:
                        deadline = self._deadline()
                    self._wait(deadline, "the ring's reader made no room")
                    continue
                n = min(room, size - done)
                start = head % capacity
                first = min(n, capacity - start)
                data[start:start + first] = source[done:done + first]
                if first < n:
                    data[:n - first] = source[done + first:done + n]
                self._head = head + n
                self._header[_HEAD] = self._head
                self._notify()
                done += n
                deadline = None
        return size


class RingReader(_RingEnd):
    """The consuming end: ``read`` and ``readinto`` take what is there, blocking while the ring is empty.

    ``timeout`` bounds each wait for the writer, ``None`` waits forever. Closing this end makes the
    writer's next write raise ``BrokenPipeError``. Close it before unmapping the buffer.
    """

    _closed_flag = _READER_CLOSED

    def __init__(self, buffer: Buffer, data_fd: int, space_fd: int, *,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        super().__init__(buffer, space_fd, data_fd, timeout)
        self._tail = self._header[_TAIL]

    def readable(self) -> bool:
        return True

    def _available(self) -> int:
        """Bytes ready to read, waiting for at least one; 0 only at the end of the stream."""
        if self.closed:
            raise ValueError("read from a closed ring reader")
        deadline = None
        while True:
            fill = self._fill(self._header[_HEAD], self._tail)
            if fill:
                return fill
            if self._header[_WRITER_CLOSED]:
                return self._fill(self._header[_HEAD], self._tail)  # writes before the close
            if deadline is None:
                deadline = self._deadline()
            self._wait(deadline, "the ring's writer sent nothing")

    def _consumed(self, n: int) -> None:
        self._tail += n
        self._header[_TAIL] = self._tail
        self._notify()

    def read_ready(self, size: int) -> bytes | None:
        """Up to ``size`` bytes that are there now, without waiting: None when there are none yet,
        b"" at the end of the stream. For a reader on an event loop, which waits on ``data_fd``."""
        if self.closed:
            raise ValueError("read from a closed ring reader")
        fill = self._fill(self._header[_HEAD], self._tail)
        if not fill:
            if not self._header[_WRITER_CLOSED]:
                return None
            fill = self._fill(self._header[_HEAD], self._tail)  # writes before the close
            if not fill:
                return b""
        n = min(fill, size)
        start = self._tail % self.capacity
        first = min(n, self.capacity - start)
        out = self._data[start:start + n].tobytes() if first == n else \
            b"".join((self._data[start:], self._data[:n - first]))
        self._consumed(n)
        return out

    @property
    def data_fd(self) -> int:
        """The eventfd the writer signals when it publishes bytes or ends the stream."""
        return self._wait_fd

    def readinto(self, buffer: Buffer) -> int:
        """Copy up to ``len(buffer)`` ready bytes straight from the ring; 0 at the end of the stream."""
        with memoryview(buffer) as view, view.cast("B") as target:
            if not target.nbytes:
                return 0
            n = min(self._available(), target.nbytes)
            start = self._tail % self.capacity
            first = min(n, self.capacity - start)
            target[:first] = self._data[start:start + first]
            if first < n:
                target[first:n] = self._data[:n - first]
        self._consumed(n)
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` ready bytes (all of the stream if negative); b"" at the end of the stream."""
        if size is None or size < 0:
            return self.readall()
        if not size:
            return b""
        n = min(self._available(), size)
        start = self._tail % self.capacity
        first = min(n, self.capacity - start)
        if first == n:
            out = self._data[start:start + n].tobytes()
        else:
            out = b"".join((self._data[start:], self._data[:n - first]))
        self._consumed(n)
        return out

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(self.capacity):
            chunks.append(chunk)
        return b"".join(chunks)
