"""The memory the intravisor holds on Morello: a staging area, not the cVMs' memory.

On Morello a cVM's region lives in its monitor's address space, guarded by real capabilities the
monitor derives from the YAML; the gateway process cannot map it. What core calls "memory" is
therefore, on this backend, a staging area in the process that holds it: capabilities into it
are the intravisor's bookkeeping (checked exactly as the emulator checks them), and a payload
placed in it is copied once more, inline into the control message, before it reaches the cVM.
The agent uses the same class for its own heap, so the runtime's ``share`` works unchanged.

Only written bytes cost memory: each write makes an extent, a later write over it replaces it,
and ``release`` drops a stopped cVM's extents. Nothing else maps anything, so a region of 1 GiB
costs nothing inside a cVM whose library OS has less than that.
"""
from __future__ import annotations

import bisect
import mmap
from typing import Any

from capfaas.core.capability import Capability
from capfaas.core.faults import UnmappedFault, diagnose_access
from capfaas.core.perms import Perm

_LOAD = int(Perm.LOAD)
_STORE = int(Perm.STORE)
LAZY_FROM = 1 << 20
"""Extents from this size up are anonymous mappings: zero pages cost nothing until written, so a
body announced as large but sent short, or a chunked one given the whole area, stays cheap."""


class StagingMemory:
    """Bytes addressed through capabilities, held as extents; the interface core and runtime use."""

    def __init__(self, size: int, base: int) -> None:
        self.size = size
        self.base = base
        self._starts: list[int] = []
        self._extents: dict[int, bytearray | mmap.mmap] = {}

    def root_capability(self) -> Capability:
        cap = Capability.root().set_address(self.base).set_bounds_exact(self.size)
        if not cap.tag:
            raise ValueError(f"a {self.size:#x}-byte area at {self.base:#x} is not exactly representable")
        return cap

    def _check(self, cap: Any, address: int, size: int, required: int, access: str) -> None:
        if not isinstance(cap, Capability):
            raise TypeError(f"expected a Capability, not {type(cap).__name__}")
        if size < 0 or address < 0:
            raise ValueError("address and size must not be negative")
        if not (cap.tag and not cap.otype and cap.perms & required == required
                and cap.base <= address and address + size <= cap.top):
            raise diagnose_access(cap, address, size, required, access)
        if address < self.base or address + size > self.base + self.size:
            raise UnmappedFault(cap, address, size, access,
                                f"the staging area is [{self.base:#x}, {self.base + self.size:#x})")

    def _overlapping(self, start: int, end: int) -> list[int]:
        first = bisect.bisect_right(self._starts, start) - 1
        found = []
        for start_at in self._starts[max(first, 0):]:
            if start_at >= end:
                break
            if start_at + len(self._extents[start_at]) > start:
                found.append(start_at)
        return found

    def _replace(self, address: int, buffer: bytearray | mmap.mmap) -> None:
        self.release(address, address + len(buffer))
        bisect.insort(self._starts, address)
        self._extents[address] = buffer

    def release(self, start: int, end: int) -> None:
        """Forget every extent overlapping ``[start, end)`` (a stopped cVM's region, a rewrite)."""
        for start_at in self._overlapping(start, end):
            self._starts.remove(start_at)
            del self._extents[start_at]

    def writable_view(self, cap: Capability, address: int, size: int) -> memoryview:
        """A fresh, zeroed, writable extent of ``size`` bytes at ``address``."""
        self._check(cap, address, size, _LOAD | _STORE, "store")
        buffer = mmap.mmap(-1, size) if size >= LAZY_FROM else bytearray(size)
        self._replace(address, buffer)
        return memoryview(buffer)

    def store(self, cap: Capability, address: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._check(cap, address, len(view), _STORE, "store")
        self._replace(address, bytearray(view))

    def view(self, cap: Capability, address: int, size: int) -> memoryview:
        """The bytes at ``[address, address + size)``: zero-copy inside one extent, else assembled
        (bytes never written read as zero)."""
        self._check(cap, address, size, _LOAD, "load")
        for start_at in self._overlapping(address, address + size):
            extent = self._extents[start_at]
            if start_at <= address and address + size <= start_at + len(extent):
                return memoryview(extent)[address - start_at:address - start_at + size].toreadonly()
        out = bytearray(size)
        for start_at in self._overlapping(address, address + size):
            extent = self._extents[start_at]
            lo, hi = max(start_at, address), min(start_at + len(extent), address + size)
            out[lo - address:hi - address] = extent[lo - start_at:hi - start_at]
        return memoryview(out).toreadonly()

    def load(self, cap: Capability, address: int, size: int) -> bytes:
        return self.view(cap, address, size).tobytes()

    def close(self) -> None:
        self._starts.clear()
        self._extents.clear()
