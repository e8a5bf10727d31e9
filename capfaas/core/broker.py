"""The intravisor's side of sharing: who holds which shared object, and CAP_Files by name.

Granting sends a cVM one descriptor (read-only unless the grant is read-write) on its grant
channel, just before the control message that announces it, and records the capability the cVM
now holds, so whatever it hands back is checked against it. Payload buffers live as long as the
top-level invocation they serve; CAP_Files until they are deleted, which revokes them.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from . import wire
from .capability import Capability
from .capfiles import check_name
from .cvm import CVM
from .perms import Perm
from .ring import RingReader, RingWriter, init_ring, ring_size
from .shared import READ_ONLY, SharedArea, SharedObject

GiB = 1 << 30
MAX_FILES = 4096


class SharingUnavailable(Exception):
    """The cVM's backend cannot map grants; the payload is copied instead."""


class FileError(Exception):
    """A CAP_File request that cannot be granted; ``kind`` names the Python exception to raise."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    owner: str
    readers: tuple[str, ...]
    writers: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "owner": self.owner,
                "readers": list(self.readers), "writers": list(self.writers)}


class Broker:
    """Shared objects and their holders, for one intravisor."""

    def __init__(self, budget: int, max_file_size: int) -> None:
        self.area = SharedArea(budget)
        self.max_file_size = max_file_size
        """The largest CAP_File, and the most buffer bytes one cVM may hold in one invocation: as
        much as it can map (its grant space)."""
        self.max_owned = budget // 4
        """The most bytes of CAP_Files one function may own, so none can take the whole budget."""
        self.files: dict[str, SharedObject] = {}
        self._scoped: dict[str, list[SharedObject]] = {}
        self.cvms: dict[int, CVM] = {}
        """Every cVM that may hold grants (the intravisor's own table)."""

    # -- granting ----------------------------------------------------------------------------------

    @staticmethod
    def can_map(cvm: CVM) -> bool:
        return getattr(cvm.process, "grant_channel", None) is not None and cvm.spec.limits.concurrency == 1

    def grant(self, cvm: CVM, obj: SharedObject, *, writable: bool, transient: bool,
              extra_fds: tuple[int, ...] = (), fresh: bool = False, within: Capability | None = None) -> dict[str, Any]:
        """Give ``cvm`` access to ``obj`` (read-only access to just ``within``'s bounds, when given:
        a call's argument, not the whole buffer it lies in); returns the announcement for its
        control message, which says whether a descriptor was sent or an existing mapping serves."""
        if not self.can_map(cvm):
            raise SharingUnavailable(f"cVM {cvm.id} cannot map shared objects")
        cap = self.area.capability(obj, writable) if within is None else within.and_permissions(READ_ONLY)
        held = cvm.grants.get(obj.id)
        if (held is not None and not fresh and (bool(held.perms & Perm.STORE) or not writable)
                and held.base <= cap.base and cap.top <= held.top):
            return {"object": obj.id, "cap": held, "sent": False, "origin": obj.address}
        fd = obj.descriptor(writable)
        try:
            socket.send_fds(cvm.process.grant_channel, [wire.pack({"object": obj.id})], [fd, *extra_fds])
        except BlockingIOError:
            raise ConnectionError(f"cVM {cvm.id} does not take its grants") from None
        finally:
            os.close(fd)
        cvm.grants[obj.id] = cap
        if transient:
            cvm.transient.add(obj.id)
        return {"object": obj.id, "cap": cap, "sent": True, "origin": obj.address}

    def end_invocation(self, cvm: CVM, top_level_id: str | None) -> None:
        """The cVM unmapped its payload grants; a top-level invocation's buffers are released."""
        if not (cvm.transient or cvm.buffered or cvm.pipes or top_level_id in self._scoped):
            return  # the usual invocation: nothing was shared
        for object_id in cvm.transient:
            cvm.grants.pop(object_id, None)
        cvm.transient.clear()
        cvm.buffered = 0
        for pipe in cvm.pipes.values():  # opened to a call that was never made
            self.area.free(pipe)
        cvm.pipes.clear()
        if top_level_id is not None:
            for obj in self._scoped.pop(top_level_id, ()):
                self.area.free(obj)

    def payload(self, root: str, owner: str, size: int) -> tuple[Capability, memoryview]:
        """A buffer the gateway fills with a request body for top-level invocation ``root``: the
        read-only capability the function receives, and the writable view to fill."""
        obj = self._scoped_buffer(root, owner, size)
        return self.area.capability(obj, writable=False), memoryview(obj.mapping)

    def stream(self, owner: str, capacity: int) -> SharedObject:
        """A CAP_Stream: a ring in a shared object, with the two eventfds that wake each side.
        Whoever asked for it frees it (``area.free``) once both sides are done."""
        obj = self.area.create("stream", ring_size(capacity), owner)
        init_ring(obj.mapping, capacity)
        obj.events = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        obj.closers.append(lambda: [os.close(fd) for fd in obj.events])
        return obj

    def stream_end(self, obj: SharedObject, *, writer: bool) -> Any:
        """The intravisor's own end of a stream (non-blocking: it waits on the eventfds itself)."""
        end = (RingWriter if writer else RingReader)(obj.mapping, *obj.events, timeout=0)
        obj.closers.insert(0, end.close)
        return end

    def grant_stream(self, cvm: CVM, obj: SharedObject) -> dict[str, Any]:
        """Grant a stream's ring (read-write: each side publishes its counter) and its eventfds."""
        return self.grant(cvm, obj, writable=True, transient=True, extra_fds=obj.events)

    def _scoped_buffer(self, root: str, owner: str, size: int) -> SharedObject:
        """A new payload buffer, released when the top-level invocation ``root`` ends."""
        obj = self.area.create("buffer", size, owner)
        self._scoped.setdefault(root, []).append(obj)
        return obj

    def release(self, root: str) -> None:
        """Release the buffers of top-level invocation ``root`` (one that never ran)."""
        for obj in self._scoped.pop(root, ()):
            self.area.free(obj)

    def find(self, cap: Any, length: int) -> SharedObject | None:
        return self.area.find(cap, length)

    def _charge(self, cvm: CVM, size: int) -> None:
        """Count a buffer against what ``cvm`` may hold in this invocation (a cVM that asks without
        mapping what it gets cannot hoard the shared budget)."""
        if cvm.buffered + size > self.max_file_size:
            raise MemoryError(f"{size} more bytes of shared buffers would pass this invocation's "
                              f"{self.max_file_size}-byte allowance ({cvm.buffered} held)")
        cvm.buffered += size

    def buffer(self, cvm: CVM, size: int) -> dict[str, Any]:
        """A fresh read-write payload buffer for ``cvm``, released with its top-level invocation."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"a buffer's size must be a number of bytes, got {size!r}")
        self._charge(cvm, size)
        return self.grant(cvm, self._scoped_buffer(cvm.root, cvm.spec.name, size), writable=True, transient=True)

    def copy_into_buffer(self, cvm: CVM, data: Any) -> tuple[Capability, dict[str, Any]]:
        """``data`` copied once into a new buffer granted read-only to ``cvm``."""
        self._charge(cvm, len(data))
        obj = self._scoped_buffer(cvm.root, cvm.spec.name, max(len(data), 1))
        self.area.fill(obj, data)
        announced = self.grant(cvm, obj, writable=False, transient=True)
        return announced["cap"].set_bounds(len(data)) if len(data) else announced["cap"], announced

    # -- CAP_Files ---------------------------------------------------------------------------------

    def _file(self, name: Any) -> SharedObject:
        try:
            check_name(name)
        except ValueError as exc:
            raise FileError("ValueError", str(exc)) from None
        obj = self.files.get(name)
        if obj is None:
            raise FileError("FileNotFoundError", f"no CAP_File named {name!r}")
        return obj

    def create_file(self, owner: str, name: Any, size: Any, contents: bytes = b"") -> SharedObject:
        try:
            check_name(name)
        except ValueError as exc:
            raise FileError("ValueError", str(exc)) from None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= self.max_file_size:
            raise FileError("ValueError", f"a CAP_File's size must be 1 to {self.max_file_size} bytes, got {size!r}")
        if name in self.files:
            raise FileError("FileExistsError", f"a CAP_File named {name!r} exists (owned by {self.files[name].owner!r})")
        if len(self.files) >= MAX_FILES:
            raise FileError("MemoryError", f"at most {MAX_FILES} CAP_Files may exist at once")
        if len(contents) > size:
            raise FileError("ValueError", f"{len(contents)} bytes of contents do not fit a {size}-byte CAP_File")
        owned = sum(obj.size for obj in self.files.values() if obj.owner == owner)
        if owned + size > self.max_owned:
            raise FileError("MemoryError", f"function {owner!r} owns {owned} bytes of CAP_Files; {size} more would "
                                           f"pass the {self.max_owned}-byte allowance per function")
        try:
            obj = self.area.create("file", size, owner, name)
        except MemoryError as exc:
            raise FileError("MemoryError", str(exc)) from None
        self.area.fill(obj, contents)
        self.files[name] = obj
        return obj

    def open_file(self, cvm: CVM, name: Any, write: bool) -> dict[str, Any]:
        obj = self._file(name)
        function = cvm.spec.name
        if not obj.may_read(function) or write and not obj.may_write(function):
            raise FileError("PermissionError", f"function {function!r} holds no {'read-write' if write else 'read'} "
                                               f"grant to CAP_File {name!r} (owner {obj.owner!r})")
        return self.grant(cvm, obj, writable=write, transient=False, fresh=True)  # unmapped when closed

    def grant_file(self, owner: str, name: Any, function: Any, write: bool) -> None:
        obj = self._file(name)
        if owner != obj.owner:
            raise FileError("PermissionError", f"only CAP_File {name!r}'s owner {obj.owner!r} may grant it")
        if not isinstance(function, str) or not function:
            raise FileError("ValueError", "a grant must name a function")
        (obj.writers if write else obj.readers).add(function)
        if not write:
            obj.writers.discard(function)

    def delete_file(self, name: Any, owner: str | None = None) -> None:
        """Delete and revoke: every holder's mapping faults from now on (``owner`` None: the admin)."""
        obj = self._file(name)
        if owner is not None and owner != obj.owner:
            raise FileError("PermissionError", f"only CAP_File {name!r}'s owner {obj.owner!r} may delete it")
        del self.files[obj.name]
        self.area.free(obj)
        for cvm in self.cvms.values():
            cvm.grants.pop(obj.id, None)

    def list_files(self, function: str | None = None) -> list[FileInfo]:
        """Every CAP_File (or those ``function`` may open), by name."""
        return [FileInfo(obj.name, obj.size, obj.owner, tuple(sorted(obj.readers)), tuple(sorted(obj.writers)))
                for name, obj in sorted(self.files.items())
                if obj.name is not None and (function is None or obj.may_read(function))]

    def close(self) -> None:
        self.files.clear()
        self._scoped.clear()
        self.area.close()
