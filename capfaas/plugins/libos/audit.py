"""The audit-hook layer: precise, early refusals that name the rule.

``sys.addaudithook`` callbacks cannot be removed, and CPython raises an audit event before every
file open, process start, signal, socket, use of ctypes, mmap and module load, so refusing there
turns what the OS layers would answer with a bare ``EPERM``/``ENOENT`` into a ``PermissionError``
saying which rule applies (see :mod:`.rules`).

This layer is for clarity, not the security boundary: CPython's audit hooks are not a sandbox
(PEP 578), and code that walks interpreter objects (``gc.get_objects()``) can reach this guard's
state. Every rule here is therefore also enforced below it, by the private root, Landlock,
seccomp and rlimits, which no Python code can switch off.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from .filesystem import View
from .policy import LibOSPolicy
from .rules import Rule, denied

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
RAW_MEMORY_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "mmap"})
PROCESS_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn")
FORK_EVENTS = ("os.fork", "os.forkpty")
NAME_SERVICE_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")
INTERNET = (socket.AF_INET, socket.AF_INET6)

# event -> ((index of a path argument, index of its dir_fd argument or None), …), whether it writes
PATH_EVENTS: dict[str, tuple[tuple[tuple[int, int | None], ...], bool]] = {
    "os.listdir": (((0, None),), False), "os.scandir": (((0, None),), False),
    "os.chdir": (((0, None),), False), "os.listxattr": (((0, None),), False),
    "os.mkdir": (((0, 2),), True), "os.rmdir": (((0, 1),), True), "os.remove": (((0, 1),), True),
    "os.rename": (((0, 2), (1, 3)), True), "os.link": (((0, 2), (1, 3)), True),
    "os.symlink": (((1, 2),), True), "os.chmod": (((0, 2),), True), "os.chown": (((0, 3),), True),
    "os.utime": (((0, 3),), True), "os.truncate": (((0, None),), True),
    "os.setxattr": (((0, None),), True), "os.removexattr": (((0, None),), True),
}


class AuditGuard:
    """The audit hook of one cVM. ``fork_allowed`` is cleared by ``LibraryOS.seal()``."""

    def __init__(self, view: View, policy: LibOSPolicy, *, fork_allowed: bool) -> None:
        self.view = view
        self.network = policy.allow_network
        self.extensions = policy.allowed_extensions
        self.fork_allowed = fork_allowed
        self.runtime_mapping = False
        """True only while ``LibraryOS.seal(prepare)`` runs the runtime's own region mapping."""
        self._socket_init = socket.socket.__init__.__code__
        self._writable_devices = {os.stat(top).st_dev for top in view.read_write if os.path.isdir(top)}
        handlers: dict[str, Callable[[str, tuple[Any, ...]], None]] = {
            "open": self._open,
            "os.kill": self._kill,
            "os.killpg": self._killpg,
            "socket.__new__": self._socket_new,
            "socket.bind": self._network,
            "socket.connect": self._network,
            "import": self._import,
            "mmap.__new__": self._raw_memory,
            "sqlite3.enable_load_extension": self._sqlite_extension,
            "sqlite3.load_extension": self._sqlite_extension,
            "sys.addaudithook": self._addaudithook,
            "object.__setattr__": self._code_change,
            "object.__delattr__": self._code_change,
        }
        handlers.update(dict.fromkeys(PATH_EVENTS, self._path_event))
        handlers.update(dict.fromkeys(PROCESS_EVENTS, self._process))
        handlers.update(dict.fromkeys(FORK_EVENTS, self._fork))
        handlers.update(dict.fromkeys(NAME_SERVICE_EVENTS, self._network))
        self.handlers = handlers

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        """The callable given to ``sys.addaudithook``: a bound method, so patching the class later
        changes nothing; replacing its code is refused (see ``_code_change``)."""
        handler = self.handlers.get(event)
        if handler is not None:
            handler(event, args)
        elif event.startswith("ctypes."):
            raise denied(event, Rule.RAW_MEMORY)

    # -- files ------------------------------------------------------------------------------------

    def _check_path(self, path: Any, write: bool, what: str) -> None:
        if isinstance(path, int):
            return  # a descriptor the process already holds
        name = "." if path is None else os.fsdecode(os.fspath(path))
        real = os.path.realpath(name)
        if write and self.view.writable(real):
            return
        if not write and self.view.readable(real):
            return
        rule = Rule.READ_ONLY if write and self.view.readable(real) else Rule.HOST_FILES
        raise denied(what.format(path=name), rule)

    def _open(self, event: str, args: tuple[Any, ...]) -> None:
        path, _mode, flags = args
        write = bool((flags or 0) & WRITE_FLAGS)
        self._check_path(path, write, "opening {path!r} for " + ("writing" if write else "reading"))

    def _path_event(self, event: str, args: tuple[Any, ...]) -> None:
        paths, write = PATH_EVENTS[event]
        verb = "listing {path!r}" if event in ("os.listdir", "os.scandir") else event + " on {path!r}"
        for index, dir_fd_index in paths:
            path, dir_fd = args[index], None if dir_fd_index is None else args[dir_fd_index]
            if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(os.fspath(path)):
                self._check_relative(dir_fd, path, write, verb)
            else:
                self._check_path(path, write, verb)

    def _check_relative(self, dir_fd: int, path: Any, write: bool, what: str) -> None:
        """A path relative to a directory descriptor (``shutil.rmtree`` works that way). The
        directory was opened through these checks, so reading is fine; writing needs it to be on
        a writable filesystem (the private /tmp)."""
        if write and os.fstat(dir_fd).st_dev not in self._writable_devices:
            name = os.fsdecode(os.fspath(path))
            raise denied(what.format(path=name) + f" (relative to descriptor {dir_fd})", Rule.READ_ONLY)

    # -- processes and signals -----------------------------------------------------------------------

    def _process(self, event: str, args: tuple[Any, ...]) -> None:
        raise denied(f"starting a process ({event})", Rule.PROCESSES)

    def _fork(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.fork_allowed:
            raise denied(f"forking ({event})", Rule.FORK)

    def _kill(self, event: str, args: tuple[Any, ...]) -> None:
        pid, sig = args
        if pid != os.getpid():
            raise denied(f"sending signal {sig} to pid {pid}", Rule.SIGNALS)

    def _killpg(self, event: str, args: tuple[Any, ...]) -> None:
        pgid, sig = args
        raise denied(f"sending signal {sig} to process group {pgid}", Rule.SIGNALS)

    # -- network --------------------------------------------------------------------------------------

    def _wraps_existing_descriptor(self) -> bool:
        """True when ``socket.socket(..., fileno=fd)`` wraps a socket the process already has
        (``socketpair()``, ``fromfd()``): that creates no socket, and asyncio depends on it."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        return frame is not None and frame.f_code is self._socket_init and frame.f_locals.get("fileno") is not None

    def _socket_new(self, event: str, args: tuple[Any, ...]) -> None:
        _sock, family, _type, _proto = args
        if self.network and family in INTERNET:
            return
        if self._wraps_existing_descriptor():
            return
        if self.network:
            raise denied(f"creating a socket of address family {family}", Rule.SOCKET_FAMILIES)
        raise denied("creating a socket", Rule.NETWORK)

    def _network(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.network:
            raise denied(event, Rule.NETWORK)

    # -- native code and raw memory ------------------------------------------------------------------

    def _import(self, event: str, args: tuple[Any, ...]) -> None:
        name, filename, search_path = args[0], args[1], args[2]
        if name in RAW_MEMORY_MODULES or name.startswith(("ctypes.", "cffi.")):
            raise denied(f"importing {name!r}", Rule.RAW_MEMORY)
        # _imp.create_dynamic (every native extension load) raises "import" with a file name and
        # no search path, however it was reached: ExtensionFileLoader or a direct call.
        if filename is not None and search_path is None and name not in self.extensions:
            raise denied(f"loading native extension {name!r} from {os.fsdecode(filename)!r}", Rule.NATIVE_EXTENSIONS)

    def _raw_memory(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.runtime_mapping:
            raise denied(event, Rule.RAW_MEMORY)

    def _sqlite_extension(self, event: str, args: tuple[Any, ...]) -> None:
        raise denied(event, Rule.NATIVE_EXTENSIONS)

    def _addaudithook(self, event: str, args: tuple[Any, ...]) -> None:
        """CPython drops the new hook and swallows this error: ``sys.addaudithook`` returns
        quietly, having added nothing."""
        raise denied("adding an audit hook", Rule.AUDIT_HOOKS)

    def _code_change(self, event: str, args: tuple[Any, ...]) -> None:
        """Swapping a guard's ``__class__`` or the ``__code__`` of a function of this module
        would switch the hook off."""
        target, name = args[0], args[1]
        if isinstance(target, AuditGuard):
            raise denied(f"changing the audit guard's {name}", Rule.AUDIT_HOOKS)
        code = getattr(target, "__code__", None) if name == "__code__" else None
        if code is not None and code.co_filename == __file__:
            raise denied(f"changing the code of {target.__qualname__}", Rule.AUDIT_HOOKS)
