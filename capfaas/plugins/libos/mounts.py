"""The cVM's own root filesystem: a private mount namespace holding only what the function may see.

Like LKL mounting a disk image and chrooting into it in Intravisor, the process gets a fresh
root (a small read-only tmpfs) holding:

* the bundle, the runtime's paths and a few devices, bind-mounted read-only at their host paths;
* ``/tmp``: a private tmpfs of ``tmp_quota`` bytes (memory-backed, so the quota is memory);
* ``/var/openfaas/secrets``: a tmpfs with one 0400 file per secret, then remounted read-only.

``pivot_root`` then makes it the only tree the process can reach: the host's ``/etc``,
``/proc``, other functions' bundles and the host ``/tmp`` do not exist any more, not even for
``stat``. Nothing is written to the host filesystem (mount points are created on the new tmpfs).
"""
from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from .filesystem import SECRETS_DIR, TMP, HostPaths, is_beneath, with_real_paths
from .kernel import Kernel

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4

STAGING = "/tmp"
"""Where the new root is assembled: any existing directory will do, since the mount is made in
the private namespace and the host never sees it; /tmp always exists."""


class NamespaceUnavailable(Exception):
    """The kernel (or the process's privileges) does not allow a private mount namespace."""


@dataclass(frozen=True)
class PrivateRoot:
    """What the mount layer set up."""

    user_namespace: bool
    binds: int
    secrets: int


def _unshare(kernel: Kernel) -> bool:
    """Enter a private mount namespace; returns whether a user namespace was needed for it."""
    if os.geteuid() == 0:
        try:
            kernel.unshare(CLONE_NEWNS)
            return False
        except OSError as exc:
            raise NamespaceUnavailable(f"unshare(CLONE_NEWNS) failed: {exc.strerror}") from exc
    uid, gid = os.geteuid(), os.getegid()
    try:
        kernel.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    except OSError as exc:
        raise NamespaceUnavailable(f"not root, and unshare(CLONE_NEWUSER|CLONE_NEWNS) failed: {exc.strerror}"
                                   " (user namespaces disabled?)") from exc
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
            f.write(text)
    return True


def _make_read_only(kernel: Kernel, target: str, *, device: bool) -> None:
    """Read-only and nosuid (and nodev, except for device nodes), with every submount."""
    attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (0 if device else MOUNT_ATTR_NODEV)
    try:
        kernel.syscall("mount_setattr", AT_FDCWD, kernel.buffer(os.fsencode(target) + b"\0"), AT_RECURSIVE,
                       kernel.buffer(struct.pack("=QQQQ", attrs, 0, 0, 0)), 32)
    except OSError as exc:
        if exc.errno != 38:  # only kernels before 5.12 lack mount_setattr
            raise
        kept = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV) | kept
        kernel.mount(None, target, None, flags)


def _mount_point(path: str, *, directory: bool) -> None:
    if directory:
        os.makedirs(path, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _secrets(kernel: Kernel, root: str, secrets: Mapping[str, bytes]) -> None:
    target = root + SECRETS_DIR
    os.makedirs(target, mode=0o755)
    size = sum(len(v) for v in secrets.values()) + 4096 * (len(secrets) + 2)
    kernel.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={size},mode=0500")
    for name, value in secrets.items():
        fd = os.open(os.path.join(target, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
    kernel.mount(None, target, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter_private_root(kernel: Kernel, host: HostPaths, *, tmp_quota: int, secrets: Mapping[str, bytes]) -> PrivateRoot:
    """Build the cVM's root and pivot into it.

    Raises :class:`NamespaceUnavailable` if no mount namespace can be had (nothing changed then);
    any later failure is an ``OSError`` the caller must treat as fatal.
    """
    if kernel.arch is None:
        raise NamespaceUnavailable(f"no syscall table for {os.uname().machine} (pivot_root, mount_setattr)")
    user_namespace = _unshare(kernel)
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done below propagates to the host

    # Sources are opened before anything is mounted over them (the bundle may live in host /tmp).
    targets: list[tuple[str, str]] = []
    for source in host.read_only + host.writable_devices:
        targets += [(target, source) for target in with_real_paths((source,))]
    fds = {source: os.open(source, os.O_PATH | os.O_CLOEXEC) for _, source in targets}
    root_links = [(name, os.readlink("/" + name)) for name in os.listdir("/") if os.path.islink("/" + name)]
    try:
        kernel.mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        os.mkdir(STAGING + TMP)
        kernel.mount("tmpfs", STAGING + TMP, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={tmp_quota},mode=1777")
        bound: list[str] = []
        for target, source in sorted(targets):
            if any(is_beneath(target, top) for top in bound):
                continue  # already visible through an enclosing bind of the same host tree
            mode = os.fstat(fds[source]).st_mode
            device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            _mount_point(STAGING + target, directory=stat.S_ISDIR(mode))
            kernel.mount(f"/proc/self/fd/{fds[source]}", STAGING + target, None, MS_BIND | MS_REC)
            _make_read_only(kernel, STAGING + target, device=device)
            bound.append(target)
        _secrets(kernel, STAGING, secrets)
        for name, link in root_links:  # /lib -> usr/lib and friends, where the loader looks
            if not os.path.lexists(STAGING + "/" + name):
                os.symlink(link, STAGING + "/" + name)
        kernel.mount(None, STAGING, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(STAGING)
        dot = kernel.buffer(b".\0")
        kernel.syscall("pivot_root", dot, dot)
        kernel.syscall("umount2", dot, MNT_DETACH)
        os.chdir("/")
    finally:
        for fd in fds.values():
            os.close(fd)
    return PrivateRoot(user_namespace, len(bound), len(secrets))
