"""The gateway's own credentials: where the state lives, the admin password, and checking basic auth.

The gateway and the CLI find the password the same way (``CAPFAAS_ADMIN_PASSWORD``, then the file in
the state directory), so a user who started ``capfaas serve`` can run ``capfaas deploy`` beside it
without copying anything. The password is the gateway's secret: nothing here hands it to function
code, and the file holding it must be private to its owner.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import stat
from pathlib import Path

ADMIN_USER = "admin"
PASSWORD_ENV = "CAPFAAS_ADMIN_PASSWORD"
STATE_DIR_ENV = "CAPFAAS_STATE_DIR"
DEFAULT_STATE_DIR = ".capfaas"
PASSWORD_FILE = "admin-password"


class CredentialsError(Exception):
    """The admin password cannot be used as stored, with the reason and the fix in one sentence."""


def default_state_dir() -> Path:
    """``CAPFAAS_STATE_DIR`` or ``./.capfaas``, made absolute so a later ``chdir`` cannot move it."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser().absolute()


def ensure_state_dir(state_dir: Path) -> Path:
    """Create the state directory private to its owner (0700): it holds secrets and the password.

    An existing directory is left as its owner made it.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state_dir


def admin_password(state_dir: Path, *, create: bool) -> str | None:
    """The admin password: the environment's, else the stored one, else (``create``) a new stored one.

    The gateway passes ``create=True`` at start; the CLI passes ``False`` and gets ``None`` when
    there is nothing to find. Two gateways starting together on one state directory agree on one
    password, because the file is published with an exclusive link and the loser reads the winner's.
    """
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    path = state_dir / PASSWORD_FILE
    stored = _read_password(path)
    if stored is not None or not create:
        return stored
    ensure_state_dir(state_dir)
    _publish_password(path, secrets.token_urlsafe(24))
    stored = _read_password(path)  # ours, or the one a racing gateway published first
    if stored is None:
        raise CredentialsError(f"{path} vanished while the admin password was being created; start again")
    return stored


def _read_password(path: Path) -> str | None:
    """The password stored at ``path``, refusing a file that others than its owner may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CredentialsError(f"{path} is not a regular file; remove it or set {PASSWORD_ENV}")
    with os.fdopen(fd, "rb") as f:
        if mode & 0o077:
            raise CredentialsError(f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
                                   f" run 'chmod 600 {path}'")
        data = f.read()
    try:
        password = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialsError(f"{path} is not UTF-8 text; remove it to have a new password generated") from None
    if not password:
        raise CredentialsError(f"{path} is empty; remove it to have a new password generated")
    return password


def _publish_password(path: Path, password: str) -> None:
    """Write ``password`` to ``path`` whole and with mode 0600, unless a file is already there.

    The content goes to a private temporary file first (``O_CREAT | O_EXCL``, 0600, fsynced), which
    is then hard-linked to ``path``: ``link`` fails when ``path`` exists, so exactly one writer wins,
    and a reader never sees a half-written file.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits, but say exactly what is meant
        os.write(fd, password.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return
    finally:
        os.unlink(temporary)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def check_basic_auth(header: str | None, password: str) -> bool:
    """Whether an ``Authorization`` header is ``Basic`` for user ``admin`` with ``password``.

    Anything malformed is simply a refusal; both comparisons run in constant time and always both
    run, so timing tells nothing about which part was wrong.
    """
    if not header or not password:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, colon, given = decoded.partition(b":")
    if not colon:
        return False
    user_ok = hmac.compare_digest(user, ADMIN_USER.encode())
    password_ok = hmac.compare_digest(given, password.encode())
    return user_ok & password_ok
