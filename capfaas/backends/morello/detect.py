"""Is this a CHERI host that can run Intravisor? Each check says exactly what failed."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostFacts:
    """What detection reads from the host; recorded outputs of real hosts make the tests."""

    os_release: str
    machine: str
    processor: str
    sealcap_sysctl: bool
    intravisor: str | None


def read_host() -> HostFacts:
    try:
        os_release = Path("/etc/os-release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        os_release = ""
    processor = platform.processor()
    sysctl = shutil.which("sysctl")
    sealcap = False
    if sysctl and platform.system() == "FreeBSD":
        probe = subprocess.run([sysctl, "-n", "security.cheri.sealcap"], capture_output=True, timeout=5)
        sealcap = probe.returncode == 0
    intravisor = os.environ.get("CAPFAAS_INTRAVISOR") or shutil.which("intravisor")
    return HostFacts(os_release, platform.machine(), processor, sealcap, intravisor)


def _os_id(os_release: str) -> str:
    for line in os_release.splitlines():
        if line.startswith("ID="):
            return line[3:].strip().strip('"')
    return "unknown"


def failed_check(facts: HostFacts) -> str | None:
    """The first CHERI requirement this host misses, as a sentence; None when all are met."""
    os_id = _os_id(facts.os_release)
    if os_id != "cheribsd":
        return f"not CheriBSD (/etc/os-release has ID={os_id}); Intravisor needs CheriBSD on Arm Morello"
    if facts.machine != "arm64" or facts.processor not in ("aarch64c", "aarch64"):
        return (f"not a Morello board (uname -m is {facts.machine!r}, uname -p is {facts.processor!r}; "
                "expected arm64 with aarch64c or aarch64)")
    if not facts.sealcap_sysctl:
        return "the sysctl security.cheri.sealcap is missing; Intravisor needs a kernel that exposes it"
    if not facts.intravisor or not os.access(facts.intravisor, os.X_OK):
        return ("no Intravisor binary found: build Intravisor for Morello and set CAPFAAS_INTRAVISOR "
                "to its path (or put intravisor on PATH)")
    return None
