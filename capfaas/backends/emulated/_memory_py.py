"""Emulated Morello memory in pure Python: the twin of the compiled ``_memory`` module.

One sparse memfd holds the segment's data followed by its tag bitmap (one bit per 16-byte
granule), mapped shared, so every process given the fd sees the same bytes and the same tags.
Every access goes through a capability and is checked the way the hardware checks it.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any

from capfaas.core._capability_py import Capability
from capfaas.core.faults import AlignmentFault, UnmappedFault, diagnose_access
from capfaas.core.perms import Perm

from .layout import DEFAULT_SEGMENT_BASE, GRANULE, check_segment, tag_bytes_for

_LOAD = int(Perm.LOAD)
_STORE = int(Perm.STORE)
_U64 = struct.Struct("<Q")
_LOSES_WITHOUT_MUTABLE_LOAD = int(Perm.STORE | Perm.STORE_CAP | Perm.STORE_LOCAL_CAP | Perm.MUTABLE_LOAD)


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


class TaggedMemory:
    """The shared segment: data bytes plus one tag bit per granule, reached only through capabilities."""

    def __init__(self, size: int, *, base: int = DEFAULT_SEGMENT_BASE, fd: int | None = None,
                 offset: int = 0, segment_size: int | None = None) -> None:
        segment_size = size if segment_size is None else segment_size
        check_segment(size, base, offset, segment_size)
        self.size = size
        self.base = base
        needed = segment_size + tag_bytes_for(segment_size)
        if fd is None:
            if offset or segment_size != size:
                raise ValueError("a window (offset, segment_size) needs the fd of an existing segment")
            fd = os.memfd_create("capfaas-segment", os.MFD_CLOEXEC)
            os.ftruncate(fd, needed)
        elif os.fstat(fd).st_size < needed:
            raise ValueError(f"fd {fd} holds {os.fstat(fd).st_size} bytes; a {segment_size}-byte segment needs {needed}")
        self.fd = fd
        protection = mmap.PROT_READ | mmap.PROT_WRITE
        self._data_map = mmap.mmap(fd, size, mmap.MAP_SHARED, protection, offset=offset)
        self._tag_map = mmap.mmap(fd, tag_bytes_for(size), mmap.MAP_SHARED, protection,
                                  offset=segment_size + offset // (GRANULE * 8))
        self._data = memoryview(self._data_map)
        self._tags = memoryview(self._tag_map)

    def close(self) -> None:
        """Unmap the segment and close its fd; idempotent."""
        if self._data is not None:
            self._data.release()
            self._tags.release()
            self._data = self._tags = None  # type: ignore[assignment]
            self._data_map.close()
            self._tag_map.close()
            os.close(self.fd)

    def __enter__(self) -> TaggedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def root_capability(self) -> Capability:
        """A capability with every permission over exactly this segment."""
        cap = Capability.root().set_address(self.base).set_bounds_exact(self.size)
        if not cap.tag:
            raise ValueError(f"a {self.size:#x}-byte segment at {self.base:#x} is not exactly representable")
        return cap

    # -- checks --------------------------------------------------------------------------------

    def _offset(self, cap: Capability, address: int, size: int, required: int, access: str) -> int:
        """Check one access the hardware's way and return its offset into the segment."""
        if not isinstance(cap, Capability):
            raise TypeError(f"expected a Capability, not {type(cap).__name__}")
        _check_int("address", address)
        _check_int("size", size)
        if not (cap.tag and not cap.otype and cap.pesbt >> 46 & required == required
                and cap.base <= address and address + size <= cap.top):
            raise diagnose_access(cap, address, size, required, access)
        offset = address - self.base
        if offset < 0 or offset + size > self.size:
            raise UnmappedFault(cap, address, size, access,
                                f"the segment is [{self.base:#x}, {self.base + self.size:#x})")
        return offset

    def _clear_tags(self, offset: int, size: int) -> None:
        if size == 0:
            return
        first, last = offset // GRANULE, (offset + size - 1) // GRANULE
        tags = self._tags
        first_byte, last_byte = first >> 3, last >> 3
        if first_byte == last_byte:
            tags[first_byte] &= ~(((1 << (last - first + 1)) - 1) << (first & 7)) & 0xFF
            return
        tags[first_byte] &= (1 << (first & 7)) - 1
        tags[last_byte] &= ~((2 << (last & 7)) - 1) & 0xFF
        if last_byte > first_byte + 1:
            tags[first_byte + 1:last_byte] = bytes(last_byte - first_byte - 1)

    def _aligned(self, cap: Capability, address: int, access: str) -> None:
        if address % GRANULE:
            raise AlignmentFault(cap, address, GRANULE, access,
                                 "capabilities live on 16-byte aligned granules")

    # -- data ----------------------------------------------------------------------------------

    def load(self, cap: Capability, address: int, size: int) -> bytes:
        offset = self._offset(cap, address, size, _LOAD, "load")
        return self._data[offset:offset + size].tobytes()

    def load_u64(self, cap: Capability, address: int) -> int:
        offset = self._offset(cap, address, 8, _LOAD, "load")
        return _U64.unpack_from(self._data, offset)[0]

    def store(self, cap: Capability, address: int, data: Any) -> None:
        data = memoryview(data).cast("B")
        offset = self._offset(cap, address, len(data), _STORE, "store")
        self._data[offset:offset + len(data)] = data
        self._clear_tags(offset, len(data))

    def store_u64(self, cap: Capability, address: int, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not 0 <= value < 1 << 64:
            raise ValueError(f"value must be in [0, 2**64), got {value:#x}")
        offset = self._offset(cap, address, 8, _STORE, "store")
        _U64.pack_into(self._data, offset, value)
        self._clear_tags(offset, 8)

    def copy(self, dst: Capability, dst_address: int, src: Capability, src_address: int, size: int) -> None:
        """memmove through two capabilities; the destination's tags are cleared."""
        src_offset = self._offset(src, src_address, size, _LOAD, "load")
        dst_offset = self._offset(dst, dst_address, size, _STORE, "store")
        self._data[dst_offset:dst_offset + size] = self._data[src_offset:src_offset + size]
        self._clear_tags(dst_offset, size)

    def view(self, cap: Capability, address: int, size: int) -> memoryview:
        """A read-only, zero-copy window on ``size`` bytes, checked once."""
        offset = self._offset(cap, address, size, _LOAD, "load")
        return self._data[offset:offset + size].toreadonly()

    def writable_view(self, cap: Capability, address: int, size: int) -> memoryview:
        """A writable, zero-copy window, checked once for Load and Store; its tags are cleared now,
        as any data store would, so bytes written through it can never pass for a capability."""
        offset = self._offset(cap, address, size, _LOAD | _STORE, "store")
        self._clear_tags(offset, size)
        return self._data[offset:offset + size]

    # -- capabilities --------------------------------------------------------------------------

    def tag_at(self, address: int) -> bool:
        """The tag of the granule holding ``address`` (inspection only, no authority needed)."""
        offset = _check_int("address", address) - self.base
        if not 0 <= offset < self.size:
            raise ValueError(f"address {address:#x} is outside the segment")
        granule = offset // GRANULE
        return bool(self._tags[granule >> 3] >> (granule & 7) & 1)

    def load_capability(self, auth: Capability, address: int) -> Capability:
        offset = self._offset(auth, address, GRANULE, _LOAD, "load capability")
        self._aligned(auth, address, "load capability")
        tag = self.tag_at(address) and bool(auth.perms & Perm.LOAD_CAP)
        loaded = Capability.from_bytes(self._data[offset:offset + GRANULE], tag)
        if tag and not loaded.sealed and not auth.perms & Perm.MUTABLE_LOAD:
            loaded = loaded.clear_permissions(loaded.perms & _LOSES_WITHOUT_MUTABLE_LOAD)
        return loaded

    def store_capability(self, auth: Capability, address: int, cap: Capability) -> None:
        if not isinstance(cap, Capability):
            raise TypeError(f"expected a Capability to store, not {type(cap).__name__}")
        required = _STORE
        if cap.tag:
            required |= Perm.STORE_CAP
            if not cap.perms & Perm.GLOBAL:
                required |= Perm.STORE_LOCAL_CAP
        offset = self._offset(auth, address, GRANULE, int(required), "store capability")
        self._aligned(auth, address, "store capability")
        self._data[offset:offset + GRANULE] = cap.to_bytes()
        granule = offset // GRANULE
        bit = 1 << (granule & 7)
        tags = self._tags
        tags[granule >> 3] = tags[granule >> 3] | bit if cap.tag else tags[granule >> 3] & ~bit & 0xFF
