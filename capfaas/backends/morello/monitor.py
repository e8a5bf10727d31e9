"""The supervisor of one Intravisor monitor: start it, read its output, notice when it gives up, kill it.

Intravisor prints the cVM's console among its own logs and LKL's kernel messages, and on most
errors it prints a line and spins instead of exiting. So the supervisor reads every line: framed
agent output (:mod:`.markers`) goes to the cVM's console pipes, which core's ``Console`` reads as
on every backend; agent statuses move the start-up along; everything else is the monitor's log,
kept in the run directory and, for error messages, as a short tail. A line Intravisor prints
before spinning kills the monitor at once; a monitor still running ``spin_grace`` seconds after
its cVM's program ended is taken as spinning and killed too.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from capfaas.core.console import console_pipes

from . import markers

LOG_LIMIT = 4 << 20
TAIL_LINES = 12
LINE_LIMIT = 64 << 10
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH")
"""All a monitor inherits; what runs inside a cVM cannot read the host environment anyway."""


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


class MonitorProcess:
    """One monitor process running one cVM (``intravisor -y cvm.yaml`` in its run directory)."""

    def __init__(self, argv: Sequence[str], run_dir: Path, *, spin_grace: float,
                 environ: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.run_dir = run_dir
        self.spin_grace = spin_grace
        source = os.environ if environ is None else environ
        self.env = {key: source[key] for key in PASSED_ENV if key in source}
        self.process: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.statuses: list[str] = []
        self.agent_errors: list[str] = []
        self.kill_reason: str | None = None
        self.on_sync: Callable[[int], None] | None = None
        self.console_fds: tuple[int, int] | None = None
        """Read ends of the cVM's stdout and stderr pipes, for core's Console."""
        self._out_w = self._err_w = -1
        self._log: IO[bytes] | None = None
        self._logged = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.exited: asyncio.Future[str] | None = None
        self.given_up: asyncio.Future[str] | None = None
        """Resolved with the monitor's line when Intravisor reports it has given up on the cVM."""
        self.agent_started: asyncio.Event = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.exited = loop.create_future()
        self.given_up = loop.create_future()
        (out_r, self._out_w), (err_r, self._err_w) = console_pipes()
        os.set_blocking(self._out_w, False)
        os.set_blocking(self._err_w, False)
        self.console_fds = (out_r, err_r)
        self._log = open(self.run_dir / "monitor.log", "wb")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.run_dir, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            self._close_pipes(read_ends=True)
            self._log.close()
            self.exited.set_result(f"could not be started: {exc.strerror or exc}")
            raise OSError(exc.errno, f"cannot start the monitor {self.argv[0]}: {exc.strerror or exc}") from None
        self.pid = self.process.pid
        assert self.process.stdout is not None and self.process.stderr is not None
        self._tasks = [asyncio.create_task(self._read(self.process.stdout, framed=True)),
                       asyncio.create_task(self._read(self.process.stderr, framed=False))]
        self._reaper = asyncio.create_task(self._reap())

    # -- output ------------------------------------------------------------------------------

    async def _read(self, stream: asyncio.StreamReader, framed: bool) -> None:
        pending = b""
        while True:
            chunk = await stream.read(1 << 16)
            if not chunk:
                if pending:
                    await self._line(pending, framed)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await self._line(line, framed)
            if len(pending) > LINE_LIMIT:
                await self._line(pending, framed)
                pending = b""

    async def _line(self, line: bytes, framed: bool) -> None:
        text, frame = markers.parse(line) if framed else (line.rstrip(b"\r"), None)
        if text.strip():
            self._noise(text)
        if frame is None:
            return
        if frame.kind == markers.STDOUT:
            await self._emit(self._out_w, frame.payload)
        elif frame.kind == markers.STDERR:
            await self._emit(self._err_w, frame.payload)
        elif frame.kind == markers.ERROR:
            self.agent_errors.append(frame.payload.decode("utf-8", "replace"))
            self._log_line(b"[capfaas agent error] " + frame.payload)
        else:
            self._status(frame.payload.decode("ascii", "replace"))

    def _noise(self, text: bytes) -> None:
        self._log_line(text)
        decoded = text.decode("utf-8", "replace").strip()
        self.tail.append(decoded)
        if decoded == markers.PROGRAM_EXIT:
            self.cvm_ended("its program exited")
        elif markers.fatal(decoded) and self.given_up is not None and not self.given_up.done():
            self.given_up.set_result(decoded)
            self.kill(f"the monitor reported {decoded!r} (Intravisor spins or exits on such errors)")

    def _status(self, status: str) -> None:
        self.statuses.append(status)
        self._log_line(b"[capfaas agent] " + status.encode())
        word, _, rest = status.partition(" ")
        if word == "agent":
            self.agent_started.set()
        elif word == "sync" and self.on_sync is not None and rest.isdigit():
            self.on_sync(int(rest))
        elif word == "exit":
            self.cvm_ended(f"its agent exited ({rest})")

    def _log_line(self, line: bytes) -> None:
        if self._log is None or self._log.closed or self._logged > LOG_LIMIT:
            return
        self._log.write(line + b"\n")
        self._logged += len(line) + 1
        if self._logged > LOG_LIMIT:
            self._log.write(b"[capfaas: log truncated]\n")
        self._log.flush()

    async def _emit(self, fd: int, data: bytes) -> None:
        """Into a console pipe; when it is full, let core's Console (on this loop) drain it."""
        while data and fd >= 0:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError:  # the Console is gone: the cVM is being stopped
                return

    # -- lifetime ----------------------------------------------------------------------------

    def cvm_ended(self, why: str) -> None:
        """The cVM's program is over; a monitor still running after the grace period is spinning."""
        if self._watchdog is not None or self.exited is None or self.exited.done():
            return
        self._log_line(f"[capfaas] the cVM ended: {why}".encode())
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(
            self.spin_grace, self.kill,
            f"the monitor kept running {self.spin_grace:g} s after {why} (Intravisor spins instead of exiting)")

    def kill(self, reason: str = "") -> None:
        """SIGKILL the monitor and everything it started; ``reason`` says why when it was not asked."""
        if self.process is None or self.process.returncode is not None:
            return
        if reason and self.kill_reason is None:
            self.kill_reason = reason
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _reap(self) -> None:
        assert self.process is not None and self.exited is not None
        returncode = await self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything it left behind
        except (ProcessLookupError, PermissionError):
            pass
        if self._watchdog is not None:
            self._watchdog.cancel()
        how = describe_status(returncode)
        if self.kill_reason:
            how += f": {self.kill_reason}"
        self.exited.set_result(how)

    async def wait(self) -> str:
        """How the monitor ended, once it has and all its output is read."""
        assert self.exited is not None
        how = await asyncio.shield(self.exited)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
            for task in self._tasks:
                task.cancel()
            self._tasks = []
        self._close_pipes(read_ends=False)
        if self._log is not None and not self._log.closed:
            self._log_line(f"[capfaas] monitor {how}".encode())
            self._log.close()
        return how

    def _close_pipes(self, read_ends: bool) -> None:
        for fd in (self._out_w, self._err_w):
            if fd >= 0:
                os.close(fd)
        self._out_w = self._err_w = -1
        if read_ends and self.console_fds is not None:
            for fd in self.console_fds:
                os.close(fd)
            self.console_fds = None

    def last_words(self) -> str:
        """What to quote in an error: the agent's own error if it reported one, else the log's tail."""
        if self.agent_errors:
            return f"the agent reported: {self.agent_errors[-1]}"
        lines = [line for line in self.tail if line]
        if not lines:
            return "the monitor printed nothing"
        return "last monitor output: " + " | ".join(lines[-3:])
