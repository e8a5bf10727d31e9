"""The library OS plugin: what function code inside a cVM sees as its OS, and what it is denied.

In Intravisor a cVM runs its program on a library OS (musl + LKL) that mounts the cVM's own disk
image and turns system calls into hostcalls the monitor may refuse. On the emulated backend a
cVM is an OS process, and ``LibraryOS.enter()`` confines that process, irreversibly and before
any function code is imported, in layers (each applied when the kernel allows it, and reported
in the returned :class:`Enforcement` either way):

1. a private root (mount namespace): bundle and runtime read-only, private /tmp, secrets;
2. no_new_privs, not dumpable, no capabilities;
3. Landlock: the same file view enforced by the kernel, TCP and signal/abstract-socket scoping;
4. seccomp-bpf: no processes, no foreign signals or memory, no mounts, namespaces or io_uring;
5. rlimits: address space, CPU time, open files, file size, no core dumps;
6. the environment replaced, ``random`` reseeded;
7. an audit hook that refuses the same things early, with a message naming the rule.

See docs/libos.md for what each layer covers and what is not enforced.
"""
from __future__ import annotations

import errno
import importlib
import mmap as _mmap
import os
import sys
from collections.abc import Callable
from typing import Any

from capfaas.hookspecs import hookimpl

from . import landlock
from .audit import RAW_MEMORY_MODULES, AuditGuard
from .enforcement import Enforcement, Layer
from .environment import reseed_random, replace_environment
from .filesystem import HostPaths, View
from .kernel import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, Kernel, SealFilter
from .limits import apply_rlimits
from .mounts import NamespaceUnavailable, enter_private_root
from .policy import DEFAULT_EXTENSIONS, LibOSPolicy
from .rules import Rule
from .runtime_paths import runtime_read_paths
from .seccomp import confinement_filter, seal_filter
from .syscalls import current_arch

# Imported once where the plugin is loaded (a template, before it forks cVMs) so that no cVM pays
# for it in enter(); deliberately bound to no name, since after enter() nothing may expose it.
importlib.import_module("ctypes")

__all__ = ["DEFAULT_EXTENSIONS", "Enforcement", "Layer", "LibOSPolicy", "LibraryOS", "Rule",
           "capfaas_libos", "runtime_read_paths"]


def _require_single_thread() -> None:
    """unshare(CLONE_NEWNS) and Landlock act on the calling thread only: confine before threads."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return
    if threads > 1:
        raise RuntimeError(f"LibraryOS.enter() must run before the process starts threads ({threads} running)")


class LibraryOS:
    """Confines the current process as one cVM (``enter``) and seals forked children (``seal``).

    A cVM's output needs no capturing here: its fds 1 and 2 are pipes the intravisor reads
    (``capfaas.core.console``)."""

    def __init__(self) -> None:
        self._policy: LibOSPolicy | None = None
        self._guard: AuditGuard | None = None
        self._seal: SealFilter | None = None

    def enter(self, policy: LibOSPolicy, *, allow_fork: bool = False) -> Enforcement:
        """Confine this process for good; returns the layers applied and those unavailable.

        ``allow_fork=True`` is for a template that forks cVMs after entering: fork stays allowed
        until each child calls :meth:`seal`. Raises if the process was already confined, runs
        threads, or a layer fails after it started changing the process (such a process must
        not run function code, so it should exit).
        """
        if self._guard is not None:
            raise RuntimeError("this process is already confined")
        if not os.path.isdir(policy.bundle_dir):
            raise FileNotFoundError(errno.ENOENT, "the function bundle is not a directory", policy.bundle_dir)
        _require_single_thread()
        arch = current_arch()
        kernel = Kernel(arch)
        applied: list[Layer] = []
        unavailable: list[Layer] = []

        host = HostPaths.for_policy(policy)
        try:
            root = enter_private_root(kernel, host, tmp_quota=policy.tmp_quota, secrets=policy.secrets)
            applied.append(Layer("mount-namespace", (
                f"private root{' in a user namespace' if root.user_namespace else ''}: {root.binds} read-only "
                f"binds (bundle, runtime, devices), /tmp tmpfs of {policy.tmp_quota} B, "
                f"{root.secrets} secrets read-only in /var/openfaas/secrets")))
            private = True
        except NamespaceUnavailable as exc:
            unavailable.append(Layer("mount-namespace", (
                f"{exc}; so no private /tmp (/tmp is not granted at all) and no secrets, "
                "and host paths can still be stat()ed (Landlock still refuses opening them)")))
            private = False
        os.chdir(policy.bundle_dir)
        view = View.after_mounts(host, private_tmp=private, secrets=private)

        kernel.prctl(PR_SET_NO_NEW_PRIVS, 1)
        kernel.prctl(PR_SET_DUMPABLE, 0)
        applied.append(Layer("no-new-privs", "no_new_privs set; not dumpable, so no ptrace or /proc/PID/mem by same-uid processes"))
        applied.append(Layer("capabilities", "all capabilities dropped" if kernel.drop_capabilities() else
                             "effective, permitted and inheritable capabilities dropped "
                             "(the bounding set needs CAP_SETPCAP to be emptied)"))

        scoped_signals = False
        try:
            result = landlock.restrict(kernel, view, allow_network=policy.allow_network)
            applied.append(Layer("landlock", result.detail))
            unavailable += [Layer(name, reason) for name, reason in result.gaps]
            scoped_signals = result.scoped_signals
        except landlock.LandlockUnavailable as exc:
            unavailable.append(Layer("landlock", str(exc)))

        if arch is None:
            unavailable.append(Layer("seccomp", f"no syscall table for {os.uname().machine}"))
        else:
            restrict_signals = not (allow_fork and scoped_signals)
            program = confinement_filter(arch, os.getpid(), allow_fork=allow_fork, allow_network=policy.allow_network,
                                         restrict_signals=restrict_signals)
            try:
                kernel.install_seccomp(program)
                applied.append(Layer("seccomp", (
                    f"{len(program) // 8}-instruction filter for {arch.name}: no exec"
                    f"{', fork until seal()' if allow_fork else ', no fork'}, no ptrace/process_vm, "
                    f"{'signals to self only' if restrict_signals else 'signals left to Landlock until seal()'}"
                    ", no mount/namespaces/bpf/io_uring/keyrings/SysV IPC"
                    f"{', internet sockets only' if policy.allow_network else ', no sockets (socketpair AF_UNIX only)'}")))
                if allow_fork:
                    self._seal = kernel.prepare_filter(len(seal_filter(arch, 0)))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                unavailable.append(Layer("seccomp", "kernel without seccomp filters (CONFIG_SECCOMP_FILTER)"))

        kernel.limit_malloc_arenas()
        detail, gaps = apply_rlimits(policy)
        applied.append(Layer("rlimits", detail))
        unavailable += [Layer(name, reason) for name, reason in gaps]

        replace_environment(policy.env)
        reseed_random()
        sys.dont_write_bytecode = True  # the bundle is read-only: no __pycache__ to write
        applied.append(Layer("environment", f"environment replaced ({len(policy.env)} function variables), random reseeded"))

        guard = AuditGuard(view, policy, fork_allowed=False)  # only LibraryOS.fork() forks, see there
        sys.addaudithook(guard.hook)
        for name in [n for n in sys.modules if n in RAW_MEMORY_MODULES or n.startswith(("ctypes.", "cffi."))]:
            del sys.modules[name]  # a cached module would skip the import check
        applied.append(Layer("audit-hook", "files, processes, signals, sockets, ctypes/mmap and native "
                                           "extensions refused with the rule named"))
        self._guard, self._policy = guard, policy
        return Enforcement(tuple(applied), tuple(unavailable))

    def fork(self) -> int:
        """The template's own fork of an instance (``os.fork`` semantics).

        In a template entered with ``allow_fork=True`` the kernel allows fork until ``seal()``,
        but the audit rule refuses it to everything else: function code in the template (its
        import, ``init()``) cannot fork through Python."""
        if self._guard is None:
            raise RuntimeError("fork() is for a process confined with enter(allow_fork=True)")
        self._guard.fork_allowed = True
        try:
            return os.fork()
        finally:
            self._guard.fork_allowed = False  # in the parent and in the child alike

    def runtime_mapping(self, prepare: Callable[[], object]) -> None:
        """Run ``prepare`` (the runtime mapping its region) with the raw-memory rule lifted.

        For a child that sealed itself before it knew its region (a spare clone): only the
        runtime's code runs then, in a process with one thread, and the rule is back on return."""
        if self._guard is None:
            prepare()
            return
        self._guard.runtime_mapping = True
        try:
            prepare()
        finally:
            self._guard.runtime_mapping = False

    def map_shared(self, *args: Any, **kwargs: Any) -> Any:
        """``mmap.mmap(*args, **kwargs)`` for the runtime, with the raw-memory rule lifted for the
        one call: it maps grants (objects another cVM shares) and reserves address space for them.
        Every descriptor a cVM holds is its own or a grant, so a mapping reaches nothing else."""
        if self._guard is None:
            return _mmap.mmap(*args, **kwargs)
        self._guard.runtime_mapping = True
        try:
            return _mmap.mmap(*args, **kwargs)
        finally:
            self._guard.runtime_mapping = False

    def seal(self, prepare: Callable[[], object] | None = None) -> None:
        """In a child forked from a template entered with ``allow_fork=True``: no more forks, and
        signals only to this child's own pid (a stricter seccomp filter stacked on the template's,
        and the audit hook's fork rule switched on). Irreversible.

        ``prepare`` runs first with the raw-memory rule lifted: it is how the runtime maps the
        child's own region of shared memory. Only the runtime's code runs then (the child of a
        fork has one thread), and the rule is back before ``seal`` returns."""
        if self._guard is None:
            raise RuntimeError("seal() is for a process confined with enter(allow_fork=True)")
        if prepare is not None:
            self.runtime_mapping(prepare)
        arch = current_arch()
        if self._seal is not None and arch is not None:
            self._seal.install(seal_filter(arch, os.getpid()))
            self._seal = None
        self._guard.fork_allowed = False


@hookimpl
def capfaas_libos() -> LibraryOS:
    """The built-in library OS."""
    return LibraryOS()
