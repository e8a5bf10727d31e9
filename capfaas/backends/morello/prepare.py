"""``capfaas morello prepare``: lay out what the board needs, and build the disk image when it can.

A cVM's disk image must hold a Python 3.11 built for musl (Intravisor builds one from an Alpine
container for its Python examples) plus what the agent imports: capfaas's pure-Python modules,
msgpack and pluggy, with no compiled extensions (they are built for this host, not for the cVM;
capfaas and msgpack fall back to their pure-Python twins). Functions are not baked in: the
backend sends each cVM its bundle at start, so deploying needs no new image.

Without ``--rootfs`` the result is an overlay directory to copy into an existing image; with it
(a directory or a tar exported from a container), ``mke2fs -d`` from e2fsprogs builds the ext4
image without root.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from capfaas import __version__

PACKAGES = ("capfaas", "msgpack", "pluggy")
"""What the agent imports beyond the standard library."""
SKIPPED_SUFFIXES = (".so", ".pyd", ".c", ".pyx", ".pxd", ".pyc", ".html")


@dataclass
class Layout:
    """What ``prepare`` produced."""

    out: Path
    overlay: Path
    site_packages: Path
    files: int = 0
    image: Path | None = None
    config: Path | None = None
    notes: list[str] = field(default_factory=list)


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)
    if module.__file__ is None:
        raise RuntimeError(f"cannot find the {name} package's files")
    return Path(module.__file__).parent


def copy_package(name: str, site_packages: Path) -> int:
    """Copy one package's Python sources (no compiled modules, caches or build inputs)."""
    source = _package_dir(name)
    count = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or "__pycache__" in relative.parts or path.suffix in SKIPPED_SUFFIXES:
            continue
        target = site_packages / name / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        count += 1
    return count


def lay_out(out: Path, python_version: str, bundle_dir: str) -> Layout:
    overlay = out / "overlay"
    if overlay.exists():
        shutil.rmtree(overlay)
    site_packages = overlay / "usr" / "lib" / f"python{python_version}" / "site-packages"
    layout = Layout(out, overlay, site_packages)
    for name in PACKAGES:
        layout.files += copy_package(name, site_packages)
    (overlay / bundle_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    manifest = overlay / "etc" / "capfaas-agent.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"capfaas": __version__, "python": python_version,
                                    "packages": list(PACKAGES), "bundles": bundle_dir}, indent=2) + "\n")
    return layout


def extract_rootfs(archive_path: Path, root: Path) -> None:
    """Unpack a root file system tar without root: device nodes and fifos are skipped (LKL's
    devtmpfs provides /dev), and paths leaving ``root`` are refused where tarfile can filter."""
    with tarfile.open(archive_path) as archive:
        members = [m for m in archive.getmembers() if not (m.isdev() or m.isfifo())]
        if hasattr(tarfile, "tar_filter"):
            archive.extractall(root, members=members, filter="tar")
        else:  # Python before 3.11.4
            archive.extractall(root, members=members)


def build_image(layout: Layout, rootfs: Path, size: str, mke2fs: str) -> Path:
    """An ext4 image of ``rootfs`` with the overlay on top, built by ``mke2fs -d`` (no root needed)."""
    image = layout.out / "disk.img"
    with tempfile.TemporaryDirectory(prefix="capfaas-rootfs-", dir=layout.out) as scratch:
        root = Path(scratch) / "root"
        if rootfs.is_dir():
            shutil.copytree(rootfs, root, symlinks=True)
        elif tarfile.is_tarfile(rootfs):
            root.mkdir()
            extract_rootfs(rootfs, root)
        else:
            raise ValueError(f"--rootfs {rootfs} is neither a directory nor a tar archive")
        shutil.copytree(layout.overlay, root, symlinks=True, dirs_exist_ok=True)
        if image.exists():
            image.unlink()
        result = subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(root), str(image), size],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mke2fs failed: {(result.stderr or result.stdout).strip()}")
    return image


def write_config(layout: Layout, args: argparse.Namespace) -> Path:
    lines = ["[morello]"]
    for key in ("intravisor", "runtime"):
        value = getattr(args, key)
        lines.append(f'{key} = "{Path(value).resolve()}"' if value else f'# {key} = "/path/to/{key}"')
    disk = layout.image or args.disk
    lines.append(f'disk = "{Path(disk).resolve()}"' if disk else '# disk = "/path/to/disk.img"')
    lines += [f'python = "{args.python}"', f'bundle_dir = "{args.bundle_dir}"',
              f'max_cvm_size = "{args.max_cvm_size}"', f'work_dir = "{(layout.out / "runs").resolve()}"']
    config = layout.out / "capfaas.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def prepare(args: argparse.Namespace) -> Layout:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout = lay_out(out, args.python_version, args.bundle_dir)
    if args.rootfs:
        mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
        if mke2fs is None:
            raise RuntimeError("building the disk image needs mke2fs from e2fsprogs (1.43 or newer, for -d); "
                               "install e2fsprogs, or copy the overlay into an image yourself")
        layout.image = build_image(layout, Path(args.rootfs), args.image_size, mke2fs)
    else:
        layout.notes.append(f"no --rootfs given: copy {layout.overlay}/ into the root of a disk image that has "
                            f"Python {args.python_version} for musl at {args.python}")
    layout.config = write_config(layout, args)
    return layout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="capfaas-morello", help="directory to lay out (default: ./capfaas-morello)")
    parser.add_argument("--rootfs", help="a Python 3.11 musl root file system (directory or tar) to build disk.img from")
    parser.add_argument("--image-size", default="1G", help="size of the built ext4 image (default: 1G)")
    parser.add_argument("--disk", help="an existing disk image to name in the written capfaas.toml")
    parser.add_argument("--intravisor", help="the Intravisor binary on the board, for the written capfaas.toml")
    parser.add_argument("--runtime", help="libmusl-lkl.so on the board, for the written capfaas.toml")
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter inside the image")
    parser.add_argument("--python-version", default="3.11", help="its version, for site-packages (default: 3.11)")
    parser.add_argument("--bundle-dir", default="/var/lib/capfaas/bundles",
                        help="where the agent unpacks bundles inside the image")
    parser.add_argument("--max-cvm-size", default="0x40000000", help="CVM_MAX_SIZE of the Intravisor build (hex)")


def report(layout: Layout) -> str:
    lines = [f"capfaas {__version__} agent laid out in {layout.overlay} ({layout.files} files, no compiled modules)"]
    if layout.image:
        lines.append(f"disk image: {layout.image} ({os.path.getsize(layout.image) >> 20} MiB)")
    lines += layout.notes
    lines.append(f"configuration: {layout.config} (use it with CAPFAAS_CONFIG={layout.config}, then "
                 "`capfaas backends` tells what is still missing)")
    return "\n".join(lines)
