"""The seccomp-bpf filters of a cVM, hand-assembled (classic BPF, no libseccomp needed).

The filter is a deny-list with argument checks: it lets the system calls an ordinary Python
program makes pass and refuses, with ``EPERM``, those that reach outside the process (processes,
other processes' memory and signals, mounts and namespaces, kernel keyrings, BPF, io_uring, whose
operations would bypass this very filter, SysV and POSIX IPC shared by every process, terminal
input injection). It is the layer that still holds when function code gets past the audit hook.

Decisions worth knowing:

* ``clone`` passes only with ``CLONE_THREAD`` (threads) and never with a namespace flag;
  ``clone3`` answers ``ENOSYS`` because its flags live in memory a filter cannot read, and glibc
  then falls back to ``clone`` for threads.
* ``kill``/``tgkill``/``tkill`` pass only for the process's own pid, fixed when the filter is
  built; ``kill(0)`` and negative pids (process groups) are refused.
* ``socket`` is refused outright without network; with network only ``AF_INET``/``AF_INET6``.
  ``socket(AF_UNIX)`` is always refused (a pathname socket could reach host daemons, which
  Landlock does not mediate), while ``socketpair(AF_UNIX)`` is allowed: it reaches no one, and
  asyncio needs it for its self-pipe.
* ``prlimit64``, ``sched_set*``, ``setpriority`` and ``ioprio_set`` may only target the process
  itself: a same-uid process may otherwise lower its parent's limits or priority.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping

from .syscalls import X32_SYSCALL_BIT, Arch

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
EPERM = 1
ENOSYS = 38

# offsets in struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_NR = 0
_ARCH = 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (little-endian; the kernel reads ints there)."""
    return 16 + 8 * index


CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (NEWTIME only exists for clone3)."""
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1

DENIED = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "process_madvise", "process_mrelease",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "iopl", "ioperm", "acct",
    "quotactl", "quotactl_fd", "sethostname", "setdomainname", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "syslog", "lookup_dcookie", "vhangup", "fanotify_init",
    "migrate_pages", "move_pages",
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
)
"""Refused with EPERM in every cVM (after the libOS has finished its own mounts)."""

_SIGNALS = ("kill", "tgkill", "tkill")
_SELF_TARGETED = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")


class _Assembler:
    """Classic BPF with symbolic forward jumps; every jump must land within 255 instructions."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_W_ABS, 0, 0, offset))

    def jeq(self, k: int, true: int | str, false: int | str = 0) -> None:
        self.code.append((_JEQ_K, true, false, k))

    def jset(self, k: int, true: int | str, false: int | str = 0) -> None:
        self.code.append((_JSET_K, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((_RET_K, 0, 0, value))

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (code, jt, jf, k) in enumerate(self.code):
            out += struct.pack("=HBBI", code, self._offset(index, jt), self._offset(index, jf), k)
        return bytes(out)

    def _offset(self, index: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"seccomp jump to {target!r} out of range ({offset})")
        return offset


OWN_PID = "pid"
"""Stands for the process's pid in the check blocks; filled in when a filter is built."""

# Check blocks a syscall can be dispatched to: (argument tested, [(test, constant, label if it
# holds)], verdict otherwise). Blocks only jump forward (to later blocks or the verdicts).
_BLOCKS: dict[str, tuple[int, list[tuple[str, int | str, str]], str]] = {
    "clone_thread": (0, [("jset", CLONE_NAMESPACES, "deny"), ("jset", CLONE_THREAD, "allow")], "deny"),
    "clone_any": (0, [("jset", CLONE_NAMESPACES, "deny")], "allow"),
    "own_pid": (0, [("jeq", OWN_PID, "allow")], "deny"),
    "self_arg0": (0, [("jeq", 0, "allow"), ("jeq", OWN_PID, "allow")], "deny"),
    "setpriority": (0, [("jeq", PRIO_PROCESS, "self_arg1")], "deny"),
    "ioprio_set": (0, [("jeq", IOPRIO_WHO_PROCESS, "self_arg1")], "deny"),
    "self_arg1": (1, [("jeq", 0, "allow"), ("jeq", OWN_PID, "allow")], "deny"),
    "socket_inet": (0, [("jeq", AF_INET, "allow"), ("jeq", AF_INET6, "allow")], "deny"),
    "socketpair_unix": (0, [("jeq", AF_UNIX, "allow")], "deny"),
    "ioctl": (1, [("jeq", TIOCSTI, "deny"), ("jeq", TIOCLINUX, "deny")], "allow"),
}
_VERDICTS = {"allow": SECCOMP_RET_ALLOW, "deny": SECCOMP_RET_ERRNO | EPERM, "enosys": SECCOMP_RET_ERRNO | ENOSYS}


def _program(arch: Arch, pid: int, table: Mapping[str, str]) -> bytes:
    """Dispatch each syscall of ``table`` to a check block or verdict; everything else is allowed."""
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jeq(arch.audit_arch, 1, 0)
    asm.ret(SECCOMP_RET_KILL_PROCESS)  # a filter for one ABI must not judge another's numbers
    asm.load(_NR)
    if arch.has_x32:
        asm.jset(X32_SYSCALL_BIT, "deny")
    for name, target in table.items():
        nr = arch.nr(name)
        if nr is not None:
            asm.jeq(nr, target)
    asm.ret(SECCOMP_RET_ALLOW)
    for name, (arg, tests, otherwise) in _BLOCKS.items():
        asm.label(name)
        asm.load(_arg_low(arg))
        for test, constant, target in tests:
            value = pid if constant == OWN_PID else int(constant)
            (asm.jeq if test == "jeq" else asm.jset)(value, target)
        asm.ret(_VERDICTS[otherwise])
    for name, verdict in _VERDICTS.items():
        asm.label(name)
        asm.ret(verdict)
    return asm.assemble()


def confinement_filter(arch: Arch, pid: int, *, allow_fork: bool, allow_network: bool,
                       restrict_signals: bool) -> bytes:
    """The filter ``enter()`` installs.

    ``restrict_signals`` is False only for a fork template whose Landlock domain already scopes
    signals: its children get new pids, and ``seal()`` restricts signals to each child's own.
    """
    table = {name: "deny" for name in DENIED}
    table["clone3"] = "enosys"
    table["clone"] = "clone_any" if allow_fork else "clone_thread"
    if not allow_fork:
        table.update(fork="deny", vfork="deny")
    if restrict_signals:
        table.update(dict.fromkeys(_SIGNALS, "own_pid"))
    table.update(dict.fromkeys(_SELF_TARGETED, "self_arg0"))
    table.update(setpriority="setpriority", ioprio_set="ioprio_set")
    table["socket"] = "socket_inet" if allow_network else "deny"
    table["socketpair"] = "socketpair_unix"
    table["ioctl"] = "ioctl"
    return _program(arch, pid, table)


def seal_filter(arch: Arch, pid: int) -> bytes:
    """The filter ``seal()`` stacks in a forked child: no more processes, signals only to itself."""
    table = {"fork": "deny", "vfork": "deny", "clone": "clone_thread", "clone3": "enosys"}
    table.update(dict.fromkeys(_SIGNALS, "own_pid"))
    return _program(arch, pid, table)
