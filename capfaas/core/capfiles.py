"""CAP_Files as function code sees them: file objects under ``/cap/NAME`` and zero-copy buffers.

A CAP_File is a named shared object. Its owner (the function that created or declared it) holds
read-write access and grants read-only or read-write access to other functions by name. Every
read, write and view goes through the capability this cVM holds, so a write through a read-only
grant or past the end raises the capability fault with its details, and once the file is deleted
(revoked), any later use by any holder faults.
"""
from __future__ import annotations

import builtins
import io
import os
import re
from collections.abc import Callable
from typing import Any

from .capability import Capability
from .grants import Grant
from .perms import Perm

PREFIX = "/cap/"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""What a CAP_File may be called (checked again by the intravisor)."""
MODES = {"r": "r", "w": "w", "r+": "r+", "w+": "r+"}
"""Open modes without ``b``, and what each allows (``w`` never truncates: the size is fixed)."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"invalid CAP_File name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "not starting with '.' or '-'")
    return name


class CapFile(io.RawIOBase):
    """An open CAP_File: ``read``, ``readinto``, ``write``, ``seek`` and a zero-copy ``view()``."""

    def __init__(self, name: str, grant: Grant, mode: str, release: Callable[[Grant], None]) -> None:
        super().__init__()
        self.name = PREFIX + name
        self.mode = mode
        self._grant = grant
        self._release = release
        grant.users += 1
        self._cap: Capability = grant.capability
        self._position = 0

    @property
    def capability(self) -> Capability:
        """The capability this cVM holds: hand it to ``context.call`` to share the file's bytes."""
        return self._cap

    @property
    def size(self) -> int:
        return self._cap.top - self._cap.base

    def readable(self) -> bool:
        return "r" in self.mode or "+" in self.mode

    def writable(self) -> bool:
        return "w" in self.mode or "a" in self.mode or "+" in self.mode

    def seekable(self) -> bool:
        return True

    def view(self) -> memoryview:
        """The whole file as a buffer, checked once: writable only through a read-write grant."""
        self._check_open()
        return self._grant.view(self._cap, self._cap.base, self.size, writable=bool(self._cap.perms & Perm.STORE))

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        if not self.readable():
            raise io.UnsupportedOperation("this CAP_File was not opened for reading")
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), self.size - self._position))
        target[:count] = self._grant.view(self._cap, self._cap.base + self._position, count)
        self._position += count
        return count

    def write(self, data: Any) -> int:
        self._check_open()
        if not self.writable():
            raise io.UnsupportedOperation("this CAP_File was not opened for writing")
        source = memoryview(data).cast("B")
        self._grant.view(self._cap, self._cap.base + self._position, len(source), writable=True)[:] = source
        self._position += len(source)
        return len(source)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"cannot seek to {base + offset}: before the start of {self.name}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("a CAP_File has a fixed size (its capability's bounds)")

    def close(self) -> None:
        """Close the file; its mapping goes once no open file and no view uses it."""
        if not self.closed:
            super().close()
            self._release(self._grant)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed CAP_File {self.name}")


def install_open(files: Callable[[], Any]) -> None:
    """Make ``open('/cap/NAME')`` open CAP_Files; every other path opens as before.

    ``files`` returns the running cVM's ``context.files`` (the runtime's)."""
    original = builtins.open
    if getattr(original, "_capfaas_cap_files", False):
        return

    def open_cap_aware(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str) and file.startswith(PREFIX):
            raw = files().open(file[len(PREFIX):], mode.replace("t", ""))
            if "b" in mode:
                return raw
            return io.TextIOWrapper(io.BufferedRandom(raw) if raw.readable() and raw.writable() else
                                    io.BufferedReader(raw) if raw.readable() else io.BufferedWriter(raw),
                                    *args, **kwargs)
        return original(file, mode, *args, **kwargs)

    open_cap_aware._capfaas_cap_files = True  # type: ignore[attr-defined]
    open_cap_aware.__doc__ = original.__doc__
    builtins.open = io.open = open_cap_aware


class Files:
    """``context.files``: create, open, grant, delete and list CAP_Files from function code."""

    def __init__(self, request: Callable[[dict[str, Any]], dict[str, Any]], grant: Callable[[dict[str, Any]], Grant],
                 release: Callable[[Grant], None]) -> None:
        self._request = request
        self._grant = grant
        self._release = release

    def _ask(self, action: str, **fields: Any) -> dict[str, Any]:
        reply = self._request({"op": "file", "action": action, **fields})
        error = reply.get("error")
        if error:
            raise _error(error)
        return reply

    def create(self, name: str, size: int, data: Any = None) -> CapFile:
        """A new CAP_File of ``size`` zero bytes (then ``data`` written at its start), owned by this
        function and opened read-write."""
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"a CAP_File's size must be a positive number of bytes, got {size!r}")
        reply = self._ask("create", name=check_name(name), size=size)
        try:
            grant = self._grant(reply["grant"])
        except MemoryError:  # it cannot be mapped here now: do not leave it behind half made
            self._ask("delete", name=name)
            raise
        file = CapFile(name, grant, "r+", self._release)
        if data is not None:
            file.write(data)
            file.seek(0)
        return file

    def open(self, name: str, mode: str = "rb") -> CapFile:
        """Open a CAP_File this function owns or was granted; ``mode`` as for ``open`` (no create,
        no truncate: a CAP_File has a fixed size)."""
        plain = "".join(sorted(mode.replace("b", ""), key="rw+".index)) if set(mode) <= set("rwb+") else mode
        if plain not in MODES:
            raise ValueError(f"invalid mode {mode!r} for a CAP_File: use 'rb', 'wb' or 'r+b'")
        reply = self._ask("open", name=check_name(name), write=plain != "r")
        return CapFile(name, self._grant(reply["grant"]), MODES[plain], self._release)

    def grant(self, name: str, function: str, *, write: bool = False) -> None:
        """Let ``function`` open this CAP_File, read-only unless ``write``. Only the owner may."""
        self._ask("grant", name=check_name(name), function=function, write=write)

    def delete(self, name: str) -> None:
        """Delete (revoke) a CAP_File this function owns: every holder's later use faults."""
        self._ask("delete", name=check_name(name))

    def list(self) -> list[dict[str, Any]]:
        """The CAP_Files this function owns or may open: name, size, owner, readers, writers."""
        return list(self._ask("list")["files"])


def _error(error: dict[str, Any]) -> Exception:
    kinds: dict[str, type[Exception]] = {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                                         "PermissionError": PermissionError, "ValueError": ValueError,
                                         "MemoryError": MemoryError}
    return kinds.get(str(error.get("type")), RuntimeError)(str(error.get("message", "")))
