"""Dereference faults: the only errors the capability model raises for a rule violation.

Capability *manipulation* never faults (it detags, as the hardware does); using a capability to
touch memory does. Each fault carries the Morello fault status code and the Linux ``si_code`` a
CHERI kernel would report, the capability, and the attempted access, so a person can see what was
tried and what authority was missing.
"""
from __future__ import annotations

from typing import Any

from .perms import Perm


class MemoryFault(Exception):
    """An access the emulated hardware refused."""

    code: int | None = None
    si_code: int | None = None
    title = "memory fault"

    def __init__(self, capability: Any, address: int, size: int, access: str, detail: str) -> None:
        self.capability = capability
        self.address = address
        self.size = size
        self.access = access
        self.detail = detail
        code = f" (fault code {self.code:#04x})" if self.code is not None else ""
        super().__init__(f"{self.title}{code}: {access} of {size} byte(s) at {address:#x}: {detail}")


class CapabilityFault(MemoryFault):
    """A capability check failed (Morello raises these as SIGSEGV with a CHERI si_code)."""

    title = "capability fault"


class TagFault(CapabilityFault):
    code, si_code, title = 0x28, 10, "capability tag fault"


class SealedFault(CapabilityFault):
    code, si_code, title = 0x29, 11, "capability sealed fault"


class BoundsFault(CapabilityFault):
    code, si_code, title = 0x2A, 12, "capability bounds fault"


class PermissionFault(CapabilityFault):
    code, si_code, title = 0x2B, 13, "capability permission fault"


class StoreTagFault(CapabilityFault):
    """A tagged capability stored where tags may not be kept (Morello: capability page fault)."""

    code, si_code, title = 0x30, 14, "capability store-tag fault"


class AlignmentFault(MemoryFault):
    """A capability-sized access that is not 16-byte aligned (SIGBUS, BUS_ADRALN)."""

    code, si_code, title = 0x21, 1, "alignment fault"


class UnmappedFault(MemoryFault):
    """An access the capability allows but that lies outside the emulated segment (SEGV_MAPERR)."""

    code, si_code, title = 0x07, 1, "translation fault"


def _perm_names(mask: int) -> str:
    return ", ".join(p.name for p in Perm if mask & p) or "none"


def check_access(cap: Any, address: int, size: int, required: int, access: str) -> None:
    """Raise the fault a data access through ``cap`` would take, if it would take one: the checks
    the emulated memory makes, for memory outside it (shared objects)."""
    if not (cap.tag and not cap.otype and cap.perms & required == required
            and cap.base <= address and address + size <= cap.top):
        raise diagnose_access(cap, address, size, required, access)


def diagnose_access(cap: Any, address: int, size: int, required: int, access: str) -> CapabilityFault:
    """Build the fault a refused data access raises, checking in Morello's order.

    Called only after a fast combined check failed, so it may be slow and thorough.
    """
    if not cap.tag:
        return TagFault(cap, address, size, access,
                        "the capability is not tagged (it was derived against the rules or forged); "
                        "use one derived from a valid capability")
    if cap.otype:
        return SealedFault(cap, address, size, access,
                           f"the capability is sealed with object type {cap.otype:#x}; "
                           "unseal it (or branch to a sentry) before using it")
    missing = required & ~cap.perms
    if missing:
        return PermissionFault(cap, address, size, access,
                               f"the capability lacks {_perm_names(missing)} "
                               f"(it has {_perm_names(cap.perms)})")
    return BoundsFault(cap, address, size, access,
                       f"[{address:#x}, {address + size:#x}) lies outside the capability's bounds "
                       f"[{cap.base:#x}, {cap.top:#x}); derive a capability that covers the access")
