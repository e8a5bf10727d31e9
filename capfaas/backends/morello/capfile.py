"""Inside a cVM on Morello: CAP_Files as musl-lkl shows them, character devices under /cap.

A CAP_File declared in the monitor's YAML (see :mod:`.cvm_yaml`) is reached by opening one of
the CAP_File devices (musl-lkl creates ``/cap/cf1`` and ``/cap/cf2``, so a cVM holds at most two
at a time), binding it to the CAP_File's name with the probe ioctl, and then using ordinary
``read``/``write``/``lseek``: the library OS turns those into loads and stores through the
capability the monitor handed over, with no copy in the monitor and no locking.

The ioctl numbers are those of Intravisor's musl-lkl CAP_File driver. Probing a name the monitor
does not know makes the monitor spin (it prints ``wrong cap key`` first, which the supervisor
turns into a kill), so :func:`open_capfile` refuses names the YAML rules would have refused.
"""
from __future__ import annotations

import fcntl
import io
import os
import re
from collections.abc import Callable, Collection
from typing import Any

IOCTL_CF_SET_CAP = 0x4004E200
IOCTL_CF_SET_SIZE = 0x4004E201
IOCTL_CF_ADV = 0x4004E202
IOCTL_CF_PRB = 0x4004E203
IOCTL_CF_SET_MODE = 0x4004E204
DEVICES = ("/cap/cf1", "/cap/cf2")
_NAME = re.compile(r"[A-Za-z0-9_]{1,9}")


def open_capfile(name: str, device: str = DEVICES[0], *,
                 ioctl: Callable[[int, int, Any], Any] = fcntl.ioctl,
                 opener: Callable[[str, int], int] = os.open) -> io.FileIO:
    """A read/write file on the CAP_File ``name`` through ``device`` (``/cap/cf1`` or ``/cap/cf2``)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"CAP_File name {name!r} must be 1-9 of [A-Za-z0-9_], as declared in the YAML")
    if device not in DEVICES:
        raise ValueError(f"{device!r} is not a CAP_File device (musl-lkl has {', '.join(DEVICES)})")
    fd = opener(device, os.O_RDWR)
    try:
        ioctl(fd, IOCTL_CF_PRB, name.encode("ascii") + b"\0")
    except BaseException:
        os.close(fd)
        raise
    return io.FileIO(fd, "r+", closefd=True)


class DeviceFiles:
    """``context.files`` (and ``open('/cap/NAME')``) inside a cVM on Morello.

    The CAP_Files a cVM can reach are those its monitor's YAML declared (``declared``), opened
    through the two CAP_File devices, so at most two are open at once. Any other name is refused
    here, since probing a name the monitor does not hold makes it spin. Creating, granting and
    deleting CAP_Files while functions run is not something Intravisor's capfiles offer: those
    refuse plainly."""

    UNSUPPORTED = ("on Morello, CAP_Files are declared when the cVM starts and shared through "
                   "Intravisor's capfiles; creating, granting or deleting them at run time is not provided")

    def __init__(self, opener: Callable[[str, str], io.FileIO] = open_capfile, declared: Collection[str] = ()) -> None:
        self._open = opener
        self._declared = frozenset(declared)
        self._devices: dict[str, io.FileIO] = {}

    def open(self, name: str, mode: str = "rb") -> io.FileIO:
        """The declared CAP_File ``name`` through a free CAP_File device (any mode: the device is
        read-write, and the capability the monitor holds decides what a store may do)."""
        if name not in self._declared:
            known = ", ".join(sorted(self._declared)) or "none"
            raise FileNotFoundError(f"no CAP_File named {name!r} is declared for this cVM (declared: {known})")
        for device in DEVICES:
            held = self._devices.get(device)
            if held is None or held.closed:
                file = self._open(name, device)
                self._devices[device] = file
                return file
        raise OSError(f"both CAP_File devices ({', '.join(DEVICES)}) are in use: close a CAP_File first")

    def create(self, name: str, size: int, data: Any = None) -> io.FileIO:
        raise NotImplementedError(self.UNSUPPORTED)

    def grant(self, name: str, function: str, *, write: bool = False) -> None:
        raise NotImplementedError(self.UNSUPPORTED)

    def delete(self, name: str) -> None:
        raise NotImplementedError(self.UNSUPPORTED)

    def list(self) -> list[dict[str, Any]]:
        raise NotImplementedError(self.UNSUPPORTED)
