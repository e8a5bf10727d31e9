"""What one cVM may see and use: the input of ``LibraryOS.enter()``."""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_EXTENSIONS = frozenset({
    # computation, data formats, hashing and compression
    "_bisect", "_blake2", "_bz2", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp",
    "_codecs_kr", "_codecs_tw", "_contextvars", "_csv", "_datetime", "_decimal", "_elementtree",
    "_hashlib", "_heapq", "_json", "_lsprof", "_lzma", "_md5", "_multibytecodec", "_opcode",
    "_pickle", "_queue", "_random", "_sha1", "_sha256", "_sha3", "_sha512", "_statistics",
    "_struct", "_typing", "_uuid", "_zoneinfo", "array", "audioop", "binascii", "cmath", "math",
    "pyexpat", "unicodedata", "zlib",
    # imported by common stdlib modules (asyncio, subprocess, ssl, tarfile, getpass, sqlite3):
    # refusing them would break those imports; what they could do is refused elsewhere
    # (sockets, processes, ttys: audit hook and seccomp; sqlite extensions: audit hook)
    "_asyncio", "_posixsubprocess", "_socket", "_ssl", "_sqlite3", "fcntl", "grp", "resource",
    "select", "termios",
    # the runtime's own compiled modules
    "msgpack._cmsgpack", "capfaas.core._capability", "capfaas.backends.emulated._memory",
})
"""Native extension modules function code may load. Left out on purpose: ``_ctypes``, ``mmap``,
``_cffi_backend`` (raw memory), ``_posixshmem``/``_multiprocessing`` (host shared memory),
``readline``/``_curses`` (terminals), ``spwd``/``nis``/``_crypt``/``syslog`` (host accounts and
logs), ``_tkinter``, ``ossaudiodev``, and CPython's test and sub-interpreter modules."""


@dataclass(frozen=True)
class LibOSPolicy:
    """One cVM's confinement. Sizes are bytes.

    ``memory_limit`` caps the process's whole address space (RLIMIT_AS): the caller adds what the
    process already maps before ``enter()`` (interpreter, runtime, the cVM's shared-memory region).
    ``extra_readable`` adds read-only paths to those the runtime itself needs, which
    ``runtime_read_paths()`` computes and ``enter()`` always includes. ``extra_devices`` are device
    files the cVM may open for reading and writing (on Morello, Intravisor's CAP_File devices);
    paths that do not exist are left out.
    """

    bundle_dir: str
    tmp_quota: int = 64 << 20
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    allow_network: bool = False
    memory_limit: int = 256 << 20
    cpu_seconds: int = 60
    open_files: int = 64
    allowed_extensions: frozenset[str] = DEFAULT_EXTENSIONS
    extra_readable: tuple[str, ...] = ()
    extra_devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("tmp_quota", "memory_limit", "cpu_seconds", "open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in self.secrets:
            if not name or "/" in name or "\0" in name or name in (".", ".."):
                raise ValueError(f"secret name {name!r} is not a plain file name")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"environment variable name {key!r} is not valid")
        object.__setattr__(self, "bundle_dir", os.path.abspath(self.bundle_dir))  # cwd changes in enter()
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "secrets", MappingProxyType({k: bytes(v) for k, v in self.secrets.items()}))
        object.__setattr__(self, "allowed_extensions", frozenset(self.allowed_extensions))
        object.__setattr__(self, "extra_readable", tuple(self.extra_readable))
        object.__setattr__(self, "extra_devices", tuple(self.extra_devices))
        for path in self.extra_devices:
            if os.path.exists(path) and not stat.S_ISCHR(os.stat(path).st_mode):
                raise ValueError(f"{path!r} is not a character device: only devices may be granted read-write")
