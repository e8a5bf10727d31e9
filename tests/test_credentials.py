"""The admin password and basic auth, on real files and real racing processes."""
from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from capfaas.credentials import (
    PASSWORD_ENV,
    PASSWORD_FILE,
    STATE_DIR_ENV,
    CredentialsError,
    admin_password,
    check_basic_auth,
    default_state_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_password_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_generated_once_private_and_stable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = admin_password(state, create=True)
    assert first and len(first) >= 32
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    stored = state / PASSWORD_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stored.read_text().strip() == first
    assert admin_password(state, create=True) == first
    assert admin_password(state, create=False) == first
    assert sorted(os.listdir(state)) == [PASSWORD_FILE]  # no temporary left behind


def test_nothing_to_find_without_create(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert admin_password(state, create=False) is None
    assert not state.exists()


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = admin_password(tmp_path, create=True)
    monkeypatch.setenv(PASSWORD_ENV, "from-the-environment")
    assert admin_password(tmp_path, create=True) == "from-the-environment"
    assert admin_password(tmp_path, create=False) == "from-the-environment"
    assert (tmp_path / PASSWORD_FILE).read_text().strip() == stored


def test_empty_environment_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "")
    assert admin_password(tmp_path, create=False) is None


def test_environment_needs_no_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    assert admin_password(tmp_path / "absent", create=True) == "pw"
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_file_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / PASSWORD_FILE
    path.write_text("hunter2\n")
    path.chmod(mode)
    with pytest.raises(CredentialsError, match="chmod 600"):
        admin_password(tmp_path, create=True)
    assert path.read_text() == "hunter2\n"  # refused, not replaced


def test_hand_written_file_is_used_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / PASSWORD_FILE
    path.write_text("chosen by hand\n")
    path.chmod(0o600)
    assert admin_password(tmp_path, create=True) == "chosen by hand"


def test_empty_file_is_an_error_not_a_password(tmp_path: Path) -> None:
    path = tmp_path / PASSWORD_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match="empty"):
        admin_password(tmp_path, create=True)


def test_directory_in_place_of_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / PASSWORD_FILE).mkdir(mode=0o700)
    with pytest.raises(CredentialsError, match="not a regular file"):
        admin_password(tmp_path, create=True)


RACER = """
import sys
from pathlib import Path
from capfaas.credentials import admin_password
print("ready", flush=True)
sys.stdin.readline()
print(admin_password(Path(sys.argv[1]), create=True), flush=True)
"""


def test_gateways_starting_together_agree_on_one_password(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(state)], cwd=ROOT, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(8)]
    try:
        for racer in racers:
            assert racer.stdout.readline() == "ready\n"
        for racer in racers:  # release them all at once
            racer.stdin.write("go\n")
            racer.stdin.flush()
        answers = []
        for racer in racers:
            out, err = racer.communicate(timeout=60)
            assert racer.returncode == 0, err
            answers.append(out.strip())
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert len(set(answers)) == 1
    assert (state / PASSWORD_FILE).read_text().strip() == answers[0]
    assert sorted(os.listdir(state)) == [PASSWORD_FILE]


def test_default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_state_dir() == tmp_path / ".capfaas"
    monkeypatch.setenv(STATE_DIR_ENV, "elsewhere")
    assert default_state_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "abs"))
    assert default_state_dir() == tmp_path / "abs"


def test_basic_auth_accepts_admin_with_the_password() -> None:
    assert check_basic_auth(basic("admin", "s3cret"), "s3cret")
    assert check_basic_auth("  basic " + basic("admin", "s3cret")[6:] + " ", "s3cret")
    assert check_basic_auth(basic("admin", "with:colon"), "with:colon")
    assert check_basic_auth(basic("admin", "pässwörd"), "pässwörd")


@pytest.mark.parametrize("header", [
    None,
    "",
    "Basic",
    "Basic ",
    "Bearer " + base64.b64encode(b"admin:s3cret").decode(),
    basic("admin", "wrong"),
    basic("root", "s3cret"),
    basic("admin", "s3cret" + "x"),
    basic("admin", ""),
    "Basic " + base64.b64encode(b"admins3cret").decode(),  # no colon
    "Basic !!!not-base64!!!",
    "Basic YWRtaW46czNjcmV0\x00",
    "Basic ÿÿÿÿ",
    "Basic " + base64.b64encode(b"\xff\xfe:s3cret").decode(),
])
def test_basic_auth_refuses_anything_else(header: str | None) -> None:
    assert not check_basic_auth(header, "s3cret")


def test_basic_auth_refuses_missing_padding() -> None:
    assert check_basic_auth(basic("admin", "pw"), "pw")
    assert not check_basic_auth(basic("admin", "pw").rstrip("="), "pw")


def test_basic_auth_never_accepts_an_empty_password() -> None:
    assert not check_basic_auth(basic("admin", ""), "")
