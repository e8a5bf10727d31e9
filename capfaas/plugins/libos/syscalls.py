"""System call numbers and ABI constants the library OS needs, per CPU architecture.

Python's ``os`` module has no ``mount``, ``pivot_root``, Landlock or seccomp, so the libOS calls
them by number. Numbers differ between x86-64 and the asm-generic table that AArch64 (Morello's
host) uses; a seccomp filter must also check the architecture it was written for, or a process
could switch ABIs and reach the same kernel function under a number the filter does not know.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

AUDIT_ARCH_X86_64 = 62 | 0x80000000 | 0x40000000  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_AARCH64 = 183 | 0x80000000 | 0x40000000  # EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000
"""x86-64 also accepts the x32 ABI's numbers (this bit set) under the same audit arch."""

# The same on every architecture since their introduction (the unified syscall table).
_COMMON = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442, "quotactl_fd": 443, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "process_mrelease": 448,
}

_X86_64 = {
    "fork": 57, "vfork": 58, "clone": 56, "execve": 59, "execveat": 322, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "kill": 62, "tgkill": 234, "tkill": 200, "prlimit64": 302,
    "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314,
    "setpriority": 141, "ioprio_set": 251, "migrate_pages": 256, "move_pages": 279,
    "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249,
    "userfaultfd": 323, "socket": 41, "socketpair": 53, "ioctl": 16,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
    "swapon": 167, "swapoff": 168, "iopl": 172, "ioperm": 173, "acct": 163, "quotactl": 179,
    "sethostname": 170, "setdomainname": 171, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "syslog": 103, "lookup_dcookie": 212, "vhangup": 153,
    "fanotify_init": 300, "capset": 126,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
    "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243,
    "mq_notify": 244, "mq_getsetattr": 245,
}

# asm-generic/unistd.h: AArch64 has no fork, vfork, iopl or ioperm.
_GENERIC = {
    "clone": 220, "execve": 221, "execveat": 281, "ptrace": 117,
    "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
    "kill": 129, "tgkill": 131, "tkill": 130, "prlimit64": 261,
    "sched_setaffinity": 122, "sched_setscheduler": 119, "sched_setparam": 118, "sched_setattr": 274,
    "setpriority": 140, "ioprio_set": 30, "migrate_pages": 238, "move_pages": 239,
    "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218,
    "userfaultfd": 282, "socket": 198, "socketpair": 199, "ioctl": 29,
    "open_by_handle_at": 265, "name_to_handle_at": 264, "init_module": 105, "finit_module": 273,
    "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "reboot": 142,
    "swapon": 224, "swapoff": 225, "acct": 89, "quotactl": 60,
    "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "clock_settime": 112,
    "clock_adjtime": 266, "adjtimex": 171, "syslog": 116, "lookup_dcookie": 18, "vhangup": 58,
    "fanotify_init": 262, "capset": 91,
    "shmget": 194, "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193,
    "semctl": 191, "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
    "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183,
    "mq_notify": 184, "mq_getsetattr": 185,
}


@dataclass(frozen=True)
class Arch:
    """One architecture's seccomp identity and syscall numbers."""

    name: str
    audit_arch: int
    numbers: Mapping[str, int]
    has_x32: bool

    def nr(self, name: str) -> int | None:
        """The syscall's number, or None where the architecture does not have it."""
        return self.numbers.get(name)


ARCHES = {
    "x86_64": Arch("x86_64", AUDIT_ARCH_X86_64, MappingProxyType({**_COMMON, **_X86_64}), True),
    "aarch64": Arch("aarch64", AUDIT_ARCH_AARCH64, MappingProxyType({**_COMMON, **_GENERIC}), False),
}


def current_arch() -> Arch | None:
    """This machine's architecture, or None when the libOS has no syscall table for it."""
    return ARCHES.get(platform.machine())
