"""``capfaas morello prepare``: the overlay is enough for the agent, and the disk image holds it."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from argparse import Namespace
from pathlib import Path

import pytest

from capfaas import __version__
from capfaas.backends.morello.prepare import extract_rootfs, prepare

CAPFAAS = [sys.executable, "-m", "capfaas"]


def options(out: Path, **changes: object) -> Namespace:
    values = {"out": str(out), "rootfs": None, "image_size": "64M", "disk": None, "intravisor": None, "runtime": None,
              "python": "/usr/bin/python3", "python_version": "3.11", "bundle_dir": "/var/lib/capfaas/bundles",
              "max_cvm_size": "0x40000000"}
    values.update(changes)
    return Namespace(**values)


def test_the_overlay_holds_the_agent_and_nothing_compiled(tmp_path: Path) -> None:
    layout = prepare(options(tmp_path / "out"))
    site = layout.site_packages
    assert (site / "capfaas/backends/morello/agent.py").is_file()
    assert (site / "msgpack/fallback.py").is_file() and (site / "pluggy/__init__.py").is_file()
    assert not [p for p in layout.overlay.rglob("*") if p.suffix in (".so", ".c", ".pyx", ".pyc")]
    assert (layout.overlay / "var/lib/capfaas/bundles").is_dir()
    assert json.loads((layout.overlay / "etc/capfaas-agent.json").read_text())["capfaas"] == __version__
    written = tomllib.loads(layout.config.read_text())["morello"]  # type: ignore[union-attr]
    assert written["python"] == "/usr/bin/python3" and written["max_cvm_size"] == "0x40000000"
    assert "disk" not in written  # no image was built or named
    assert any("no --rootfs given" in note for note in layout.notes)


def test_the_overlay_alone_runs_the_agents_imports(tmp_path: Path) -> None:
    """With no site-packages but the overlay's (python -S), as inside a cVM's image."""
    layout = prepare(options(tmp_path / "out"))
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(layout.site_packages)!r})
        import capfaas.backends.morello.agent as agent
        from capfaas.core import capability
        import msgpack
        from capfaas.plugin_manager import make_plugin_manager
        assert make_plugin_manager(autoload=False).hook.capfaas_libos() is not None
        assert agent.__file__.startswith({str(layout.site_packages)!r}), agent.__file__
        assert msgpack.__file__.startswith({str(layout.site_packages)!r})
        assert "aiohttp" not in sys.modules, "the agent must not need the gateway's dependencies"
        print(capability.IMPLEMENTATION)
    """)
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "python"  # no compiled module in the image: the pure-Python twin


@pytest.mark.skipif(not (shutil.which("mke2fs") and shutil.which("debugfs")), reason="needs e2fsprogs (mke2fs, debugfs)")
def test_a_disk_image_is_built_from_a_root_file_system(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/python3").write_text("#!/bin/sh\n")
    layout = prepare(options(tmp_path / "out", rootfs=str(rootfs), runtime="/opt/iv/libmusl-lkl.so"))
    assert layout.image is not None and layout.image.stat().st_size == 64 << 20
    listing = subprocess.run(["debugfs", "-R", "ls -p /usr/lib/python3.11/site-packages/capfaas/backends/morello",
                              str(layout.image)], capture_output=True, text=True, timeout=60).stdout
    assert "/agent.py/" in listing and "/backend.py/" in listing
    python = subprocess.run(["debugfs", "-R", "stat /usr/bin/python3", str(layout.image)], capture_output=True,
                            text=True, timeout=60).stdout
    assert "Type: regular" in python
    written = tomllib.loads(layout.config.read_text())["morello"]  # type: ignore[union-attr]
    assert written["disk"] == str(layout.image.resolve()) and written["runtime"] == "/opt/iv/libmusl-lkl.so"


def test_a_root_file_system_tar_is_unpacked_without_device_nodes(tmp_path: Path) -> None:
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"#!/bin/sh\n"
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "/bin/busybox"
        tar.addfile(link)
        device = tarfile.TarInfo("dev/null")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
    root = tmp_path / "root"
    root.mkdir()
    extract_rootfs(archive, root)
    assert (root / "bin/busybox").read_bytes() == b"#!/bin/sh\n"
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert not (root / "dev/null").exists()


def test_the_cli_verb(tmp_path: Path) -> None:
    env = dict(os.environ, CAPFAAS_DISABLE_PLUGIN_AUTOLOAD="1")
    result = subprocess.run([*CAPFAAS, "morello", "prepare", "--out", str(tmp_path / "board")], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "agent laid out in" in result.stdout and "capfaas.toml" in result.stdout
    assert (tmp_path / "board/capfaas.toml").is_file()
    missing = subprocess.run([*CAPFAAS, "morello", "prepare", "--out", str(tmp_path / "x"),
                              "--rootfs", str(tmp_path / "nothing-here")], capture_output=True, text=True,
                             timeout=120, env=dict(env, PATH=str(tmp_path)))
    assert missing.returncode == 1 and "needs mke2fs from e2fsprogs" in missing.stderr
