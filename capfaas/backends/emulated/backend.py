"""The emulated backend: one shared memfd segment and a template process that forks cVMs."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Any

from capfaas.core import wire
from capfaas.core.backend import Availability, Backend, BackendError, CVMProcess, LaunchRequest

from . import memory

START_TIMEOUT = 30.0
STDERR_TAIL = 16 << 10
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "CAPFAAS_PUREPYTHON", "CAPFAAS_DISABLE_PLUGIN_AUTOLOAD")
"""All the template inherits: nothing of the gateway's secrets reaches function code."""


class EmulatedProcess(CVMProcess):
    """A cVM forked by the template; it is not our child, so it is watched through a pidfd."""

    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ended: asyncio.Future[str]) -> None:
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self._ended = ended
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already gone: the template's exit report says how
            self._pidfd = None

    def kill(self) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.writer.close()

    async def wait(self) -> str:
        how = await asyncio.shield(self._ended)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return how


class EmulatedBackend(Backend):
    name = "emulated"
    priority = 10
    description = "software Morello capabilities: a shared memfd segment, one process per cVM"

    @classmethod
    def availability(cls) -> Availability:
        if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
            return Availability(False, "needs Linux with memfd_create")
        if not hasattr(os, "pidfd_open"):
            return Availability(False, "needs Linux 5.3 or newer (pidfd_open)")
        return Availability(True, f"software emulation, {memory.IMPLEMENTATION} hot path")

    def __init__(self) -> None:
        self.memory: Any = None
        self._template: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._launched: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[str]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self.stderr_tail = bytearray()

    async def start(self, segment_size: int) -> Any:
        self.memory = memory.TaggedMemory(segment_size)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
        self._template = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "capfaas.backends.emulated.template", str(theirs.fileno()),
            pass_fds=[theirs.fileno()], env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_reports(ready))
        self._drain = asyncio.create_task(self._drain_stderr())
        try:
            await asyncio.wait_for(ready, START_TIMEOUT)
        except (asyncio.TimeoutError, BackendError) as exc:
            await self.close()
            detail = bytes(self.stderr_tail).decode(errors="replace").strip().splitlines()
            raise BackendError(f"the emulated backend's template process did not start: "
                               f"{detail[-1] if detail else exc}") from None
        return self.memory

    async def _drain_stderr(self) -> None:
        """Keep the last few KiB of what the template and its cVMs write to fd 2, for diagnostics."""
        assert self._template is not None and self._template.stderr is not None
        while chunk := await self._template.stderr.read(1 << 16):
            self.stderr_tail += chunk
            del self.stderr_tail[:-STDERR_TAIL]

    async def _read_reports(self, ready: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                data = await loop.sock_recv(self._sock, 1 << 16)
            except OSError:
                data = b""
            if not data:
                if not ready.done():
                    ready.set_exception(BackendError("the template process exited"))
                for waiter in [*self._launched.values(), *self._exits.values()]:
                    if not waiter.done():
                        waiter.set_exception(BackendError("the template process exited"))
                return
            unpacker = wire.unpacker()
            unpacker.feed(data)
            for report in unpacker:
                op = report.get("op")
                if op == "ready" and not ready.done():
                    ready.set_result(None)
                elif op == "launched":
                    waiter = self._launched.pop(report["cvm"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(report["pid"])
                elif op == "exited":
                    ended = self._exits.setdefault(report["pid"], loop.create_future())
                    if not ended.done():
                        ended.set_result(report["how"])

    async def launch(self, request: LaunchRequest) -> CVMProcess:
        if self._sock is None:
            raise BackendError("the emulated backend is not started")
        loop = asyncio.get_running_loop()
        spec = request.spec
        message = {
            "op": "launch", "cvm_id": request.cvm_id, "segment_size": self.memory.size,
            "region": {"base": request.region.base, "size": request.region.size, "offset": request.region.offset},
            "ddc": request.ddc, "pcc": request.pcc,
            "spec": {"name": spec.name, "bundle": str(spec.bundle), "module": spec.module,
                     "handler": spec.handler, "signature": spec.signature, "env": dict(spec.env),
                     "secrets": dict(spec.secrets), "network": spec.network,
                     "limits": vars(spec.limits)},
        }
        ours, theirs = socket.socketpair()
        launched = self._launched[request.cvm_id] = loop.create_future()
        try:
            socket.send_fds(self._sock, [wire.pack(message)], [self.memory.fd, theirs.fileno()])
        finally:
            theirs.close()
        try:
            pid = await asyncio.wait_for(launched, START_TIMEOUT)
        except BaseException:
            ours.close()
            self._launched.pop(request.cvm_id, None)
            raise
        ended = self._exits.setdefault(pid, loop.create_future())
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        return EmulatedProcess(pid, reader, writer, ended)

    def forget(self, pid: int) -> None:
        """Drop the bookkeeping of a cVM that has ended."""
        self._exits.pop(pid, None)

    async def close(self) -> None:
        if self._template is not None and self._template.returncode is None:
            try:
                os.killpg(self._template.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._template.wait()
        for task in (self._reader, self._drain):
            if task is not None:
                task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
