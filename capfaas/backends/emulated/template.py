"""The template process: the runtime imported once, every cVM forked from it.

The intravisor starts this process with a clean environment and talks to it over a
``SOCK_SEQPACKET`` socket. Each ``launch`` message arrives with two descriptors (the segment's memfd
and the cVM's control socket); the template forks, and the child maps only its own region, drops
every descriptor to the segment, confines itself with the library OS and runs the function. The
template reaps its children and reports how each one ended.
"""
from __future__ import annotations

import _thread
import gc
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capfaas.core import wire
from capfaas.core.capability import Capability  # noqa: F401  (imported once, before any fork)
from capfaas.core.grants import GrantSpace, Grants, grant_space_for
from capfaas.core.runtime import Region, Runtime, error_report, load_function, load_handler
from capfaas.core.spec import FunctionSpec, Limits
from capfaas.plugin_manager import make_plugin_manager
from capfaas.plugins.libos.policy import LibOSPolicy

from .layout import WINDOW_ALIGN
from .memory import TaggedMemory

MAX_MESSAGE = 1 << 20
REGION_MESSAGE = 16 << 10
"""Room for the region message on an instance's control stream: a few hundred bytes, and a buffer
well below what malloc maps afresh for every read."""
SPARE_DELAY = 0.005
"""Seconds a template waits after its spare clone was taken before forking the next, so the fork
does not compete for the CPU with the instance that is starting."""


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


def _scrub_segment_descriptors(keep: set[int], memfd: int, below: int) -> None:
    """Point every descriptor below ``below`` that reaches the segment at /dev/null.

    Python's mmap keeps a private duplicate of the file it maps; with it, code in the cVM could
    ``pread`` any other cVM's memory. Replacing it (rather than closing it) keeps mmap's own
    bookkeeping valid while leaving nothing behind that reaches the segment. The kernel gives
    every new descriptor the lowest free number, so those duplicates all lie below the lowest
    number still free after mapping (``below``): only that range needs checking (a confined
    process cannot list /proc/self/fd).
    """
    target = os.fstat(memfd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in range(below):
        if fd in keep or fd == devnull:
            continue
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            os.dup2(devnull, fd)
    os.close(devnull)


def map_region(launch: dict[str, Any], memfd: int, control_fd: int) -> Region:
    """Map this cVM's region and nothing else of the segment; leave no descriptor to the segment."""
    region = launch["region"]
    memory = TaggedMemory(region["size"], base=region["base"], fd=os.dup(memfd),
                          offset=region["offset"], segment_size=launch["segment_size"])
    lowest_free = os.dup(memfd)
    os.close(lowest_free)
    _scrub_segment_descriptors({control_fd}, memfd, max(lowest_free, memfd + 1))
    os.close(memfd)
    return Region(memory, launch["ddc"], region["base"] + region["size"] // 2)


def policy_for(spec: FunctionSpec, region_size: int = 0) -> LibOSPolicy:
    """The libOS policy of a function; ``region_size`` is address space a later region mapping needs."""
    limits = spec.limits
    return LibOSPolicy(
        bundle_dir=str(spec.bundle), tmp_quota=limits.tmp, env=dict(spec.env),
        secrets=dict(spec.secrets), allow_network=spec.network,
        memory_limit=_address_space_size() + region_size + limits.memory, cpu_seconds=limits.cpu_seconds,
        open_files=limits.open_files,
    )


def _failure(stage: str, exc: BaseException, spec: FunctionSpec) -> dict[str, Any]:
    return {"op": "failed", "error": error_report(stage, exc, spec)}


def attach_console(stdout_fd: int, stderr_fd: int) -> None:
    """Make the intravisor's pipes this process's fds 1 and 2: everything printed goes there."""
    for source, target in ((stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(source, target)
        os.close(source)


def run_cvm(launch: dict[str, Any], fds: list[int], libos: Any) -> int:
    """The body of one cVM forked from the generic template; returns its exit status."""
    memfd, control_fd, stdout_fd, stderr_fd, grant_fd = fds
    attach_console(stdout_fd, stderr_fd)
    spec = spec_from_wire(launch["spec"])
    control = socket.socket(fileno=control_fd)
    region = map_region(launch, memfd, control_fd)
    space = GrantSpace(grant_space_for(launch["region"]["size"]), libos.map_shared)  # before the limits count it
    runtime = Runtime(control, spec, region, Grants(socket.socket(fileno=grant_fd), space))
    try:
        libos.enter(policy_for(spec))
    except Exception as exc:  # a libOS that cannot confine the cVM must not run the function
        runtime.send(_failure("libos", exc, spec))
        return 71
    if runtime.start(load_handler) is None:
        return 3
    runtime.serve()
    return 0


def run_function_template(message: dict[str, Any], control_fd: int, libos: Any) -> int:
    """A function's template: confined, its code imported and initialised once, forking instances.

    ``init()`` and ``before_snapshot()`` run here, once per version; each instance forked from
    here maps its own region, drops fork for good, reseeds, and runs ``after_restore()``.
    """
    spec = spec_from_wire(message["spec"])
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)

    def send(reply: dict[str, Any]) -> None:
        control.send(wire.pack(reply))

    _rehearse(spec)
    space = GrantSpace(grant_space_for(message["region_size"]), libos.map_shared)  # every instance inherits it
    try:
        libos.enter(policy_for(spec, message["region_size"]), allow_fork=True)
    except Exception as exc:
        send(_failure("libos", exc, spec))
        return 71
    try:
        module, handler = load_function(spec)
        for hook in ("init", "before_snapshot"):
            if callable(getattr(module, hook, None)):
                getattr(module, hook)()
    except BaseException as exc:  # user code at import or init time
        send(_failure("import", exc, spec))
        return 3
    if _thread._count():  # a thread left by init() would not survive fork, and could watch us
        send(_failure("init", RuntimeError("init code left threads running; a template must be single-threaded"), spec))
        return 3
    reaper = ChildReaper(send)
    gc.freeze()  # what exists now is shared with every instance: keep the collector off its pages
    send({"op": "ready", "pid": os.getpid()})

    def clone(body: Any) -> int:
        return fork_child(libos.fork, reaper, control, body)

    def fork_spare() -> None:
        """Fork the next instance ahead of need and give the intravisor the socket that wakes it.

        Forking is the slowest step of a cold start (milliseconds on a virtual machine, where page
        tables are costly to copy), so a template keeps one clone forked and sealed before any
        request needs it. The clone holds no region and serves nothing until the intravisor sends
        it a control channel, and with it a region: it is not a warm instance."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = clone(lambda: (ours.close(), run_spare(theirs, spec, module, handler, libos, space))[1])
            socket.send_fds(control, [wire.pack({"op": "spare", "pid": pid})], [ours.fileno()])
        except OSError:  # out of processes or memory: instances are forked on demand instead
            pass
        finally:
            ours.close()
            theirs.close()

    fork_spare()
    spare_due: float | None = None
    while True:
        wait = None if spare_due is None else max(0.0, spare_due - time.monotonic())
        readable = reaper.wait_readable(control, timeout=wait)
        if spare_due is not None and time.monotonic() >= spare_due:
            spare_due = None
            fork_spare()
        for ready in readable:
            if ready is not control:
                continue
            data, fds = receive_message(control, 1)
            if not data:
                return 0
            request = _one_message(data)
            if request.get("op") == "spare-taken" and not fds:
                spare_due = time.monotonic() + SPARE_DELAY
                continue
            if request.get("op") != "fork" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            pid = clone(lambda: run_instance(fds[0], spec, module, handler, libos, space))
            os.close(fds[0])
            send({"op": "forked", "cvm": request["cvm_id"], "pid": pid})


def run_spare(handoff: socket.socket, spec: FunctionSpec, module: Any, handler: Any, libos: Any,
              space: GrantSpace) -> int:
    """A spare clone: seal now, take its channels and console when the intravisor sends them, then
    wait for a region and become an instance.

    While it waits, it runs the invocation path once on a no-op handler, so the pages that path
    writes (reference counts, caches) are copied from the template now, not on the first request.
    Unless the function has an ``after_restore()`` hook (which runs when the clone is taken), it
    also starts its runtime and reports ready at once: a cold start then only maps the region."""
    libos.seal()
    libos.runtime_mapping(lambda: _rehearse_start(spec))
    data, fds, _, _ = socket.recv_fds(handoff, 16, 4)
    handoff.close()
    if not data or len(fds) != 4:
        return 0  # the template went away before needing this clone
    control_fd, stdout_fd, stderr_fd, grant_fd = fds
    attach_console(stdout_fd, stderr_fd)
    if callable(getattr(module, "after_restore", None)):
        return run_instance(control_fd, spec, module, handler, libos, space, grant_fd=grant_fd)
    control = socket.socket(fileno=control_fd)
    random.seed(os.urandom(32))  # no two instances share the template's random state
    runtime = Runtime(control, spec, Region(None, None, 0), Grants(socket.socket(fileno=grant_fd), space))
    if runtime.start(lambda _: handler) is None:
        return 3
    received = _receive_region(control, libos.runtime_mapping, 1)
    if received is None:
        return 72
    runtime.region = received[0]
    runtime.serve()
    return 0


def _rehearse_start(spec: FunctionSpec) -> None:
    """In a spare clone: map a scratch region the way a real one is mapped, then run the
    invocation path on it.

    A clone shares every page with its template until it writes to one, and on a virtual machine
    each first write costs a page fault of several microseconds. Running the start-up and
    invocation code here, before the clone is needed, takes those faults off the cold start."""
    scratch = TaggedMemory(WINDOW_ALIGN)
    ours, theirs = socket.socketpair()
    try:
        root = scratch.root_capability()
        launch = {"region": {"size": WINDOW_ALIGN, "base": scratch.base, "offset": 0},
                  "segment_size": WINDOW_ALIGN, "ddc": root}
        region = map_region(launch, os.dup(scratch.fd), ours.fileno())
        try:
            Runtime(ours, spec, region).rehearse(rounds=2)
        finally:
            region.memory.close()
    finally:
        ours.close()
        theirs.close()
        scratch.close()


def _rehearse(spec: FunctionSpec) -> None:
    """Warm the invocation path once in the template (see ``Runtime.rehearse``), on a scratch
    segment of its own and a no-op handler, before any function code is loaded."""
    memory = TaggedMemory(WINDOW_ALIGN)
    ours, theirs = socket.socketpair()
    try:
        root = memory.root_capability()
        Runtime(ours, spec, Region(memory, root, root.base + WINDOW_ALIGN // 2)).rehearse()
    finally:
        ours.close()
        theirs.close()
        memory.close()


def run_instance(control_fd: int, spec: FunctionSpec, module: Any, handler: Any, libos: Any, space: GrantSpace,
                 *, grant_fd: int | None = None) -> int:
    """One instance forked from a function template. Its region comes on its control channel with
    its console and grant channel, or, for a spare clone (sealed, console attached, ``grant_fd``
    given), alone."""
    control = socket.socket(fileno=control_fd)
    spare = grant_fd is not None
    received = _receive_region(control, libos.runtime_mapping if spare else libos.seal, 1 if spare else 4)
    if received is None:
        return 72
    region, attached = received
    if not spare:
        attach_console(attached[0], attached[1])
        grant_fd = attached[2]
    random.seed(os.urandom(32))  # no two instances share the template's random state
    runtime = Runtime(control, spec, region, Grants(socket.socket(fileno=grant_fd), space))

    def restored(_: FunctionSpec) -> Any:
        hook = getattr(module, "after_restore", None)
        if callable(hook):
            hook()
        return handler

    if runtime.start(restored) is None:
        return 3
    runtime.serve()
    return 0


def _receive_region(control: socket.socket, mapping: Callable[[Callable[[], object]], None],
                    descriptors: int) -> tuple[Region, list[int]] | None:
    """Wait for this instance's region and map it inside ``mapping`` (the library OS's); the region
    and the ``descriptors`` - 1 that came after the segment's, or None if what came is not a region."""
    data, fds, _, _ = socket.recv_fds(control, REGION_MESSAGE, descriptors)
    launch = _one_message(data)
    if launch.get("op") != "region" or len(fds) != descriptors:
        return None
    mapped: list[Region] = []
    mapping(lambda: mapped.append(map_region(launch, fds[0], control.fileno())))
    return mapped[0], fds[1:]


_PEEK = bytearray(1)


def receive_message(sock: socket.socket, descriptors: int) -> tuple[bytes, list[int]]:
    """One message of a SOCK_SEQPACKET socket (empty at end of stream) and up to ``descriptors`` fds.

    Read with a buffer of its own size: recvmsg allocates what it is asked for, and a buffer of
    MAX_MESSAGE would cost a memory mapping and its page faults on every message of a cold start."""
    size = sock.recv_into(_PEEK, 0, socket.MSG_PEEK | socket.MSG_TRUNC)
    data, fds, _, _ = socket.recv_fds(sock, min(max(size, 1), MAX_MESSAGE), descriptors)
    return data, fds


def _one_message(data: bytes) -> dict[str, Any]:
    unpacker = wire.unpacker()
    unpacker.feed(data)
    message = next(unpacker, None)
    return message if isinstance(message, dict) else {}


def fork_child(fork: Callable[[], int], reaper: ChildReaper, parent_socket: socket.socket,
               body: Callable[[], int]) -> int:
    """Fork (through ``fork``) a child that drops the parent's socket and reaper, runs ``body`` and
    exits with its status; nothing it raises escapes back into the parent's code. The child's pid."""
    pid = fork()
    if pid == 0:
        status = 70
        try:
            reaper.forget_in_child()
            parent_socket.close()
            status = body()
        except BaseException:  # nothing may escape a forked child back into the template
            traceback.print_exc()  # to the backend's diagnostic tail
            status = 70
        finally:
            os._exit(status)
    reaper.children.add(pid)
    return pid


class ChildReaper:
    """Reaps a process's children and reports how each ended, woken by SIGCHLD."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.children: set[int] = set()
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)

    def wait_readable(self, *sources: Any, timeout: float | None = None) -> list[Any]:
        """Block until a source is readable (or ``timeout`` passes); reap on the way. Returns the
        readable sources."""
        for source in sources:
            if source not in self._registered():
                self.selector.register(source, selectors.EVENT_READ)
        ready = []
        for key, _ in self.selector.select(timeout):
            if key.fileobj == self.wakeup_r:
                os.read(self.wakeup_r, 4096)
                self.reap()
            else:
                ready.append(key.fileobj)
        return ready

    def _registered(self) -> set[Any]:
        return {key.fileobj for key in self.selector.get_map().values()}

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"op": "exited", "pid": pid, "how": _exit_description(status)})

    def forget_in_child(self) -> None:
        """In a freshly forked child: none of this is the child's."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)


class Template:
    """The generic template's loop: launch requests in, exit reports out.

    It is a child subreaper, so instances whose function template ended are still reaped and
    reported here.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.libos = make_plugin_manager().hook.capfaas_libos()
        self.reaper = ChildReaper(self.send)
        become_subreaper()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(wire.pack(message))

    def fork(self, message: dict[str, Any], fds: list[int], body: Any) -> None:
        pid = fork_child(os.fork, self.reaper, self.sock, body)
        for fd in fds:
            os.close(fd)
        self.send({"op": "launched", "cvm": message["cvm_id"], "pid": pid})

    def serve(self) -> None:
        self.send({"op": "ready", "pid": os.getpid()})
        while True:
            if not self.reaper.wait_readable(self.sock):
                continue
            data, fds = receive_message(self.sock, 5)
            if not data:
                return
            message = _one_message(data)
            op = message.get("op")
            if op == "launch" and len(fds) == 5:
                self.fork(message, fds, lambda: run_cvm(message, fds, self.libos))
            elif op == "template" and len(fds) == 1:
                self.fork(message, fds, lambda: run_function_template(message, fds[0], self.libos))
            else:
                for fd in fds:
                    os.close(fd)


def become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: orphaned grandchildren are reparented to us, not to init."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def run_as_batch() -> None:
    """Put the template, and so every cVM forked from it, under Linux's SCHED_BATCH: a cVM woken
    by a request then never preempts the intravisor (the gateway) that woke it, which goes on to
    its next request while the cVM waits for a core. Under load the two compete for few cores, and
    each such preemption cost the gateway a context switch per invocation."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # a sandbox that forbids it: the default policy serves, a little slower
            pass


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    run_as_batch()
    Template(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
