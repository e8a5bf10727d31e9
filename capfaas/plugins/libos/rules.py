"""The rules of the library OS, named in every refusal so a function's author knows which one hit.

Each denial raised by the audit layer is a ``PermissionError`` whose message reads
``capfaas libOS: <what> is denied (rule: <rule>)``; the OS layers (Landlock, seccomp, the private
root) enforce the same rules with plain ``EPERM``/``EACCES``/``ENOENT`` when code gets past the
audit hook.
"""
from __future__ import annotations

from enum import Enum


class Rule(str, Enum):
    HOST_FILES = "host files outside the function bundle, /tmp and the runtime are not visible"
    READ_ONLY = "the function bundle, the runtime and secrets are read-only"
    PROCESSES = "function code cannot start processes"
    FORK = "a cVM cannot fork"
    SIGNALS = "signals may only be sent to the cVM's own process"
    NETWORK = "network access is not granted to this function"
    SOCKET_FAMILIES = "only internet (AF_INET, AF_INET6) sockets can be created"
    RAW_MEMORY = "raw memory access (ctypes, cffi, mmap) is denied"
    NATIVE_EXTENSIONS = "native extension modules outside the allow-list cannot be loaded"
    AUDIT_HOOKS = "audit hooks are reserved to the libOS"


def denied(what: str, rule: Rule) -> PermissionError:
    """The exception for one refusal: says what was attempted and which rule refused it."""
    return PermissionError(f"capfaas libOS: {what} is denied (rule: {rule.value})")
