"""The files the runtime itself must still read once a cVM is confined.

After ``enter()`` the Python interpreter keeps importing (the function's own imports, the stdlib
modules they pull in, capfaas's lazily imported parts) and the dynamic loader keeps opening
shared libraries for allowed extension modules (``zlib`` needs ``libz``, ``_ssl`` needs
``libssl``). These paths stay readable; everything else of the host disappears.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import sysconfig

RUNTIME_PACKAGES = ("capfaas", "msgpack", "pluggy")
"""Packages the cVM runtime runs on; only their own directories are exposed, not all of
site-packages (a function ships its dependencies in its bundle)."""

TIMEZONE_PATHS = ("/etc/localtime", "/usr/share/zoneinfo")
"""Public data ``time.localtime`` and ``zoneinfo`` read; they reveal the host's time zone."""

LOADER_CACHE = "/etc/ld.so.cache"

NETWORK_READ_PATHS = (
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/ssl", "/etc/pki", "/etc/ca-certificates", "/usr/lib/ssl", "/usr/share/ca-certificates",
)
"""Name resolution and CA certificates, visible only to functions granted the network."""


def _package_paths(name: str) -> list[str]:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None) or importlib.util.find_spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    return [spec.origin] if spec.origin else []


def shared_library_dirs() -> list[str]:
    """Directories of the shared libraries this process has mapped (libc's, libpython's …).

    Libraries that allowed extension modules load later (libz, libssl) live beside them in
    every mainstream distribution's layout.
    """
    dirs: set[str] = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/") and ".so" in os.path.basename(fields[5]):
                    dirs.add(os.path.dirname(fields[5].rstrip("\n").removesuffix(" (deleted)")))
    except OSError:
        pass
    return sorted(dirs)


@functools.cache
def runtime_read_paths() -> tuple[str, ...]:
    """Read-only paths the Python runtime needs: stdlib (with lib-dynload), the runtime packages,
    the shared-library directories and the loader's cache, and time-zone data. Only existing
    paths are returned. Cached: a template that calls it before forking saves each cVM the work."""
    paths = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    for name in RUNTIME_PACKAGES:
        try:
            paths.update(_package_paths(name))
        except (ImportError, ValueError):
            continue
    paths.update(shared_library_dirs())
    paths.add(LOADER_CACHE)
    paths.update(TIMEZONE_PATHS)
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))
