"""Which paths a cVM sees, and how: one answer shared by the private root, Landlock and the audit hook.

The three layers must agree, or a function would get a polite ``PermissionError`` from one layer
for what another allows (or worse, the reverse). The private root mounts exactly these paths,
Landlock grants exactly these, and the audit hook names the rule for anything else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .policy import LibOSPolicy
from .runtime_paths import NETWORK_READ_PATHS, runtime_read_paths

TMP = "/tmp"
SECRETS_DIR = "/var/openfaas/secrets"
READABLE_DEVICES = ("/dev/zero", "/dev/random", "/dev/urandom")
WRITABLE_DEVICES = ("/dev/null",)


def _existing(paths: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({os.path.abspath(p) for p in paths if os.path.exists(p)}))


@dataclass(frozen=True)
class HostPaths:
    """Host paths to show inside the cVM, at the same place, before any namespace is entered."""

    read_only: tuple[str, ...]
    writable_devices: tuple[str, ...]

    @classmethod
    def for_policy(cls, policy: LibOSPolicy) -> HostPaths:
        read_only = [policy.bundle_dir, *runtime_read_paths(), *policy.extra_readable, *READABLE_DEVICES]
        if policy.allow_network:
            read_only += NETWORK_READ_PATHS
        return cls(_existing(read_only), _existing((*WRITABLE_DEVICES, *policy.extra_devices)))


def with_real_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    """Each path and, when it differs, its symlink-free form (both must work inside the cVM)."""
    return tuple(sorted({q for p in paths for q in (p, os.path.realpath(p))}))


def outermost(paths: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Drop every path that lies beneath another one of the list."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(is_beneath(path, top) for top in kept):
            kept.append(path)
    return tuple(kept)


def is_beneath(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class View:
    """What the confined process sees: read-only and read-write paths, symlink-free."""

    read_only: tuple[str, ...]
    read_write: tuple[str, ...]

    @classmethod
    def after_mounts(cls, host: HostPaths, *, private_tmp: bool, secrets: bool) -> View:
        """Computed inside the cVM's root, once the mount layer did (or could not do) its work."""
        read_only = list(with_real_paths(host.read_only))
        read_write = list(with_real_paths(host.writable_devices))
        if secrets:
            read_only.append(SECRETS_DIR)
        if private_tmp:
            read_write.append(TMP)

        def real(paths: list[str]) -> tuple[str, ...]:
            return outermost([os.path.realpath(p) for p in paths if os.path.exists(p)])

        return cls(real(read_only), real(read_write))

    def _deepest(self, real_path: str) -> str | None:
        """``"ro"`` or ``"rw"`` from the most specific visible path holding ``real_path``
        (a bundle kept under /tmp is read-only although /tmp is writable)."""
        best, kind = "", None
        for tops, name in ((self.read_only, "ro"), (self.read_write, "rw")):
            for top in tops:
                if is_beneath(real_path, top) and len(top) > len(best):
                    best, kind = top, name
        return kind

    def readable(self, real_path: str) -> bool:
        return self._deepest(real_path) is not None

    def writable(self, real_path: str) -> bool:
        return self._deepest(real_path) == "rw"
