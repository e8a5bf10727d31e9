"""Landlock: the kernel's own path-based access control, applied to the cVM process for good.

Landlock judges every file opened by path against the rules below, however it was opened (no
audit hook, ctypes or ``_posixsubprocess`` gets around it): read-only beneath the visible
read-only paths, read-write beneath the private /tmp and on /dev/null, nothing elsewhere (no
execute right anywhere, so no ``execve`` either). With ABI 4 it also refuses TCP bind/connect
unless the function has the network; with ABI 6 it confines signals and abstract unix sockets
to the process's own domain, so the gateway, the template and other cVMs are out of reach.

Each right is requested only if the running kernel's ABI knows it; what an older ABI lacks is
reported, never silently skipped.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from .filesystem import View
from .kernel import Kernel

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_ONLY = READ_FILE | READ_DIR
READ_WRITE = (READ_FILE | WRITE_FILE | READ_DIR | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG
              | MAKE_SYM | MAKE_FIFO | REFER | TRUNCATE)


class LandlockUnavailable(Exception):
    """The kernel has no Landlock (not built, or not enabled in the ``lsm=`` boot list)."""


@dataclass(frozen=True)
class LandlockResult:
    abi: int
    detail: str
    gaps: tuple[tuple[str, str], ...]
    """(layer, reason) for each protection this ABI cannot give."""
    scoped_signals: bool


def abi_version(kernel: Kernel) -> int:
    try:
        return kernel.syscall("landlock_create_ruleset", 0, 0, CREATE_RULESET_VERSION)
    except OSError as exc:
        raise LandlockUnavailable(f"landlock_create_ruleset: {exc.strerror} "
                                  "(kernel without Landlock, or Landlock not enabled at boot)") from exc


def _handled_fs(abi: int) -> int:
    return FS_BY_ABI[max(a for a in FS_BY_ABI if a <= abi)]


def _add_rule(kernel: Kernel, ruleset: int, path: str, rights: int, handled: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        attr = struct.pack("=Qi", rights & handled, fd)
        kernel.syscall("landlock_add_rule", ruleset, RULE_PATH_BENEATH, kernel.buffer(attr), 0)
    finally:
        os.close(fd)


def restrict(kernel: Kernel, view: View, *, allow_network: bool) -> LandlockResult:
    """Create the ruleset for ``view`` and enforce it on this process (no_new_privs must be set)."""
    abi = abi_version(kernel)
    handled = _handled_fs(abi)
    net = 0 if allow_network or abi < 4 else NET_BIND_TCP | NET_CONNECT_TCP
    scoped = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = kernel.syscall("landlock_create_ruleset", kernel.buffer(attr), len(attr), 0)
    try:
        for path in view.read_only:
            _add_rule(kernel, ruleset, path, READ_ONLY, handled)
        for path in view.read_write:
            _add_rule(kernel, ruleset, path, READ_WRITE, handled)
        kernel.syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)

    parts = [f"ABI {abi}: files ({len(view.read_only)} read-only paths, {len(view.read_write)} read-write)"]
    gaps: list[tuple[str, str]] = []
    if abi < 3:
        gaps.append(("landlock-truncate", f"Landlock ABI {abi} < 3 cannot refuse truncate(2) by path"))
    if abi < 5:
        gaps.append(("landlock-ioctl", f"Landlock ABI {abi} < 5 cannot refuse ioctl on devices"))
    if net:
        parts.append("TCP bind/connect denied")
    elif not allow_network:
        gaps.append(("landlock-network", f"Landlock ABI {abi} < 4 cannot refuse TCP (seccomp still refuses socket())"))
    if scoped:
        parts.append("signals and abstract unix sockets scoped to the cVM")
    else:
        gaps.append(("landlock-scope", f"Landlock ABI {abi} < 6 cannot scope signals and abstract unix "
                                       "sockets (seccomp still restricts kill to the cVM's own pid)"))
    return LandlockResult(abi, ", ".join(parts), tuple(gaps), bool(scoped))
