"""The emulated backend: one shared memfd segment and a template process that forks cVMs."""
from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from capfaas.core import wire
from capfaas.core.console import Console, console_pipes
from capfaas.core.control import ControlChannel, buffer_limit
from capfaas.core.backend import (Availability, Backend, BackendError, CVMProcess, LaunchRequest, TemplateFailed,
                                  TemplateProcess)
from capfaas.core.spec import FunctionSpec
from capfaas.core.spin import spin_until_readable

from . import memory

START_TIMEOUT = 30.0
STDERR_TAIL = 16 << 10
SPIN_READ = 64 << 10
"""Bytes of a quick reply read straight from the control socket; the rest comes through the loop."""
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "CAPFAAS_PUREPYTHON", "CAPFAAS_DISABLE_PLUGIN_AUTOLOAD")
"""All the template inherits: nothing of the gateway's secrets reaches function code."""


def session_members(session: int) -> list[int]:
    """The processes of ``session`` (read from /proc: a cVM is not this process's child)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                line = stat.read()
        except OSError:  # ended meanwhile
            continue
        fields = line[line.rindex(b")") + 2:].split()  # after the command, which may hold anything
        if int(fields[3]) == session:
            members.append(int(name))
    return members


class EmulatedProcess(CVMProcess):
    """A cVM forked by the template; it is not our child, so it is watched through a pidfd."""

    def __init__(self, pid: int, channel: ControlChannel, control: socket.socket, ended: asyncio.Future[str],
                 console: Console, grant_channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        self.console = console
        self.grant_channel = grant_channel
        self.control = control
        """The control channel's socket itself (a spare clone's region is sent on it with its fd)."""
        self._control_fd = control.fileno()
        self._readable = select.poll()
        self._readable.register(self._control_fd, select.POLLIN)
        self._spin_buffer = bytearray(SPIN_READ)
        self._ended = ended
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already gone: the template's exit report says how
            self._pidfd = None

    @property
    def exited(self) -> bool:
        return self._ended.done()

    def read_reply(self, seconds: float) -> bytes | memoryview | None:
        if not spin_until_readable(self._readable, time.perf_counter() + seconds):
            return None
        try:
            received = os.readv(self._control_fd, [self._spin_buffer])
        except BlockingIOError:
            return None
        except ConnectionError:
            return b""
        return memoryview(self._spin_buffer)[:received]

    def kill(self) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.channel.close()
        self.grant_channel.close()

    async def wait(self) -> str:
        how = await asyncio.shield(self._ended)
        self.console.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return how


async def _reported(pid: asyncio.Future[int], *undo: Callable[[], object]) -> int:
    """The pid a template reports; on a failure or timeout, undo what was prepared."""
    try:
        async with asyncio.timeout(START_TIMEOUT):
            return await pid
    except BaseException:
        for step in undo:
            step()
        raise


async def _attach(pid: int, sock: socket.socket, grant_channel: socket.socket, stdout_fd: int, stderr_fd: int,
                  output_limit: int, ended: asyncio.Future[str]) -> EmulatedProcess:
    """The intravisor's side of a started cVM: its console, its control and grant channels."""
    console = Console(stdout_fd, stderr_fd, output_limit)
    channel = ControlChannel(buffer_limit(output_limit))
    await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=sock)
    grant_channel.setblocking(False)  # a cVM that stops taking its grants must not stall the intravisor
    return EmulatedProcess(pid, channel, sock, ended, console, grant_channel)


def grant_channel_pair() -> tuple[socket.socket, socket.socket]:
    """The intravisor's end and the cVM's end of a cVM's grant channel (one descriptor per message)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def spec_to_wire(spec: FunctionSpec) -> dict[str, Any]:
    return {"name": spec.name, "bundle": str(spec.bundle), "module": spec.module, "handler": spec.handler,
            "signature": spec.signature, "env": dict(spec.env), "secrets": dict(spec.secrets),
            "network": spec.network, "limits": vars(spec.limits)}


_discarding: set[asyncio.Future[None]] = set()
"""Spare clones being stopped (kept referenced until done)."""


class EmulatedTemplate(TemplateProcess):
    """A function template process; instances are forked from it on request."""

    def __init__(self, backend: EmulatedBackend, sock: socket.socket, pid: int, ended: asyncio.Future[str],
                 output_limit: int) -> None:
        self.backend = backend
        self.sock = sock
        self.pid = pid
        self.ended = ended
        self.output_limit = output_limit
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._forked: dict[int, asyncio.Future[int]] = {}
        self._spares: list[asyncio.Future[EmulatedProcess]] = []
        """Clones the template forked ahead of need, each given its channels and console as soon
        as it is announced: all a cold start still sends one is its region."""
        self._reader = asyncio.ensure_future(self._read())

    async def started(self) -> None:
        """Wait until the function is loaded; FunctionLoadError-style reports raise TemplateFailed."""
        try:
            report = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except asyncio.TimeoutError:
            self.kill()
            raise BackendError("the function template did not become ready in time") from None
        if report.get("op") != "ready":
            self.kill()
            raise TemplateFailed(report.get("error") or {})

    async def _receive(self) -> tuple[bytes, list[int]]:
        """The template's next report and the descriptor it may carry (a spare clone's socket)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
                return data, fds
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(self.sock, lambda: readable.done() or readable.set_result(None))
                try:
                    await readable
                finally:
                    loop.remove_reader(self.sock)
            except OSError:
                return b"", []

    async def _read(self) -> None:
        while True:
            data, fds = await self._receive()
            if not data:
                how = "the template ended"
                if not self._ready.done():
                    self._ready.set_result({"op": "failed", "error": {"type": "TemplateDied", "message": how}})
                for waiter in self._forked.values():
                    if not waiter.done():
                        waiter.set_exception(BackendError(f"the function template ended: {how}"))
                return
            unpacker = wire.unpacker()
            unpacker.feed(data)
            for report in unpacker:
                op = report.get("op")
                if op in ("ready", "failed") and not self._ready.done():
                    self._ready.set_result(report)
                elif op == "spare" and len(fds) == 1:
                    handoff = socket.socket(fileno=fds.pop())
                    self._spares.append(asyncio.ensure_future(self._prepare_spare(report["pid"], handoff)))
                elif op == "forked":
                    waiter = self._forked.pop(report["cvm"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(report["pid"])
                elif op == "exited" and not self.backend.unwatched(report["pid"]):
                    ended = self.backend.exit_future(report["pid"])
                    if not ended.done():
                        ended.set_result(report["how"])
            for fd in fds:
                os.close(fd)

    async def fork(self, request: LaunchRequest) -> CVMProcess:
        """An instance: a spare clone given its region, or a clone forked now, whose region and
        console travel on its control socket before it is even forked, so it finds them at once."""
        region = {"op": "region", "segment_size": self.backend.memory.size, "ddc": request.ddc, "pcc": request.pcc,
                  "region": {"base": request.region.base, "size": request.region.size, "offset": request.region.offset}}
        spare = await self._take_spare()
        if spare is not None:
            assert spare.control is not None
            socket.send_fds(spare.control, [wire.pack(region)], [self.backend.memory.fd])
            try:  # told after the region is sent: the instance runs first, then the template wakes
                self.sock.send(wire.pack({"op": "spare-taken"}))
            except OSError:
                pass
            return spare
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        grants_ours, grants_theirs = grant_channel_pair()
        (out_r, out_w), (err_r, err_w) = console_pipes()
        forked = self._forked[request.cvm_id] = loop.create_future()
        try:
            socket.send_fds(ours, [wire.pack(region)], [self.backend.memory.fd, out_w, err_w, grants_theirs.fileno()])
            socket.send_fds(self.sock, [wire.pack({"op": "fork", "cvm_id": request.cvm_id})], [theirs.fileno()])
        finally:
            for fd in (theirs.detach(), grants_theirs.detach(), out_w, err_w):
                os.close(fd)
        pid = await _reported(forked, lambda: self._forked.pop(request.cvm_id, None), ours.close,
                              grants_ours.close, lambda: os.close(out_r), lambda: os.close(err_r))
        return await _attach(pid, ours, grants_ours, out_r, err_r, self.output_limit, self.backend.exit_future(pid))

    async def _prepare_spare(self, pid: int, handoff: socket.socket) -> EmulatedProcess:
        """Give a new spare clone its control and grant channels and its console, and attach them."""
        ours, theirs = socket.socketpair()
        grants_ours, grants_theirs = grant_channel_pair()
        (out_r, out_w), (err_r, err_w) = console_pipes()
        try:
            socket.send_fds(handoff, [b"attach"], [theirs.fileno(), out_w, err_w, grants_theirs.fileno()])
        except OSError:  # the clone is already gone
            for fd in (ours.detach(), grants_ours.detach(), out_r, err_r):
                os.close(fd)
            self.backend.unwatch(pid)
            raise
        finally:
            handoff.close()
            for fd in (theirs.detach(), grants_theirs.detach(), out_w, err_w):
                os.close(fd)
        return await _attach(pid, ours, grants_ours, out_r, err_r, self.output_limit, self.backend.exit_future(pid))

    async def _take_spare(self) -> EmulatedProcess | None:
        """A prepared spare clone that is still alive, or None."""
        while self._spares:
            try:
                spare = await self._spares.pop()
            except OSError:
                continue
            if spare.exited or spare.channel.ended:  # it died while it waited
                spare.kill()
                continue
            return spare
        return None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reader.cancel()
        self.sock.close()
        for prepared in self._spares:  # nobody will take these clones now
            task = asyncio.ensure_future(self._discard(prepared))
            _discarding.add(task)
            task.add_done_callback(_discarding.discard)
        self._spares.clear()

    async def _discard(self, prepared: asyncio.Future[EmulatedProcess]) -> None:
        """Stop a spare clone nobody will take, and let go of its console and channels."""
        try:
            spare = await prepared
        except OSError:
            return
        spare.kill()
        await spare.wait()
        if spare.pid is not None:
            self.backend.forget(spare.pid)


class EmulatedBackend(Backend):
    name = "emulated"
    priority = 10
    shares_objects = True
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
        self._unwatched: set[int] = set()
        """Spare clones that will never become cVMs: nobody waits for their exit."""
        self._reader: asyncio.Task[None] | None = None
        self._template_ids = 0
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
                for waiter in self._launched.values():
                    if not waiter.done():
                        waiter.set_exception(BackendError("the template process exited"))
                for ended in self._exits.values():
                    if not ended.done():
                        ended.set_result("lost: the template process exited")
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
                elif op == "exited" and not self.unwatched(report["pid"]):
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
            "spec": spec_to_wire(spec),
        }
        ours, theirs = socket.socketpair()
        grants_ours, grants_theirs = grant_channel_pair()
        (out_r, out_w), (err_r, err_w) = console_pipes()
        launched = self._launched[request.cvm_id] = loop.create_future()
        try:
            socket.send_fds(self._sock, [wire.pack(message)],
                            [self.memory.fd, theirs.fileno(), out_w, err_w, grants_theirs.fileno()])
        finally:
            theirs.close()
            grants_theirs.close()
            os.close(out_w)
            os.close(err_w)
        pid = await _reported(launched, lambda: self._launched.pop(request.cvm_id, None), ours.close,
                              grants_ours.close, lambda: os.close(out_r), lambda: os.close(err_r))
        return await _attach(pid, ours, grants_ours, out_r, err_r, request.spec.limits.output, self.exit_future(pid))

    async def launch_template(self, spec: FunctionSpec, region_size: int) -> EmulatedTemplate:
        """Start a function template: the function imported and initialised once, ready to fork."""
        if self._sock is None:
            raise BackendError("the emulated backend is not started")
        loop = asyncio.get_running_loop()
        self._template_ids -= 1
        key = self._template_ids
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        launched = self._launched[key] = loop.create_future()
        try:
            socket.send_fds(self._sock, [wire.pack({"op": "template", "cvm_id": key, "region_size": region_size,
                                                     "spec": spec_to_wire(spec)})], [theirs.fileno()])
        finally:
            theirs.close()
        pid = await _reported(launched, lambda: self._launched.pop(key, None), ours.close)
        template = EmulatedTemplate(self, ours, pid, self._exits.setdefault(pid, loop.create_future()),
                                    spec.limits.output)
        await template.started()
        return template

    def exit_future(self, pid: int) -> asyncio.Future[str]:
        """Resolved with how ``pid`` ended, whoever reports it (its template or the generic one)."""
        return self._exits.setdefault(pid, asyncio.get_running_loop().create_future())

    def unwatch(self, pid: int) -> None:
        """Nobody will wait for ``pid``'s exit (a spare clone let go): do not keep its report."""
        self._exits.pop(pid, None)
        self._unwatched.add(pid)

    def unwatched(self, pid: int) -> bool:
        """Whether ``pid``'s exit report is to be dropped (and forget it from now on)."""
        if pid in self._unwatched:
            self._unwatched.discard(pid)
            return True
        return False

    def forget(self, pid: int) -> None:
        """Drop the bookkeeping of a cVM that has ended."""
        self._exits.pop(pid, None)

    def confine(self, cpus: frozenset[int]) -> bool:
        """Every thread of the template's session: the template, the function templates and the
        cVMs they clone, which inherit the CPUs of the template they are cloned from."""
        if self._template is None or self._template.returncode is not None:
            return False
        for pid in session_members(self._template.pid):
            try:
                for thread in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(thread), cpus)
            except (FileNotFoundError, ProcessLookupError, PermissionError):  # ended meanwhile, or not ours
                continue
        return True

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
