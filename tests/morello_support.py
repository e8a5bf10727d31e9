"""Shared by the Morello tests: recorded host facts, and a board made of the stand-in monitor."""
from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capfaas.backends.morello.config import MorelloConfig
from capfaas.backends.morello.detect import HostFacts
from capfaas.core.spec import FunctionSpec, Limits

FAKE_MONITOR = Path(__file__).resolve().parent / "fake_intravisor.py"

CHERIBSD_OS_RELEASE = """\
NAME=CheriBSD
VERSION="23.11"
VERSION_ID="23.11"
ID=cheribsd
ANSI_COLOR="0;31"
PRETTY_NAME="CheriBSD 23.11"
CPE_NAME="cpe:/o:cheribsd:cheribsd:23.11"
HOME_URL="https://cheribsd.org/"
"""
"""In the format FreeBSD's rc.d/os-release writes, with the ID the docs give for CheriBSD. Not
captured from a board: none was available. The Linux facts below were captured on this machine."""

MORELLO_PURECAP = HostFacts(CHERIBSD_OS_RELEASE, "arm64", "aarch64c", True)
MORELLO_HYBRID = HostFacts(CHERIBSD_OS_RELEASE, "arm64", "aarch64", True)
CHERIBSD_NO_SEALCAP = HostFacts(CHERIBSD_OS_RELEASE, "arm64", "aarch64c", False)
CHERIBSD_RISCV = HostFacts(CHERIBSD_OS_RELEASE, "riscv", "riscv64c", True)
DEBIAN_X86 = HostFacts("""\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
""", "x86_64", "", False)
FREEBSD_ARM64 = HostFacts('NAME=FreeBSD\nVERSION="14.0-RELEASE"\nVERSION_ID="14.0"\nID=freebsd\n',
                          "arm64", "aarch64", False)


@dataclass
class Board:
    """A stand-in board: the fake monitor, a dummy runtime and disk, and the configuration naming them."""

    root: Path
    config: MorelloConfig

    def with_mode(self, mode: str, **changes: Any) -> MorelloConfig:
        wrapper = self.root / f"intravisor-{mode}"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_MONITOR} --mode {mode} "
                           f"--state {self.root}/starts-{mode} \"$@\"\n")
        wrapper.chmod(0o755)
        return replace(self.config, intravisor=str(wrapper), **changes)

    def function(self, name: str, code: str, timeout: float = 5.0) -> FunctionSpec:
        bundle = self.root / "functions" / name
        bundle.mkdir(parents=True)
        (bundle / "fn.py").write_text(textwrap.dedent(code))
        return FunctionSpec(name=name, bundle=bundle, module="fn.py", limits=Limits(timeout=timeout, output=4096))


def make_board(root: Path) -> Board:
    (root / "libmusl-lkl.so").write_bytes(b"\x7fELF stand-in")
    (root / "disk.img").write_bytes(bytes(4096))
    (root / "bundles").mkdir()
    config = MorelloConfig(intravisor=None, runtime=str(root / "libmusl-lkl.so"), disk=str(root / "disk.img"),
                           bundle_dir=str(root / "bundles"), work_dir=str(root / "runs"), start_timeout=15.0,
                           spin_grace=0.5, start_attempts=2, source="the test board")
    board = Board(root, config)
    board.config = board.with_mode("ok")
    return board


def processes_under(root: Path) -> list[int]:
    """Live processes whose command line mentions ``root`` (the stand-in monitor and its agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if str(root).encode() in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return found
