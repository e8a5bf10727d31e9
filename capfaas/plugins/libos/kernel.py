"""The few kernel entry points the ``os`` module lacks, reached through libc with ctypes.

ctypes is imported inside :class:`Kernel`, never as a module global: after ``enter()`` the audit
hook forbids ctypes, and a module attribute would hand function code a ready-made ctypes (any
imported module is reachable as ``sys.modules[...]``). A ``Kernel`` lives only for the duration of
``enter()``, except the pre-built :class:`SealFilter` a fork template keeps for ``seal()``.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from .syscalls import Arch

PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
M_ARENA_MAX = -8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class Kernel:
    """libc's ``syscall``, ``mount``, ``unshare``, ``prctl`` and ``mallopt``, raising ``OSError``."""

    def __init__(self, arch: Arch | None) -> None:
        import ctypes

        self.arch = arch
        self._ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._mount = libc.mount
        self._mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                ctypes.c_char_p)
        self._unshare = libc.unshare
        self._prctl = libc.prctl
        self._prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        self._mallopt = libc.mallopt
        self._keep: list[Any] = []  # buffers whose addresses were handed to the kernel

    def _check(self, result: int, what: str) -> int:
        if result == -1:
            errno = self._ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")
        return result

    def buffer(self, data: bytes) -> int:
        """Copy ``data`` into memory that lives as long as this object; return its address."""
        buf = self._ctypes.create_string_buffer(data, len(data))
        self._keep.append(buf)
        return self._ctypes.addressof(buf)

    def syscall(self, name: str, *args: int) -> int:
        """Call the syscall ``name`` of this architecture with integer (or address) arguments."""
        nr = self.arch.nr(name) if self.arch else None
        if nr is None:
            raise OSError(38, f"{name}: no syscall number known for this architecture")
        return self._check(self._syscall(self._ctypes.c_long(nr), *(self._ctypes.c_long(a) for a in args)), name)

    def unshare(self, flags: int) -> None:
        self._check(self._unshare(flags), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(s: str | None) -> bytes | None:
            return None if s is None else os.fsencode(s)

        self._check(self._mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def prctl(self, option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
        return self._check(self._prctl(option, a2, a3, a4, a5), f"prctl({option})")

    def drop_capabilities(self) -> bool:
        """Empty the bounding, ambient, effective, permitted and inheritable sets.

        Returns False when the bounding set could not be emptied (no CAP_SETPCAP): the process
        then holds no capability in effect and, since exec is denied, cannot gain one back.
        """
        bounding_dropped = True
        for cap in range(64):
            try:
                self.prctl(PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno == 22:  # EINVAL: past the last capability this kernel knows
                    break
                bounding_dropped = False
                break
        try:
            self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError:
            pass  # kernels before 4.3 have no ambient set
        header = self.buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
        data = self.buffer(bytes(24))  # two __user_cap_data_struct, all zero
        self.syscall("capset", header, data)
        return bounding_dropped

    def limit_malloc_arenas(self) -> None:
        """One malloc arena: each extra glibc arena reserves 64 MiB of address space (RLIMIT_AS)."""
        self._mallopt(M_ARENA_MAX, 1)

    def install_seccomp(self, program: bytes) -> None:
        """Attach a classic-BPF seccomp filter to this process (requires no_new_privs)."""
        fprog = struct.pack("=HxxxxxxQ", len(program) // 8, self.buffer(program))
        self.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self.buffer(fprog))

    def prepare_filter(self, length: int) -> SealFilter:
        """Memory and a bound ``prctl`` for a filter of ``length`` bytes installed later."""
        program = self._ctypes.create_string_buffer(length)
        fprog = self._ctypes.create_string_buffer(
            struct.pack("=HxxxxxxQ", length // 8, self._ctypes.addressof(program)))
        return SealFilter(self._prctl, memoryview(program).cast("B"), self._ctypes.addressof(fprog), (program, fprog))


class SealFilter:
    """A seccomp filter slot prepared before the audit hook, filled and installed after fork.

    Installing it later needs no new ctypes object (creating one is denied by then): the program
    is written through a memoryview and the already-resolved ``prctl`` is called.
    """

    def __init__(self, prctl: Any, program: memoryview, fprog_address: int, keep: tuple[Any, ...]) -> None:
        self._prctl = prctl
        self._program = program
        self._fprog_address = fprog_address
        self._keep = keep

    def install(self, program: bytes) -> None:
        if len(program) != len(self._program):
            raise ValueError("the seal filter changed length since it was prepared")
        self._program[:] = program
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_address, 0, 0) != 0:
            raise OSError("capfaas libOS: installing the seal filter failed")
