"""Shared objects inside a cVM: the grants the intravisor sent, mapped and reached by capability.

A grant arrives as a descriptor for one object on the cVM's grant channel, announced by the
control message that needs it. The runtime maps it into address space reserved for grants when the
cVM started, so mapping it costs no more of the cVM's memory limit (an address-space limit) than
the reservation did: the function cannot use grant space for its own heap, and a grant cannot
push the function over its limit.
"""
from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import wire
from .capability import Capability
from .faults import TagFault, check_access
from .perms import Perm

CHUNK = 16 << 20
"""Grant space is reserved, and handed to grants, in pieces of this size."""
Mapper = Callable[..., mmap.mmap]


def grant_space_for(region_size: int) -> int:
    """Address space a cVM keeps for grants: as much as the receive half of its region."""
    return region_size // 2

"""``mmap.mmap`` as the library OS lets the runtime call it (function code may not)."""


class GrantSpace:
    """Address space held in reserve (inaccessible anonymous mappings) for grants to map into."""

    def __init__(self, size: int, mapper: Mapper) -> None:
        self.mapper = mapper
        self.size = size - size % CHUNK
        self._reserved = [self._reserve() for _ in range(self.size // CHUNK)]

    def _reserve(self) -> mmap.mmap:
        return self.mapper(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)

    @property
    def free(self) -> int:
        return len(self._reserved) * CHUNK

    def take(self, length: int) -> None:
        chunks = -(-length // CHUNK)
        if chunks > len(self._reserved):
            raise MemoryError(f"a {length}-byte grant does not fit this cVM's grant space "
                              f"({self.free} of {self.size} bytes free)")
        for _ in range(chunks):
            self._reserved.pop().close()

    def give_back(self, length: int) -> None:
        for _ in range(-(-length // CHUNK)):
            self._reserved.append(self._reserve())


@dataclass(eq=False)
class Grant:
    """One mapped shared object and the capability this cVM holds to it."""

    id: int
    capability: Capability
    fd: int
    mapping: mmap.mmap
    transient: bool
    """A payload granted for one invocation (unmapped after it), not a CAP_File kept open."""
    mapped_at: int = 0
    """The address the mapping's first byte stands for (the page holding the capability's base)."""
    mapped_size: int = 0
    events: tuple[int, ...] = ()
    """A CAP_Stream's eventfds: data available, space available."""
    users: int = 0
    """Open CAP_File objects using this mapping; it goes when the last one closes."""

    @property
    def revoked(self) -> bool:
        """A revoked object's memfd has been truncated by the intravisor."""
        return os.fstat(self.fd).st_size == 0

    def view(self, cap: Capability, address: int, size: int, *, writable: bool = False) -> memoryview:
        """``size`` bytes at ``address`` through ``cap``: checked once, then zero-copy."""
        check_access(cap, address, size, int(Perm.LOAD | Perm.STORE) if writable else int(Perm.LOAD),
                     "store" if writable else "load")
        if self.revoked:
            raise TagFault(cap, address, size, "load", "the shared object was revoked (its CAP_File was deleted)")
        offset = address - self.mapped_at
        view = memoryview(self.mapping)[offset:offset + size]
        return view if writable else view.toreadonly()


def ring(grant: Grant) -> memoryview:
    """A CAP_Stream's ring as this cVM reaches it: through its read-write capability, checked once."""
    cap = grant.capability
    return grant.view(cap, cap.base, cap.top - cap.base, writable=True)


class Grants:
    """The grants this cVM holds, received over its grant channel."""

    def __init__(self, channel: socket.socket, space: GrantSpace) -> None:
        self.channel = channel
        self.space = space
        self.held: dict[int, Grant] = {}
        self._lingering: list[Grant] = []

    def accept(self, announced: dict[str, Any], *, transient: bool) -> Grant:
        """Receive the descriptor ``announced`` by a control message and map it."""
        cap = announced["cap"]
        if not announced.get("sent"):  # already mapped here
            held = self.held.get(announced.get("object"))  # type: ignore[arg-type]
            if held is None:
                raise ConnectionError(f"the intravisor refers to shared object {announced.get('object')!r}, "
                                      "which this cVM does not hold")
            return held
        data, fds, _, _ = socket.recv_fds(self.channel, 256, 3)
        header = _header(data)
        if not fds or header.get("object") != announced.get("object"):
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the grant channel is out of step with the control channel")
        origin = int(announced.get("origin", cap.base))
        start = (cap.base - origin) & ~(mmap.PAGESIZE - 1)  # only the pages the capability reaches
        end = min(-(-(cap.top - origin) // mmap.PAGESIZE) * mmap.PAGESIZE, os.fstat(fds[0]).st_size)
        size = end - start
        self.space.take(size)
        writable = bool(cap.perms & Perm.STORE)
        try:
            mapping = self.space.mapper(fds[0], size, mmap.MAP_SHARED,
                                        mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0), offset=start)
        except BaseException:
            self.space.give_back(size)
            for fd in fds:
                os.close(fd)
            raise
        grant = Grant(announced["object"], cap, fds[0], mapping, transient, events=tuple(fds[1:]),
                      mapped_at=origin + start, mapped_size=size)
        replaced = self.held.get(grant.id)
        self.held[grant.id] = grant
        if replaced is not None and not replaced.users:  # a fresh descriptor for the same object
            self._lingering.append(replaced)
            self._sweep()
        return grant

    def release(self, grant: Grant) -> None:
        """A CAP_File closed: unmap its grant once no other open file uses it."""
        grant.users -= 1
        if grant.users <= 0 and not grant.transient:
            if self.held.get(grant.id) is grant:
                del self.held[grant.id]
            self._lingering.append(grant)
            self._sweep()

    def find(self, cap: Capability, length: int) -> Grant | None:
        for grant in self.held.values():
            if grant.capability.base <= cap.address and cap.address + length <= grant.capability.top:
                return grant
        return None

    def drop(self, grant: Grant) -> None:
        """Unmap ``grant`` now, or as soon as nothing views it any more."""
        self.held.pop(grant.id, None)
        self._lingering.append(grant)
        self._sweep()

    def drop_transient(self) -> None:
        """After an invocation: the payloads granted for it go."""
        for grant in [g for g in self.held.values() if g.transient]:
            self.drop(grant)

    def _sweep(self) -> None:
        still: list[Grant] = []
        for grant in self._lingering:
            try:
                grant.mapping.close()
            except BufferError:  # function code still holds a view of it
                still.append(grant)
                continue
            for fd in (grant.fd, *grant.events):
                os.close(fd)
            self.space.give_back(grant.mapped_size)
        self._lingering = still


def _header(data: bytes) -> dict[str, Any]:
    unpacker = wire.unpacker()
    unpacker.feed(data)
    message = next(unpacker, None)
    return message if isinstance(message, dict) else {}
