"""Is this a CHERI host that can run Intravisor? Each check names what failed and what to install.

Host facts (``/etc/os-release``, ``uname -m``, ``uname -p``, the sealing-capability sysctl) are
read once into :class:`HostFacts`, so the tests can replay recorded outputs of real hosts; the
installation (monitor, library OS, disk image) comes from :mod:`.config`.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import MorelloConfig

SEALCAP_SYSCTL = "security.cheri.sealcap"
MORELLO_PROCESSORS = ("aarch64c", "aarch64")
"""``uname -p`` on CheriBSD for Morello: purecap userland, or hybrid."""


@dataclass(frozen=True)
class HostFacts:
    """What detection reads from the host; recorded outputs of real hosts make the tests."""

    os_release: str
    machine: str
    """``uname -m``."""
    processor: str
    """``uname -p``."""
    sealcap_sysctl: bool
    """Whether ``sysctl -N security.cheri.sealcap`` names an existing node."""


def read_host() -> HostFacts:
    try:
        os_release = Path("/etc/os-release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        os_release = ""
    sealcap = False
    sysctl = shutil.which("sysctl") or ("/sbin/sysctl" if os.path.exists("/sbin/sysctl") else None)
    if sysctl and platform.system() == "FreeBSD":
        try:
            probe = subprocess.run([sysctl, "-N", SEALCAP_SYSCTL], capture_output=True, timeout=5)
            sealcap = probe.returncode == 0 and SEALCAP_SYSCTL.encode() in probe.stdout
        except (OSError, subprocess.TimeoutExpired):
            sealcap = False
    return HostFacts(os_release, platform.machine(), platform.processor(), sealcap)


def os_id(os_release: str) -> str:
    for line in os_release.splitlines():
        if line.startswith("ID="):
            return line[3:].strip().strip('"') or "unknown"
    return "unknown"


def check_os(facts: HostFacts) -> str | None:
    found = os_id(facts.os_release)
    if found == "cheribsd":
        return None
    return (f"not CheriBSD (/etc/os-release has ID={found}); Intravisor needs CheriBSD on an Arm Morello "
            "board: install a CheriBSD release for Morello (or build one with cheribuild.py "
            "cheribsd-morello-purecap)")


def check_machine(facts: HostFacts) -> str | None:
    if facts.machine == "arm64" and facts.processor in MORELLO_PROCESSORS:
        return None
    return (f"not a Morello board (uname -m is {facts.machine!r}, uname -p is {facts.processor!r}; "
            "expected arm64 with aarch64c or aarch64): run capfaas on CheriBSD on Arm Morello hardware")


def check_sealcap(facts: HostFacts) -> str | None:
    if facts.sealcap_sysctl:
        return None
    return (f"the sysctl {SEALCAP_SYSCTL} is missing: Intravisor seals cVM capabilities with it; boot a "
            "CheriBSD kernel that provides it (with the DDC/PCC-relative addressing patches Intravisor's "
            "build notes list)")


def check_intravisor(config: MorelloConfig) -> str | None:
    if not config.intravisor:
        return ("no Intravisor binary found: build Intravisor for Morello and set CAPFAAS_INTRAVISOR to it "
                "(or intravisor = \"...\" under [morello] in capfaas.toml, or put intravisor on PATH)")
    if not os.path.isfile(config.intravisor) or not os.access(config.intravisor, os.X_OK):
        return (f"the Intravisor binary {config.intravisor} ({_origin(config)}) is missing or not executable: "
                "build Intravisor for Morello and point CAPFAAS_INTRAVISOR at it")
    return None


def check_runtime(config: MorelloConfig) -> str | None:
    if not config.runtime:
        return ("no library OS runtime configured: build Intravisor's musl-lkl runtime and set "
                "runtime = \"/path/libmusl-lkl.so\" under [morello] in capfaas.toml")
    if not os.path.isfile(config.runtime):
        return (f"the library OS runtime {config.runtime} (from {config.source}) does not exist: build "
                "Intravisor's musl-lkl runtime (libmusl-lkl.so) and point runtime at it")
    return None


def check_disk(config: MorelloConfig) -> str | None:
    if not config.disk:
        return ("no disk image configured: make one with `capfaas morello prepare` and set "
                "disk = \"/path/disk.img\" under [morello] in capfaas.toml")
    if not os.path.isfile(config.disk):
        return (f"the disk image {config.disk} (from {config.source}) does not exist: make it with "
                "`capfaas morello prepare` (it needs Python 3.11 and the capfaas agent inside)")
    return None


HOST_CHECKS = (("CheriBSD", check_os), ("Morello", check_machine), ("sealing capability", check_sealcap))
INSTALL_CHECKS = (("Intravisor", check_intravisor), ("library OS", check_runtime), ("disk image", check_disk))


def failed_host_check(facts: HostFacts) -> str | None:
    """The first CHERI requirement of the host itself that fails, as a sentence; None when met."""
    return next((problem for _, check in HOST_CHECKS if (problem := check(facts))), None)


def failed_install_check(config: MorelloConfig) -> str | None:
    """The first missing piece of the Intravisor installation, as a sentence; None when complete."""
    return next((problem for _, check in INSTALL_CHECKS if (problem := check(config))), None)


def _origin(config: MorelloConfig) -> str:
    return "from CAPFAAS_INTRAVISOR" if os.environ.get("CAPFAAS_INTRAVISOR") == config.intravisor \
        else f"from {config.source}"


def failed_check(facts: HostFacts, config: MorelloConfig) -> str | None:
    """The first requirement this host misses, host before installation; None when all are met."""
    return failed_host_check(facts) or failed_install_check(config)
