"""Detection and configuration of the Morello backend, on recorded outputs of CHERI and other hosts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from capfaas.backends.emulated.backend import EmulatedBackend
from capfaas.backends.morello import detect
from capfaas.backends.morello.backend import MorelloBackend
from capfaas.backends.morello.config import ConfigError, MorelloConfig, from_mapping, load_config
from capfaas.core.backend import Backend, BackendError, select_backend
from capfaas.plugin_manager import make_plugin_manager

from .morello_support import (CHERIBSD_NO_SEALCAP, CHERIBSD_RISCV, DEBIAN_X86, FREEBSD_ARM64, MORELLO_HYBRID,
                              MORELLO_PURECAP)


@pytest.fixture
def install(tmp_path: Path) -> MorelloConfig:
    """A complete installation: an executable monitor, a runtime and a disk image."""
    monitor = tmp_path / "intravisor"
    monitor.write_text("#!/bin/sh\n")
    monitor.chmod(0o755)
    (tmp_path / "libmusl-lkl.so").write_bytes(b"")
    (tmp_path / "disk.img").write_bytes(b"")
    return MorelloConfig(intravisor=str(monitor), runtime=str(tmp_path / "libmusl-lkl.so"),
                         disk=str(tmp_path / "disk.img"), source=str(tmp_path / "capfaas.toml"))


@pytest.mark.parametrize("facts", [MORELLO_PURECAP, MORELLO_HYBRID], ids=["purecap", "hybrid"])
def test_a_morello_board_with_intravisor_passes(facts: detect.HostFacts, install: MorelloConfig) -> None:
    assert detect.failed_check(facts, install) is None


@pytest.mark.parametrize(("facts", "expected"), [
    (DEBIAN_X86, r"^not CheriBSD \(/etc/os-release has ID=debian\); .*install a CheriBSD release for Morello"),
    (FREEBSD_ARM64, r"^not CheriBSD \(/etc/os-release has ID=freebsd\)"),
    (detect.HostFacts("", "arm64", "aarch64c", True), r"^not CheriBSD \(/etc/os-release has ID=unknown\)"),
    (CHERIBSD_RISCV, r"^not a Morello board \(uname -m is 'riscv', uname -p is 'riscv64c'; expected arm64"),
    (CHERIBSD_NO_SEALCAP, r"^the sysctl security\.cheri\.sealcap is missing: .*boot a CheriBSD kernel"),
], ids=["debian-x86_64", "freebsd-arm64", "no-os-release", "cheribsd-riscv", "no-sealcap"])
def test_each_host_check_names_what_failed(facts: detect.HostFacts, expected: str, install: MorelloConfig) -> None:
    assert re.search(expected, detect.failed_check(facts, install) or "")


@pytest.mark.parametrize(("change", "expected"), [
    ({"intravisor": None}, r"^no Intravisor binary found: build Intravisor for Morello and set CAPFAAS_INTRAVISOR"),
    ({"intravisor": "/nonexistent/intravisor"}, r"/nonexistent/intravisor .*missing or not executable"),
    ({"runtime": None}, r"^no library OS runtime configured: build Intravisor's musl-lkl runtime"),
    ({"runtime": "/nonexistent/libmusl-lkl.so"}, r"libmusl-lkl\.so .*does not exist: build"),
    ({"disk": None}, r"^no disk image configured: make one with `capfaas morello prepare`"),
    ({"disk": "/nonexistent/disk.img"}, r"disk\.img .*does not exist: make it with `capfaas morello prepare`"),
])
def test_each_install_check_names_the_missing_piece(change: dict, expected: str, install: MorelloConfig) -> None:
    assert re.search(expected, detect.failed_check(MORELLO_PURECAP, replace(install, **change)) or "")


def test_a_monitor_that_is_not_executable_is_refused(install: MorelloConfig) -> None:
    os.chmod(install.intravisor, 0o644)  # type: ignore[arg-type]
    assert "missing or not executable" in (detect.failed_check(MORELLO_PURECAP, install) or "")


def test_this_host_is_read_and_refused() -> None:
    facts = detect.read_host()
    assert facts.machine == os.uname().machine
    if detect.os_id(facts.os_release) != "cheribsd":
        assert not MorelloBackend.availability().available
        assert MorelloBackend.availability().reason.startswith("not CheriBSD")


def test_selecting_morello_here_fails_with_the_check() -> None:
    classes = [cls for group in make_plugin_manager(autoload=False).hook.capfaas_backends() for cls in group]
    if MorelloBackend.availability().available:
        pytest.skip("this host can run the Morello backend")
    with pytest.raises(BackendError, match=r"^backend 'morello' is not available here: not CheriBSD .*install"):
        select_backend(classes, "morello")


def test_the_cli_reports_the_failed_check() -> None:
    env = dict(os.environ, CAPFAAS_DISABLE_PLUGIN_AUTOLOAD="1")
    listed = subprocess.run([sys.executable, "-m", "capfaas", "backends", "--json"], capture_output=True,
                            text=True, env=env, timeout=60)
    morello = next(row for row in json.loads(listed.stdout) if row["name"] == "morello")
    assert not morello["available"] and morello["reason"].startswith("not CheriBSD")
    checked = subprocess.run([sys.executable, "-m", "capfaas", "morello", "check"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert checked.returncode == 1
    assert "FAIL  CheriBSD: not CheriBSD" in checked.stdout and "FAIL  Intravisor: no Intravisor binary" in checked.stdout


# -- configuration --------------------------------------------------------------------------------

def test_configuration_from_a_file_and_the_environment(tmp_path: Path) -> None:
    config_file = tmp_path / "capfaas.toml"
    config_file.write_text('[morello]\nintravisor = "bin/intravisor"\nruntime = "/opt/iv/libmusl-lkl.so"\n'
                           'disk = "disk.img"\nmax_cvm_size = "0x10000000"\ncvm_base = "0x20000000"\n'
                           'start_timeout = 300\nready_timeout = 600\nspin_grace = 2.5\nstart_attempts = 3\n'
                           'keep_runs = true\n')
    config = load_config({"CAPFAAS_CONFIG": str(config_file), "PATH": ""}, tmp_path)
    assert config.intravisor == str(tmp_path / "bin/intravisor")  # relative to the file
    assert (config.runtime, config.disk) == ("/opt/iv/libmusl-lkl.so", str(tmp_path / "disk.img"))
    assert (config.max_cvm_size, config.cvm_base) == (0x10000000, 0x20000000)
    assert (config.start_timeout, config.spin_grace, config.start_attempts, config.keep_runs) == (300.0, 2.5, 3, True)
    assert config.ready_timeout == MorelloBackend(config).ready_timeout == 600.0
    overridden = load_config({"CAPFAAS_CONFIG": str(config_file), "CAPFAAS_INTRAVISOR": "/usr/local/bin/iv"}, tmp_path)
    assert overridden.intravisor == "/usr/local/bin/iv"


def test_a_local_capfaas_toml_is_found_and_intravisor_on_path(tmp_path: Path) -> None:
    (tmp_path / "capfaas.toml").write_text('[morello]\nruntime = "libmusl-lkl.so"\n')
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "intravisor").write_text("#!/bin/sh\n")
    (bindir / "intravisor").chmod(0o755)
    config = load_config({"PATH": str(bindir)}, tmp_path)
    assert config.runtime == str(tmp_path / "libmusl-lkl.so") and config.intravisor == str(bindir / "intravisor")
    assert load_config({"PATH": ""}, tmp_path / "bin").source == "defaults"


@pytest.mark.parametrize(("section", "expected"), [
    ({"intravisr": "/x"}, r"unknown key in \[morello\]: intravisr \(known: "),
    ({"max_cvm_size": "1073741824"}, r"max_cvm_size must be hex like \"0x40000000\", got '1073741824'"),
    ({"max_cvm_size": "0x30000000"}, r"max_cvm_size must be a power of two"),
    ({"cvm_base": "0x400001000"}, r"cvm_base 0x400001000 must be a positive multiple of max_cvm_size"),
    ({"start_timeout": "soon"}, r"start_timeout must be a number of seconds"),
    ({"ready_timeout": 0}, r"ready_timeout must be a positive number of seconds"),
    ({"python": "python3"}, r"python must be an absolute path inside the disk image"),
    ({"keep_runs": "yes"}, r"keep_runs must be true or false"),
])
def test_bad_configuration_is_refused_with_the_key(section: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        from_mapping(section, "capfaas.toml")


def test_morello_waits_longer_for_ready_than_the_default() -> None:
    """The function's import runs in a cVM after LKL and Python started there."""
    assert Backend.ready_timeout == EmulatedBackend.ready_timeout == 30.0
    assert MorelloBackend(MorelloConfig()).ready_timeout == 120.0


def test_broken_toml_is_reported(tmp_path: Path) -> None:
    (tmp_path / "capfaas.toml").write_text("[morello\n")
    with pytest.raises(ConfigError, match=r"capfaas\.toml is not valid TOML"):
        load_config({}, tmp_path)
    with pytest.raises(ConfigError, match=r"cannot read the capfaas configuration"):
        load_config({"CAPFAAS_CONFIG": str(tmp_path / "absent.toml")}, tmp_path)
