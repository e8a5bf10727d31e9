"""What a function is: its code bundle, its handler, and the limits its cVMs run under."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
