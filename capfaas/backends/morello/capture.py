"""Inside the cVM: the function's stdout and stderr, framed onto the console the monitor prints.

fds 1 and 2 become pipes (so ``print``, ``logging`` and ``os.write(1, …)`` are all caught) and a
thread turns what arrives into :mod:`.markers` frames on the original console. Before the agent
sends a reply it calls :meth:`OutputCapture.drain`, which frames everything written so far; if
that produced frames, the agent waits until the host has read them (a console sync), so an
invocation's output is in its console pipes before its result reaches core.

Standard library only, like everything the agent runs before the function is loaded.
"""
from __future__ import annotations

import os
import select
import sys
import threading

from . import markers


class OutputCapture:
    """fds 1 and 2 redirected into pipes, framed onto ``console_fd`` by a reader thread."""

    def __init__(self, console_fd: int) -> None:
        self.console_fd = console_fd
        self._lock = threading.Lock()
        self._framed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sources: list[tuple[int, str]] = []
        for target, kind in ((1, markers.STDOUT), (2, markers.STDERR)):
            read_end, write_end = os.pipe()
            os.dup2(write_end, target)
            os.close(write_end)
            os.set_blocking(read_end, False)
            self._sources.append((read_end, kind))

    def write_console(self, frame: bytes) -> None:
        """One frame in one write (pipes keep writes of up to PIPE_BUF bytes whole)."""
        view = memoryview(frame)
        while view:
            view = view[os.write(self.console_fd, view):]

    def start(self) -> None:
        """Start framing in the background (after the library OS is entered: it wants one thread)."""
        self._thread = threading.Thread(target=self._run, name="capfaas-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fds = [fd for fd, _ in self._sources]
        while not self._stopping:
            try:
                readable, _, _ = select.select(fds, [], [], 0.5)
            except (OSError, ValueError):
                return
            if readable:
                self._pump()

    def _pump(self) -> bool:
        """Frame whatever the pipes hold now; True if anything was framed."""
        framed = False
        with self._lock:
            for fd, kind in self._sources:
                while True:
                    try:
                        data = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    if not data:
                        break
                    for frame in markers.output_frames(kind, data):
                        self.write_console(frame)
                    framed = True
            if framed:
                self._framed = True
        return framed

    def drain(self) -> bool:
        """Frame everything written so far; True if any output was framed since the last drain."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        self._pump()
        with self._lock:
            framed, self._framed = self._framed, False
        return framed

    def stop(self) -> None:
        self._stopping = True
        self.drain()
