"""The template process: the runtime imported once, every cVM forked from it.

The intravisor starts this process with a clean environment and talks to it over a
``SOCK_SEQPACKET`` socket. Each ``launch`` message arrives with two descriptors (the segment's memfd
and the cVM's control socket); the template forks, and the child maps only its own region, drops
every descriptor to the segment, confines itself with the library OS and runs the function. The
template reaps its children and reports how each one ended.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from capfaas.core import wire
from capfaas.core.capability import Capability  # noqa: F401  (imported once, before any fork)
from capfaas.core.runtime import Region, Runtime
from capfaas.core.spec import FunctionSpec, Limits
from capfaas.plugin_manager import make_plugin_manager
from capfaas.plugins.libos.policy import LibOSPolicy

from .memory import TaggedMemory

MAX_MESSAGE = 1 << 20


def spec_from_wire(data: dict[str, Any]) -> FunctionSpec:
    return FunctionSpec(name=data["name"], bundle=Path(data["bundle"]), module=data["module"],
                        handler=data["handler"], signature=data["signature"], env=data["env"],
                        secrets=data["secrets"], network=data["network"], limits=Limits(**data["limits"]))


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _address_space_size() -> int:
    """Bytes of address space this process already uses, so limits count only the function's own."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _scrub_segment_descriptors(keep: set[int], memfd: int) -> None:
    """Point every descriptor that still reaches the segment at /dev/null.

    Python's mmap keeps a private duplicate of the file it maps; with it, code in the cVM could
    ``pread`` any other cVM's memory. Replacing it (rather than closing it) keeps mmap's own
    bookkeeping valid while leaving nothing behind that reaches the segment.
    """
    target = os.fstat(memfd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == devnull:
            continue
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            os.dup2(devnull, fd)
    os.close(devnull)


def run_cvm(launch: dict[str, Any], memfd: int, control_fd: int, libos: Any) -> int:
    """The body of one forked cVM; returns its exit status."""
    spec = spec_from_wire(launch["spec"])
    region = launch["region"]
    memory = TaggedMemory(region["size"], base=region["base"], fd=os.dup(memfd),
                          offset=region["offset"], segment_size=launch["segment_size"])
    control = socket.socket(fileno=control_fd)
    _scrub_segment_descriptors({control_fd}, memfd)
    os.close(memfd)
    ddc = launch["ddc"]
    runtime = Runtime(control, spec, Region(memory, ddc, region["base"] + region["size"] // 2), libos)
    limits = spec.limits
    policy = LibOSPolicy(
        bundle_dir=str(spec.bundle), tmp_quota=limits.tmp, env=dict(spec.env),
        secrets=dict(spec.secrets), allow_network=spec.network,
        memory_limit=_address_space_size() + limits.memory, cpu_seconds=limits.cpu_seconds,
        open_files=limits.open_files, output_limit=limits.output,
    )
    try:
        libos.enter(policy)
    except Exception as exc:  # a libOS that cannot confine the cVM must not run the function
        runtime.send({"op": "failed", "error": {"stage": "libos", "type": type(exc).__name__, "message": str(exc)}})
        return 71
    if runtime.start() is None:
        return 3
    runtime.serve()
    return 0


class Template:
    """The template's loop: launch requests in, exit reports out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.libos = make_plugin_manager().hook.capfaas_libos()
        self.children: set[int] = set()
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(wire.pack(message))

    def launch(self, message: dict[str, Any], fds: list[int]) -> None:
        memfd, control_fd = fds
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                self.sock.close()
                os.close(self.wakeup_r)
                os.close(self.wakeup_w)
                status = run_cvm(message, memfd, control_fd, self.libos)
            except BaseException:  # nothing may escape a forked child back into the template
                status = 70
            finally:
                os._exit(status)
        os.close(memfd)
        os.close(control_fd)
        self.children.add(pid)
        self.send({"op": "launched", "cvm": message["cvm_id"], "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"op": "exited", "pid": pid, "how": _exit_description(status)})

    def serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "request")
        selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        self.send({"op": "ready", "pid": os.getpid()})
        while True:
            for key, _ in selector.select():
                if key.data == "signal":
                    os.read(self.wakeup_r, 4096)
                    self.reap()
                    continue
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 2)
                if not data:
                    return
                unpacker = wire.unpacker()
                unpacker.feed(data)
                for message in unpacker:
                    if message.get("op") == "launch" and len(fds) == 2:
                        self.launch(message, fds)
                    else:
                        for fd in fds:
                            os.close(fd)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    Template(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
