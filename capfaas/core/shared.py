"""Shared objects: memory several cVMs map at once, each through a capability bounded to it.

A cVM's region is its alone. What functions share (CAP_Files, payloads handed from one function to
another, stream rings) lives in objects outside every region, each its own memfd at its own
address in the shared area after the segment. Granting an object sends the grantee a descriptor
for just that object (read-only, or read-write), so it maps exactly what it was granted and
nothing else; the bytes never move. Addresses are never reused, so a stale capability can never
reach a later object, and revoking an object truncates its memfd: every holder's later access
faults.
"""
from __future__ import annotations

import fcntl
import itertools
import mmap
import os
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from .capability import Capability, representable_alignment_mask, representable_length
from .faults import TagFault, check_access
from .perms import Perm

PAGE = mmap.PAGESIZE
SHARED_AREA_BASE = 1 << 46
"""Far above the segment (which starts at 2**44 and spans at most 2**45)."""
SHARED_AREA_SIZE = 1 << 50
READ_ONLY = int(Perm.LOAD | Perm.GLOBAL)
READ_WRITE = int(Perm.LOAD | Perm.STORE | Perm.GLOBAL)


class SharedAreaFull(MemoryError):
    """No address space or byte budget is left for another shared object."""


@dataclass(eq=False)
class SharedObject:
    """One memfd-backed object: where it sits, who owns it, who may use it."""

    id: int
    kind: str
    """``buffer`` (a payload), ``file`` (a CAP_File) or ``stream`` (a CAP_Stream ring)."""
    address: int
    size: int
    fd: int
    mapping: mmap.mmap
    owner: str
    """The function that created it; it holds read-write access."""
    name: str | None = None
    readers: set[str] = field(default_factory=set)
    writers: set[str] = field(default_factory=set)
    revoked: bool = False
    events: tuple[int, ...] = ()
    """A stream's eventfds (data available, space available), granted along with it."""
    closers: list[Callable[[], object]] = field(default_factory=list)
    """What the intravisor releases with the object (its end of a stream, the eventfds)."""

    @property
    def top(self) -> int:
        return self.address + self.size

    def may_read(self, function: str) -> bool:
        return function == self.owner or function in self.readers or function in self.writers

    def may_write(self, function: str) -> bool:
        return function == self.owner or function in self.writers

    def descriptor(self, writable: bool) -> int:
        """A new descriptor for this object alone: read-only ones cannot be mapped writable."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR if writable else os.O_RDONLY)


class SharedArea:
    """The intravisor's table of shared objects, and its own checked view of their bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        """Bytes all live objects may hold together."""
        self.used = 0
        self.root = Capability.root().set_address(SHARED_AREA_BASE).set_bounds_exact(SHARED_AREA_SIZE)
        self._next_address = SHARED_AREA_BASE
        self._ids = itertools.count(1)
        self.objects: dict[int, SharedObject] = {}

    def create(self, kind: str, size: int, owner: str, name: str | None = None) -> SharedObject:
        """A zero-filled object of ``size`` bytes at a fresh address, owned by ``owner``; a size that
        bounds cannot represent exactly is rounded up to one they can, as a CHERI allocator does."""
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"a shared object's size must be a positive number of bytes, got {size!r}")
        size = representable_length(size) or size  # 0: it wrapped past 2**64, far above any budget
        if self.used + size > self.budget:
            raise SharedAreaFull(f"{size} more bytes of shared objects would exceed the {self.budget}-byte budget "
                                 f"({self.used} in use)")
        mask = representable_alignment_mask(size) & ~(PAGE - 1)
        address = (self._next_address + ~mask) & mask
        length = size + (-size % PAGE)
        if address + length > SHARED_AREA_BASE + SHARED_AREA_SIZE:
            raise SharedAreaFull("the shared area's address space is used up")
        fd = os.memfd_create(f"capfaas-{kind}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # holders may not grow it
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._next_address = address + length
        self.used += size
        obj = SharedObject(next(self._ids), kind, address, size, fd, mapping, owner, name)
        self.objects[obj.id] = obj
        return obj

    def capability(self, obj: SharedObject, writable: bool) -> Capability:
        cap = self.root.set_address(obj.address).set_bounds_exact(obj.size)
        return cap.and_permissions(READ_WRITE if writable else READ_ONLY)

    def find(self, cap: Any, length: int) -> SharedObject | None:
        """The live object ``[cap.address, +length)`` lies in, if it is in the shared area at all."""
        if not isinstance(cap, Capability) or not SHARED_AREA_BASE <= cap.address < SHARED_AREA_BASE + SHARED_AREA_SIZE:
            return None
        for obj in self.objects.values():
            if obj.address <= cap.address and cap.address + length <= obj.top:
                return obj
        return None

    def view(self, cap: Capability, address: int, size: int) -> memoryview | bytes:
        """``size`` bytes at ``address``, checked against ``cap``: a read-only view of a payload, but a
        copy of a CAP_File's bytes, since a CAP_File can be revoked (truncated) at any moment."""
        check_access(cap, address, size, int(Perm.LOAD), "load")
        obj = self.find(cap.set_address(address), size)
        if obj is None:
            raise TagFault(cap, address, size, "load", "no live shared object is there: it was revoked or freed")
        offset = address - obj.address
        view = memoryview(obj.mapping)[offset:offset + size]
        return view.tobytes() if obj.kind == "file" else view.toreadonly()

    def fill(self, obj: SharedObject, data: Any, offset: int = 0) -> None:
        """Copy ``data`` into ``obj`` at ``offset`` (the intravisor's own write, e.g. initial contents)."""
        data = memoryview(data).cast("B")
        if offset < 0 or offset + len(data) > obj.size:
            raise ValueError(f"{len(data)} bytes at offset {offset} do not fit a {obj.size}-byte object")
        obj.mapping[offset:offset + len(data)] = data

    def free(self, obj: SharedObject) -> None:
        """Forget ``obj``; a CAP_File is also revoked: its memfd is truncated, so every holder's later
        access faults. Payload buffers and stream rings are not truncated, since views of them may
        still be in use (an HTTP response being sent, a writer mid-copy); their memory goes when
        the last mapping does."""
        if self.objects.pop(obj.id, None) is None:
            return
        obj.revoked = True
        self.used -= obj.size
        for close in obj.closers:
            close()
        try:
            if obj.kind == "file":
                obj.mapping.close()  # the intravisor never keeps a view of these (see ``view``)
                os.ftruncate(obj.fd, 0)  # shrinking is allowed: only growth is sealed
        finally:
            os.close(obj.fd)

    def close(self) -> None:
        for obj in list(self.objects.values()):
            self.free(obj)
