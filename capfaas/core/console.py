"""A cVM's console: its stdout and stderr are pipes the intravisor reads, as Intravisor's monitor
serves a cVM's console hostcall.

The cVM writes with ordinary ``print``, ``logging`` or ``os.write(1, ...)``; nothing in the cVM
captures or buffers. The intravisor keeps the first ``limit`` bytes of each stream per invocation
and only counts the rest, so a function that floods its output costs CPU, never memory.
"""
from __future__ import annotations

import asyncio
import os
import select

CHUNK = 64 << 10
_NOTHING = (b"", b"")


class Stream:
    """One pipe's read end and what the current invocation wrote to it."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0
        self.closed = False
        os.set_blocking(fd, False)

    def read_available(self) -> bool:
        """Read what is in the pipe; True once every writer is gone (end of file)."""
        while not self.closed:
            try:
                chunk = os.read(self.fd, CHUNK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if not chunk:
                return True
            room = self.limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]
            self.dropped += max(0, len(chunk) - max(room, 0))
        return True

    def take(self) -> bytes:
        """What was read since the last take, with a marker if some of it was dropped."""
        if not self.kept and not self.dropped:  # the usual case: the function printed nothing
            return b""
        data = bytes(self.kept)
        if self.dropped:
            data += f"\n[truncated {self.dropped} bytes]\n".encode()
        self.kept.clear()
        self.dropped = 0
        return data


class Console:
    """The stdout and stderr of one cVM, read as they arrive on the event loop."""

    def __init__(self, stdout_fd: int, stderr_fd: int, limit: int) -> None:
        self.streams = (Stream(stdout_fd, limit), Stream(stderr_fd, limit))
        self.loop = asyncio.get_running_loop()
        self.pending = select.poll()
        self.watched: set[Stream] = set()
        for stream in self.streams:
            self.loop.add_reader(stream.fd, self._readable, stream)
            self.pending.register(stream.fd, select.POLLIN)
            self.watched.add(stream)

    def _readable(self, stream: Stream) -> None:
        if stream.read_available():  # the cVM is gone: a hung-up pipe stays readable, so stop watching
            self._unwatch(stream)

    def _unwatch(self, stream: Stream) -> None:
        if stream in self.watched:
            self.watched.discard(stream)
            self.loop.remove_reader(stream.fd)
            self.pending.unregister(stream.fd)

    def take(self, settled: bool = False) -> tuple[bytes, bytes]:
        """What each stream got since the last take. One poll, rather than a read per stream,
        finds out whether anything is still in the pipes: usually nothing is. ``settled``: the
        event loop has watched the pipes since the cVM last wrote to them (its reply came through
        the loop, after its output), so they were read already and need no poll."""
        if not settled:
            for fd, _ in self.pending.poll(0):
                for stream in self.streams:
                    if stream.fd == fd:
                        self._readable(stream)
        stdout, stderr = self.streams
        if stdout.kept or stderr.kept or stdout.dropped or stderr.dropped:
            return stdout.take(), stderr.take()
        return _NOTHING  # the usual case: the function printed nothing

    def close(self) -> None:
        """Keep what is already written (a crashed cVM's last words), then let go of the pipes."""
        for stream in self.streams:
            if stream.closed:
                continue
            stream.read_available()
            self._unwatch(stream)
            os.close(stream.fd)
            stream.closed = True


def console_pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """Two pipes (read end, write end) for a new cVM's stdout and stderr."""
    return os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
