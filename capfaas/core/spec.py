"""What a function is: its code bundle, its handler, the limits its cVMs run under, and the
CAP_Files it declares."""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .capfiles import check_name as check_file_name

NAME_PATTERN = re.compile(r"[-a-zA-Z_0-9.]+")
SIGNATURES = ("native", "functions-framework", "lambda")
MiB = 1 << 20
MAX_TIMEOUT = 24 * 3600


class SpecError(ValueError):
    """A function spec that cannot run, with the reason in one sentence."""


@dataclass(frozen=True)
class Limits:
    """Per-cVM limits, with defaults sane for a small HTTP function."""

    memory: int = 128 * MiB
    """Bytes the function may allocate beyond the runtime itself."""
    cpu_seconds: int = 300
    """CPU seconds one instance may use over its life (RLIMIT_CPU); it is recycled before it gets
    there, so this bounds a runaway process, while ``timeout`` bounds each invocation."""
    timeout: float = 30.0
    """Wall-clock seconds per invocation, enforced from outside: the cVM is killed and replaced."""
    open_files: int = 64
    output: int = 1 * MiB
    """Bytes of stdout and of stderr kept per invocation."""
    tmp: int = 16 * MiB
    concurrency: int = 1
    """Invocations one instance serves at once; above 1 only for ``async def`` handlers, whose
    payloads then travel inside control messages (each concurrent call needs its own buffers)."""

    def __post_init__(self) -> None:
        for name in ("memory", "cpu_seconds", "open_files", "output", "tmp", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 62:
                raise SpecError(f"limit {name} must be a positive integer below 2**62, got {value!r}")
        if (not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool)
                or not 0 < self.timeout <= MAX_TIMEOUT):
            raise SpecError(f"limit timeout must be a positive number of seconds up to {MAX_TIMEOUT}, "
                            f"got {self.timeout!r}")


@dataclass(frozen=True)
class DeclaredFile:
    """A CAP_File a deployment declares (``capFiles``): the gateway creates it for its function on
    backends with shared objects; on Morello it becomes a capfile of each cVM's monitor."""

    name: str
    size: int
    contents: bytes = b""
    grants: Mapping[str, bool] = field(default_factory=dict)
    """Function name -> whether the grant is read-write."""


@dataclass(frozen=True)
class FunctionSpec:
    """One deployable function: ``module`` (a ``.py`` file) inside the ``bundle`` directory."""

    name: str
    bundle: Path
    module: str
    handler: str = "handle"
    signature: str = "native"
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    network: bool = False
    limits: Limits = field(default_factory=Limits)
    capfiles: tuple[DeclaredFile, ...] = ()
    """The CAP_Files the deployment declares; a backend that cannot provide one refuses the spec."""

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.signature not in SIGNATURES:
            raise SpecError(f"signature must be one of {', '.join(SIGNATURES)}, got {self.signature!r}")
        if not self.handler.isidentifier():
            raise SpecError(f"handler must be a Python identifier, got {self.handler!r}")
        if not self.module.endswith(".py") or "/" in self.module or self.module.startswith("."):
            raise SpecError(f"module must be a .py file name inside the bundle, got {self.module!r}")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise SpecError(f"environment variable name {key!r} is not valid")
        for secret in self.secrets:
            check_name(secret, what="secret name")

    @property
    def module_name(self) -> str:
        return self.module[:-3]


def check_name(name: str, what: str = "function name") -> str:
    """Names follow OpenFaaS: ``[-a-zA-Z_0-9.]+``, and never a path trick."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", "..") or len(name) > 63:
        raise SpecError(f"{what} {name!r} is not valid: use 1-63 of [-a-zA-Z_0-9.], not '.' or '..'")
    return name


def declared_files(value: Any, max_size: int | None = None) -> tuple[DeclaredFile, ...]:
    """A deployment's ``capFiles`` (``[{"name", "size", "contents" (base64), "grants": {function:
    "r" | "rw"}}]``), checked; SpecError says what is wrong. Here, beside the spec, so that a stored
    deployment always becomes a spec; the gateway also bounds each size (``max_size``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError("'capFiles' must be a list of {\"name\", \"size\", \"contents\", \"grants\"} objects")
    declared: list[DeclaredFile] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise SpecError("each of 'capFiles' must be an object")
        try:
            name = check_file_name(entry.get("name"))
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or (max_size and size > max_size):
            bound = f"1 to {max_size}" if max_size else "a positive number of"
            raise SpecError(f"CAP_File {name!r}: 'size' must be {bound} bytes, got {size!r}")
        try:
            contents = base64.b64decode(entry.get("contents") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise SpecError(f"CAP_File {name!r}: 'contents' is not valid base64") from None
        if len(contents) > size:
            raise SpecError(f"CAP_File {name!r}: {len(contents)} bytes of contents exceed its size {size}")
        grants = entry.get("grants") or {}
        if not isinstance(grants, dict) or not all(isinstance(k, str) and v in ("r", "rw") for k, v in grants.items()):
            raise SpecError(f"CAP_File {name!r}: 'grants' must map function names to \"r\" or \"rw\"")
        declared.append(DeclaredFile(name, size, contents, {k: v == "rw" for k, v in grants.items()}))
    if len({d.name for d in declared}) != len(declared):
        raise SpecError("'capFiles' names a CAP_File twice")
    return tuple(declared)
