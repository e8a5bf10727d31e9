"""Where the Morello backend finds Intravisor and how it drives it: the ``[morello]`` configuration.

Read from ``$CAPFAAS_CONFIG`` (or ``./capfaas.toml``) with ``tomllib``; ``CAPFAAS_INTRAVISOR``
overrides the monitor's path, so the one setting people change most needs no file. Unknown keys
are refused, as Intravisor refuses unknown YAML keys: a typo must not silently fall back to a
default on a board where every wrong guess costs a monitor start.
"""
from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

GiB = 1 << 30
DEFAULT_MAX_CVM_SIZE = GiB
"""Intravisor's CVM_MAX_SIZE in its Morello CI builds (0x40000000)."""
DEFAULT_CVM_BASE = 0x4_0000_0000
"""The base Intravisor's own musl-lkl examples use on Morello (cVM index 16)."""


class ConfigError(ValueError):
    """The configuration cannot be used, with the file, the key and the reason in one sentence."""


@dataclass(frozen=True)
class MorelloConfig:
    """Everything the backend needs to know about the board's Intravisor installation."""

    intravisor: str | None = None
    """The monitor binary (``intravisor`` or ``monitor`` in Intravisor's build)."""
    runtime: str | None = None
    """The library OS the cVMs run, e.g. ``libmusl-lkl.so``."""
    disk: str | None = None
    """The ext4 image with Python and the capfaas agent (``capfaas morello prepare`` lays it out)."""
    max_cvm_size: int = DEFAULT_MAX_CVM_SIZE
    """CVM_MAX_SIZE of the Intravisor build: every cVM's ``isolation.size`` must equal it."""
    cvm_base: int = DEFAULT_CVM_BASE
    """``isolation.base`` of each cVM (one monitor per cVM, so every cVM can use the same base)."""
    python: str = "/usr/bin/python3"
    """The interpreter inside the disk image."""
    bundle_dir: str = "/var/lib/capfaas/bundles"
    """Where, inside the image, the agent unpacks function bundles it receives."""
    work_dir: str = "/var/tmp/capfaas-morello"
    """Host directory for each monitor's run directory (YAML, disk copy, log)."""
    listen_host: str = "127.0.0.1"
    """Loopback address the agents connect back to through Intravisor's host-socket hostcalls."""
    start_timeout: float = 120.0
    """Seconds from starting a monitor until its agent has connected (LKL boot plus Python start)."""
    ready_timeout: float = 120.0
    """Seconds from the agent's connection until its cVM is ready: unpacking the bundle, entering the
    library OS, importing the function and running its ``init()``, all inside the cVM."""
    spin_grace: float = 5.0
    """Seconds a monitor may keep running after its cVM ended before it is taken as spinning."""
    start_attempts: int = 2
    """Monitor starts tried per cVM when a monitor dies, hangs or spins before its agent connects."""
    keep_runs: bool = False
    """Keep each monitor's run directory (YAML, log) after it ends, for debugging on the board."""
    source: str = "defaults"
    """Where this configuration came from, for error messages."""

    def __post_init__(self) -> None:
        size = self.max_cvm_size
        if size <= 0 or size & (size - 1):
            raise ConfigError(f"{self.source}: max_cvm_size must be a power of two, got {size:#x}")
        if self.cvm_base <= 0 or self.cvm_base % size:
            raise ConfigError(f"{self.source}: cvm_base {self.cvm_base:#x} must be a positive multiple of "
                              f"max_cvm_size {size:#x} (Intravisor numbers cVMs by base / CVM_MAX_SIZE)")
        for name in ("start_timeout", "ready_timeout", "spin_grace"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.source}: {name} must be a positive number of seconds")
        if self.start_attempts < 1:
            raise ConfigError(f"{self.source}: start_attempts must be at least 1")
        for name in ("python", "bundle_dir"):
            if not getattr(self, name).startswith("/"):
                raise ConfigError(f"{self.source}: {name} must be an absolute path inside the disk image")


_HEX_KEYS = ("max_cvm_size", "cvm_base")
_PATH_KEYS = ("intravisor", "runtime", "disk", "work_dir")
_KEYS = {f.name: f for f in fields(MorelloConfig) if f.name != "source"}


def parse_hex(value: Any, key: str, source: str) -> int:
    """Sizes and addresses are hex, as in Intravisor's YAML: ``"0x40000000"`` (or a TOML integer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower().startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise ConfigError(f"{source}: {key} must be hex like \"0x40000000\", got {value!r}")


def from_mapping(section: Mapping[str, Any], source: str, base: Path | None = None) -> MorelloConfig:
    """Build the configuration from a ``[morello]`` table; relative paths are relative to ``base``."""
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} in [morello]: "
                          f"{', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key in _HEX_KEYS:
            values[key] = parse_hex(value, key, source)
        elif key in _PATH_KEYS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{source}: {key} must be a path")
            path = Path(value).expanduser()
            values[key] = str(base / path if base is not None and not path.is_absolute() else path)
        elif key in ("start_timeout", "ready_timeout", "spin_grace"):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be a number of seconds, got {value!r}")
            values[key] = float(value)
        elif key == "start_attempts":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{source}: start_attempts must be an integer, got {value!r}")
            values[key] = value
        elif key == "keep_runs":
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: keep_runs must be true or false, got {value!r}")
            values[key] = value
        else:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{source}: {key} must be a non-empty string, got {value!r}")
            values[key] = value
    return MorelloConfig(source=source, **values)


def config_path(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """``$CAPFAAS_CONFIG`` if set (it must exist), else ``./capfaas.toml`` if present."""
    named = environ.get("CAPFAAS_CONFIG")
    if named:
        return Path(named).expanduser()
    local = cwd / "capfaas.toml"
    return local if local.is_file() else None


def load_config(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> MorelloConfig:
    """The configuration in force: the file's ``[morello]`` section, then ``CAPFAAS_INTRAVISOR``,
    then ``intravisor`` on PATH for the monitor when neither names it."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    path = config_path(environ, cwd)
    config = MorelloConfig()
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the capfaas configuration {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        section = document.get("morello", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [morello] must be a table")
        config = from_mapping(section, str(path), path.parent)
    named = environ.get("CAPFAAS_INTRAVISOR")
    if named:
        config = replace(config, intravisor=str(Path(named).expanduser()))
    elif config.intravisor is None:
        found = shutil.which("intravisor", path=environ.get("PATH"))
        if found:
            config = replace(config, intravisor=found)
    return config
