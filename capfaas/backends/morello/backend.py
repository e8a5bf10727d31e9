"""The Morello backend: real CHERI capabilities through Intravisor on CheriBSD, one monitor per cVM.

Intravisor reads one YAML at start-up and cannot take cVMs afterwards, while the pool starts and
stops instances one at a time. So each cVM gets its own monitor: its own run directory, YAML
naming that one cVM, copy of the disk image (two LKL instances must not mount one ext4 image),
and process, which can be killed alone when its cVM times out or its monitor spins. Every start
is fresh: there is no template to clone (``launch_template`` stays None).

Inside the cVM, ``python -m capfaas.backends.morello.agent`` connects back over loopback, proves
itself with the one-time token from its YAML, receives its function (spec, bundle and the names of
its capfiles) and runs the same runtime as every backend. See docs/morello.md for what is and is
not verified.
"""
from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from capfaas import __version__
from capfaas.core.backend import Availability, Backend, BackendError, CVMProcess, LaunchRequest
from capfaas.core.console import Console
from capfaas.core.control import StreamControlChannel, buffer_limit
from capfaas.core.spec import FunctionSpec

from . import cvm_yaml
from .channel import Connection, ControlListener, InliningWriter, WatchedReader
from .config import ConfigError, MorelloConfig, load_config
from .declared import capfiles_for
from .detect import HostFacts, failed_check, failed_host_check, read_host
from .monitor import MonitorProcess
from .staging import StagingMemory

AGENT_MODULE = "capfaas.backends.morello.agent"
STAGING_BASE = 0x1000_0000_0000
MAX_BUNDLE = 256 << 20
PRIMITIVES: Mapping[str, str] = {
    "cap_files": "native: Intravisor capfiles a deployment declares, one set per cVM's monitor, opened "
                 "through /cap/cf1 and /cap/cf2",
    "cap_streams": "mediated: Intravisor's CAP_Streams return path is unfinished on Morello, so data "
                   "goes through the intravisor over the control channel (copied)",
    "cap_calls": "mediated: Intravisor's CAP_Calls return path is unfinished on Morello, so calls go "
                 "through the intravisor over the control channel",
}
"""How each sharing primitive of the paper is provided on this backend."""


class MonitorStartError(BackendError):
    """A monitor died, hung or gave up before its agent connected (worth another attempt)."""


def spec_to_wire(spec: FunctionSpec) -> dict[str, Any]:
    return {"name": spec.name, "module": spec.module, "handler": spec.handler, "signature": spec.signature,
            "env": dict(spec.env), "secrets": dict(spec.secrets), "network": spec.network,
            "limits": vars(spec.limits)}


def pack_bundle(bundle: Path) -> bytes:
    """The function's files as a stored (uncompressed) zip: loopback is faster than deflate."""
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(bundle.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                total += path.stat().st_size
                if total > MAX_BUNDLE:
                    raise BackendError(f"the bundle {bundle} is larger than {MAX_BUNDLE >> 20} MiB")
                archive.write(path, path.relative_to(bundle).as_posix())
    return buffer.getvalue()


def copy_image(source: str, target: Path) -> None:
    """A private copy of the disk image, cloned where the file system can (copy_file_range)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                done = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if done == 0:
                    break
                copied += done
        except (AttributeError, OSError):
            copied = 0
        if copied < size:
            src.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(src, dst, 1 << 20)


class MorelloProcess(CVMProcess):
    """A cVM as core sees it: its monitor process, its control connection, its console."""

    def __init__(self, backend: MorelloBackend, monitor: MonitorProcess, connection: Connection,
                 writer: InliningWriter, console: Console, request: LaunchRequest) -> None:
        self.backend = backend
        self.monitor = monitor
        self.pid = monitor.pid
        self.channel = StreamControlChannel(connection.reader, writer, buffer_limit(request.spec.limits.output))
        """Over the agent's connection; the writer inlines staged payloads."""
        self.console = console
        self.request = request
        self._ended: str | None = None

    def kill(self) -> None:
        self.monitor.kill()
        self.channel.close()

    async def wait(self) -> str:
        if self._ended is None:
            self._ended = await self.monitor.wait()
            self.console.close()
            self.channel.close()
            self.backend.finished(self.monitor, self.request)
        return self._ended


class MorelloBackend(Backend):
    name = "morello"
    priority = 100
    description = "Arm Morello hardware capabilities through Intravisor on CheriBSD, one monitor per cVM"
    primitives: ClassVar[Mapping[str, str]] = PRIMITIVES

    def __init__(self, config: MorelloConfig | None = None, host: HostFacts | None = None) -> None:
        """``config`` and ``host`` default to this machine's; tests inject both."""
        self._config = config
        self._host = host
        self.memory: StagingMemory | None = None
        self.listener: ControlListener | None = None
        self.processes: set[MorelloProcess] = set()
        self.starts = 0
        """Monitors started (attempts included): how tests and metrics see restarts."""

    @classmethod
    def availability(cls) -> Availability:
        facts = read_host()
        problem = failed_host_check(facts)
        if problem:
            return Availability(False, problem)
        try:
            config = load_config()
        except ConfigError as exc:
            return Availability(False, str(exc))
        problem = failed_check(facts, config)
        if problem:
            return Availability(False, problem)
        return Availability(True, f"Intravisor {config.intravisor}, runtime {os.path.basename(config.runtime or '')}, "
                                  f"CVM_MAX_SIZE {config.max_cvm_size:#x}")

    @property
    def config(self) -> MorelloConfig:
        if self._config is None:
            try:
                self._config = load_config()
            except ConfigError as exc:
                raise BackendError(str(exc)) from None
        return self._config

    @property
    def ready_timeout(self) -> float:  # type: ignore[override]  # configured, not fixed
        """The function's import runs inside the cVM, after LKL and Python started there: ``[morello]
        ready_timeout``, not the emulated backend's 30 s."""
        return self.config.ready_timeout

    async def start(self, segment_size: int) -> Any:
        config = self.config
        problem = failed_check(self._host if self._host is not None else read_host(), config)
        if problem:
            raise BackendError(f"backend 'morello' is not available here: {problem}")
        Path(config.work_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.listener = ControlListener(config.listen_host)
        await self.listener.start()
        self.memory = StagingMemory(segment_size, STAGING_BASE)
        return self.memory

    async def launch(self, request: LaunchRequest) -> CVMProcess:
        if self.listener is None or self.memory is None:
            raise BackendError("the morello backend is not started")
        config = self.config
        try:
            capfiles = [cvm_yaml.CapFile(**entry) for entry in request.settings.get("capfiles", ())]
        except TypeError:
            raise cvm_yaml.IntravisorConfigError("each CAP_File in settings['capfiles'] must be a mapping of "
                                                 "name, size and optionally data") from None
        capfiles += capfiles_for(request.spec)  # CapFilesUnsupported (a SpecError): a deploy's 400
        bundle = await asyncio.to_thread(pack_bundle, request.spec.bundle)
        failures: list[str] = []
        for attempt in range(1, config.start_attempts + 1):
            try:
                return await self._launch_once(request, capfiles, bundle, attempt)
            except MonitorStartError as exc:
                failures.append(str(exc))
        tried = f"{config.start_attempts} attempt{'s' if config.start_attempts > 1 else ''}"
        raise BackendError(f"cVM for {request.spec.name!r} did not start ({tried}): {failures[-1]}")

    def _yaml(self, request: LaunchRequest, capfiles: list[cvm_yaml.CapFile], token: str) -> str:
        config = self.config
        assert self.listener is not None
        program = (config.python, "-m", AGENT_MODULE, "--connect", f"{config.listen_host}:{self.listener.port}",
                   "--token", token, "--bundles", config.bundle_dir)
        cvm = cvm_yaml.CVM(name=f"capfaas{request.cvm_id}", runtime=os.path.basename(config.runtime or ""),
                           disk="disk.img", program=program, base=config.cvm_base, size=config.max_cvm_size)
        return cvm_yaml.render([cvm], capfiles, max_size=config.max_cvm_size)

    async def _launch_once(self, request: LaunchRequest, capfiles: list[cvm_yaml.CapFile], bundle: bytes,
                           attempt: int) -> MorelloProcess:
        config = self.config
        assert self.listener is not None and config.runtime and config.disk and config.intravisor
        token, connected = self.listener.expect()
        run_dir = Path(config.work_dir) / f"cvm{request.cvm_id}-{attempt}-{secrets.token_hex(3)}"
        monitor: MonitorProcess | None = None
        try:
            text = self._yaml(request, capfiles, token)  # IntravisorConfigError: not worth retrying
            run_dir.mkdir(mode=0o700)
            (run_dir / "cvm.yaml").write_text(text)
            os.symlink(os.path.abspath(config.runtime), run_dir / os.path.basename(config.runtime))
            await asyncio.to_thread(copy_image, config.disk, run_dir / "disk.img")
            monitor = MonitorProcess([config.intravisor, "-y", "cvm.yaml"], run_dir, spin_grace=config.spin_grace)
            self.starts += 1
            try:
                await monitor.start()
            except OSError as exc:
                raise BackendError(str(exc)) from None
            connection = await self._await_agent(monitor, connected, request)
            if connection.hello.version != __version__:
                connection.writer.close()
                raise BackendError(f"the agent in the disk image is capfaas {connection.hello.version}, this "
                                   f"host runs {__version__}: run `capfaas morello prepare` again")
        except BaseException:
            self.listener.forget(token)
            if monitor is not None and monitor.exited is not None:
                monitor.kill()
                await monitor.wait()
                if monitor.console_fds is not None:
                    for fd in monitor.console_fds:
                        os.close(fd)
            if not config.keep_runs:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return self._attach(monitor, connection, request, bundle, [capfile.name for capfile in capfiles])

    async def _await_agent(self, monitor: MonitorProcess, connected: asyncio.Future[Connection],
                           request: LaunchRequest) -> Connection:
        """The agent's connection, or MonitorStartError saying how far the start got."""
        assert monitor.exited is not None and monitor.given_up is not None
        timeout = self.config.start_timeout
        done, _ = await asyncio.wait({connected, monitor.exited, monitor.given_up}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connected in done and not connected.cancelled():
            return connected.result()
        stage = ("its agent started but did not connect to "
                 f"{self.config.listen_host}:{self.listener.port if self.listener else '?'}"
                 if monitor.agent_started.is_set() else "the agent never started")
        if monitor.given_up in done:
            why = f"the monitor gave up: {monitor.given_up.result()!r}"
        elif monitor.exited in done:
            how = monitor.exited.result()
            why = f"the monitor {'was ' if how.startswith('killed') else ''}{how}"
        else:
            monitor.kill(f"no agent after {timeout:g} s")
            why = f"nothing connected within {timeout:g} s (start_timeout)"
        raise MonitorStartError(f"{why}; {stage}; {monitor.last_words()} (log: {monitor.run_dir / 'monitor.log'})")

    def _attach(self, monitor: MonitorProcess, connection: Connection, request: LaunchRequest,
                bundle: bytes, capfiles: list[str]) -> MorelloProcess:
        assert self.memory is not None and monitor.console_fds is not None
        writer = InliningWriter(connection.writer, self.memory)
        monitor.on_sync = lambda seq: writer.send_control({"op": "console-synced", "seq": seq})
        if isinstance(connection.reader, WatchedReader):
            connection.reader.on_eof = lambda: monitor.cvm_ended("its control channel closed")
        region = request.region
        writer.send_control({"op": "spec", "spec": spec_to_wire(request.spec), "bundle": bundle,
                             "region": {"base": region.base, "size": region.size, "offset": region.offset},
                             "ddc": request.ddc, "capfiles": capfiles})
        console = Console(*monitor.console_fds, request.spec.limits.output)
        process = MorelloProcess(self, monitor, connection, writer, console, request)
        self.processes.add(process)
        return process

    def finished(self, monitor: MonitorProcess, request: LaunchRequest) -> None:
        """A cVM's monitor ended: drop its staged payloads and (unless kept) its run directory."""
        self.processes = {p for p in self.processes if p.monitor is not monitor}
        if self.memory is not None:
            self.memory.release(request.region.base, request.region.base + request.region.size)
        if not self.config.keep_runs:
            shutil.rmtree(monitor.run_dir, ignore_errors=True)

    async def close(self) -> None:
        for process in list(self.processes):
            process.kill()
            await process.wait()
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
