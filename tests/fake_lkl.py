"""A stand-in for musl-lkl's CAP_File devices inside a cVM, for the stand-in monitor.

``fake_intravisor.py`` keeps each capfile of its YAML as a file of exactly the capfile's size (its
buffer) and runs the cVM's program as ``fake_lkl.py BUFFERS -m MODULE ARGS...``. This opens the
buffers first, as the monitor holds them whatever the cVM's library OS allows later, then makes
``/cap/cf1`` and ``/cap/cf2`` behave as the driver does for ``capfile.open_capfile``: opening a
device gives an unbound descriptor, the probe ioctl binds it to a capfile by name, and reads,
writes and seeks then reach that capfile's bytes, at the device's own position. Probing a name
the monitor does not hold prints Intravisor's ``wrong cap key`` line and spins, as the monitor does.
"""
from __future__ import annotations

import errno
import os
import runpy
import sys
from pathlib import Path


def install(buffers: Path, console: int) -> None:
    from capfaas.backends.morello import capfile

    held = {path.name: [os.open(path, os.O_RDWR) for _ in capfile.DEVICES] for path in sorted(buffers.iterdir())}
    unbound = os.open(os.devnull, os.O_RDWR)
    devices: dict[int, int] = {}  # descriptor -> which device it was opened as

    def opener(path: str, flags: int) -> int:
        if path not in capfile.DEVICES:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        fd = os.dup(unbound)
        devices[fd] = capfile.DEVICES.index(path)
        return fd

    def ioctl(fd: int, request: int, arg: bytes) -> int:
        if request != capfile.IOCTL_CF_PRB or fd not in devices:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        name = arg.rstrip(b"\0").decode()
        if name not in held:
            os.write(console, f"wrong cap key {name} \n".encode())
            while True:  # the monitor's while(1);
                pass
        os.dup2(held[name][devices.pop(fd)], fd)
        os.lseek(fd, 0, os.SEEK_SET)
        return 0

    capfile.open_capfile.__kwdefaults__.update(ioctl=ioctl, opener=opener)


def main() -> None:
    buffers, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: fake_lkl.py BUFFERS -m MODULE [ARGS...]")
    install(Path(buffers), os.dup(1))
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as python -m has it
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
