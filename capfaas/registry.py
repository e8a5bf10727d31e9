"""The function registry: every deployed version of every function, and the secrets, in one SQLite file.

Why SQLite: a deploy (the deployment, all of its files, the new current version) must become
visible whole or not at all, and survive a crash of the gateway at any instant. One transaction
in an embedded database gives exactly that, with no server to run. The file lives in the state
directory (``registry.sqlite3``) in WAL mode, so readers never wait for a deploy.

Versions are never renumbered or reused: ``(name, version)`` names one immutable bundle forever,
so caches keyed by it (materialised bundles, warm templates) can never serve the wrong code, and
an invocation that started on version 3 finishes on version 3 even after a ``PUT`` made 4
current. Old versions stay until ``prune`` is told which ones are no longer in use.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from .core.spec import FunctionSpec, Limits, SpecError, check_name, declared_files
from .credentials import ensure_state_dir

DB_FILE = "registry.sqlite3"
BUNDLES_DIR = "bundles"
SCHEMA_VERSION = 2
DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_BUNDLE_BYTES = 64 << 20
MAX_SECRET_BYTES = 1 << 20
"""As Kubernetes, where OpenFaaS keeps its secrets: enough for keys and certificates."""
MAX_PATH_BYTES = 1024
BUSY_TIMEOUT_SECONDS = 10.0
"""How long a writer waits for another process's deploy (the CLI beside the gateway) to finish."""


class RegistryError(Exception):
    """A registry request that cannot be done, with the reason in one sentence."""


class NotFound(RegistryError, LookupError):
    """The function, version or secret does not exist (HTTP 404)."""


class AlreadyExists(RegistryError):
    """The function or secret exists and the request was to create it (HTTP 409)."""


class InvalidInput(RegistryError, ValueError):
    """A name, deployment field, file path or secret that is not acceptable (HTTP 400)."""


class BundleTooLarge(InvalidInput):
    """The bundle has more files or bytes than the caller allows (HTTP 413)."""


# --- the deployment ----------------------------------------------------------------------------

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CPU = re.compile(r"[0-9]+(?:\.[0-9]+)?m?")


def _parse_bytes(value: str | int, key: str) -> int:
    """A Kubernetes quantity (``128Mi``, ``1G``, ``4096``) as whole bytes, as OpenFaaS limits give them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise SpecError(f"limit {key} {value!r} is not a size: use bytes or a suffix such as 128Mi or 1G")
    return math.ceil(Decimal(match[1]) * _UNITS[match[2]])


def _parse_seconds(value: str | int | float, key: str) -> float:
    """Seconds from a number or a Go duration (``30s``, ``1m30s``, ``500ms``), as OpenFaaS writes timeouts."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value):
            return float(value)
        if value and "".join(m[0] for m in _DURATION_PART.finditer(value)) == value:
            return sum(float(m[1]) * _DURATION_UNITS[m[2]] for m in _DURATION_PART.finditer(value))
    raise SpecError(f"limit {key} {value!r} is not a duration: use seconds or a form such as 30s or 1m30s")


def _parse_count(value: str | int, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SpecError(f"limit {key} {value!r} is not a whole number")


def _check_cpu(value: str | int | float, key: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return
    if isinstance(value, str) and _CPU.fullmatch(value):
        return
    raise SpecError(f"limit {key} {value!r} is not a CPU quantity: use cores such as 0.5 or 500m")


_LIMIT_PARSERS = {
    "memory": _parse_bytes,
    "tmp": _parse_bytes,
    "output": _parse_bytes,
    "timeout": _parse_seconds,
    "cpu_seconds": _parse_count,
    "open_files": _parse_count,
    "concurrency": _parse_count,
}


def parse_limits(given: Mapping[str, Any]) -> Limits:
    """capfaas ``Limits`` from a deployment's ``limits`` as the client wrote them.

    OpenFaaS's ``memory`` and capfaas's ``timeout``, ``cpu_seconds``, ``open_files``, ``output``
    and ``tmp`` are enforced per cVM. OpenFaaS's ``cpu`` (a share of cores) is checked and kept
    for ``FunctionStatus`` but not enforced: a cVM's CPU is bounded by ``cpu_seconds`` and
    ``timeout`` instead. An unknown key is refused rather than silently ignored, since a typo
    there would drop a limit the user believes is in force.
    """
    values: dict[str, Any] = {}
    for key, value in given.items():
        if key == "cpu":
            _check_cpu(value, key)
        elif key in _LIMIT_PARSERS:
            values[key] = _LIMIT_PARSERS[key](value, key)
        else:
            known = ", ".join(sorted((*_LIMIT_PARSERS, "cpu")))
            raise SpecError(f"limit {key!r} is not known; use {known}")
    return Limits(**values)


def _string_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise InvalidInput(f"{what} must map strings to strings")
    return dict(value)


@dataclass(frozen=True)
class DeploymentRecord:
    """What a client asked to deploy, kept as given so ``GET /system/function/{name}`` can show it.

    Constructing one validates it whole (raising ``InvalidInput``), so a record that exists can
    always become a ``FunctionSpec``. ``extra`` holds the OpenFaaS ``FunctionDeployment`` fields
    that capfaas stores but does not act on (``image``, ``namespace``, ``constraints``,
    ``envProcess``, ``requests``, ``readOnlyRootFilesystem``, ...), and capfaas's ``capFiles``,
    which become the spec's ``capfiles``.
    """

    name: str
    module: str = "handler.py"
    handler: str = "handle"
    signature: str = "native"
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, Any] = field(default_factory=dict)
    network: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # normalise to plain, private copies once, at the door
        set_field(self, "env", _string_map(self.env, "env"))
        set_field(self, "labels", _string_map(self.labels, "labels"))
        set_field(self, "annotations", _string_map(self.annotations, "annotations"))
        if not isinstance(self.secrets, (list, tuple)) or not all(isinstance(s, str) for s in self.secrets):
            raise InvalidInput("secrets must be a list of secret names")
        set_field(self, "secrets", tuple(dict.fromkeys(self.secrets)))
        if not isinstance(self.limits, Mapping):
            raise InvalidInput("limits must be an object such as {\"memory\": \"128Mi\"}")
        set_field(self, "limits", dict(self.limits))
        if not isinstance(self.network, bool):
            raise InvalidInput("network must be true or false")
        if not isinstance(self.extra, Mapping):
            raise InvalidInput("extra must be an object")
        set_field(self, "extra", dict(self.extra))
        try:
            json.dumps(self.extra)
            for secret in self.secrets:
                check_name(secret, what="secret name")
            self.spec(Path("/nonexistent"), {})
        except (SpecError, AttributeError, TypeError, ValueError) as exc:
            raise InvalidInput(str(exc)) from None

    def spec(self, bundle: Path, secrets: Mapping[str, bytes]) -> FunctionSpec:
        return FunctionSpec(name=self.name, bundle=bundle, module=self.module, handler=self.handler,
                            signature=self.signature, env=dict(self.env), secrets=dict(secrets),
                            network=self.network, limits=parse_limits(self.limits),
                            capfiles=declared_files(self.extra.get("capFiles")))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DeploymentRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise InvalidInput("a deployment record must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"a deployment record has unknown fields: {', '.join(sorted(unknown))}")
        if "name" not in data:
            raise InvalidInput("a deployment record must have a name")
        return cls(**data)


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a function: what was deployed and when."""

    name: str
    version: int
    created_at: str
    """When this version was deployed (ISO 8601, UTC)."""
    function_created_at: str
    """When the function was first deployed (since its last delete): OpenFaaS's ``createdAt``."""
    record: DeploymentRecord

    def to_spec(self, bundle: Path, *, secrets: Mapping[str, bytes] | None = None) -> FunctionSpec:
        """The spec cVMs of this version run under, with its code in ``bundle`` (see ``materialize``).

        Secret values are not in the record: the caller fetches them with
        ``Registry.secret_values(info.record.secrets)`` when it starts a cVM, so an update of a
        secret reaches the next instance.
        """
        return self.record.spec(bundle, secrets or {})


# --- the bundle's files ------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleFile:
    """One checked file of a bundle, as stored."""

    path: str
    content: bytes
    sha256: str


def _check_path(path: Any) -> str:
    """A bundle file path: relative, normalised, ``/``-separated, and inside the bundle."""
    if not isinstance(path, str) or not path:
        raise InvalidInput(f"bundle file path {path!r} must be a non-empty string")
    if "\0" in path or "\\" in path:
        raise InvalidInput(f"bundle file path {path!r} contains a NUL or a backslash")
    if path.startswith("/"):
        raise InvalidInput(f"bundle file path {path!r} is absolute; paths are relative to the bundle")
    parts = path.split("/")
    if ".." in parts:
        raise InvalidInput(f"bundle file path {path!r} climbs out with '..'")
    if posixpath.normpath(path) != path or "." in parts:
        raise InvalidInput(f"bundle file path {path!r} is not normalised (write {posixpath.normpath(path)!r})")
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"bundle file path {path!r} is not valid Unicode") from None
    if len(encoded) > MAX_PATH_BYTES or any(len(p.encode()) > 255 for p in parts):
        raise InvalidInput(f"bundle file path {path[:64]!r}... is too long")
    return path


def check_bundle(files: Mapping[str, bytes], module: str, *, max_files: int = DEFAULT_MAX_FILES,
                 max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> list[BundleFile]:
    """The bundle as rows to store, or the first reason it cannot be stored.

    ``deploy`` calls it; call it yourself before writing a client's files anywhere else (a
    staging directory), since until then a path may be ``/etc/passwd`` or ``../../x``.
    """
    if len(files) > max_files:
        raise BundleTooLarge(f"the bundle has {len(files)} files; at most {max_files} are allowed")
    checked: list[BundleFile] = []
    total = 0
    for path, content in files.items():
        _check_path(path)
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"bundle file {path!r} must be bytes")
        content = bytes(content)
        total += len(content)
        if total > max_bundle_bytes:
            raise BundleTooLarge(f"the bundle is larger than the {max_bundle_bytes} bytes allowed")
        checked.append(BundleFile(path, content, hashlib.sha256(content).hexdigest()))
    for item in checked:
        parent = posixpath.dirname(item.path)
        while parent:
            if parent in files:
                raise InvalidInput(f"bundle file {parent!r} is also the directory of {item.path!r}")
            parent = posixpath.dirname(parent)
    if module not in files:
        raise InvalidInput(f"the bundle has no {module!r}, the module to run")
    return checked


# --- the registry ------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _migrate_0_to_1(db: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would commit the migration's transaction first.
    for statement in ("""
        CREATE TABLE functions (
            name TEXT PRIMARY KEY,
            current INTEGER NOT NULL,      -- the live version, or the last one when deleted
            created_at TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1))
        )""", """
        CREATE TABLE versions (
            name TEXT NOT NULL REFERENCES functions(name),
            version INTEGER NOT NULL CHECK (version > 0),
            created_at TEXT NOT NULL,
            record TEXT NOT NULL,          -- DeploymentRecord as JSON
            PRIMARY KEY (name, version)
        )""", """
        CREATE TABLE files (
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            path TEXT NOT NULL,
            content BLOB NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (name, version, path),
            FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
        )""", """
        CREATE TABLE secrets (
            name TEXT PRIMARY KEY,
            value BLOB NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""):
        db.execute(statement)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE warm (
            name TEXT PRIMARY KEY REFERENCES functions(name),
            replicas INTEGER NOT NULL CHECK (replicas >= 0)   -- set by scale-function
        )""")


MIGRATIONS = (_migrate_0_to_1, _migrate_1_to_2)
"""``MIGRATIONS[n]`` takes the schema from version ``n`` to ``n + 1``; ``len(MIGRATIONS) == SCHEMA_VERSION``."""

_VERSION_COLUMNS = "v.name, v.version, v.created_at, f.created_at, v.record"


def _info(row: tuple[str, int, str, str, str]) -> VersionInfo:
    name, version, created_at, function_created_at, record = row
    return VersionInfo(name, version, created_at, function_created_at, DeploymentRecord.from_json(record))


class Registry:
    """The functions, their versions and files, and the secrets, of one state directory.

    Safe to share in one process: every call takes a lock around the one connection, and calls
    are short (``materialize`` does its file work outside it). Several processes may open the same
    directory; SQLite serialises their writes.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = ensure_state_dir(Path(state_dir))
        self.path = self.state_dir / DB_FILE
        self.bundles = self.state_dir / BUNDLES_DIR
        self._lock = threading.Lock()
        self._materialized: set[tuple[str, int]] = set()
        # Secrets are stored in the clear, so the file (and the -wal/-shm that SQLite creates with
        # the same mode) must be the owner's alone before the first byte is written.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._configure()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryError(f"{self.path} cannot be opened as a capfaas registry: {exc}") from exc
        except BaseException:
            self._db.close()
            raise

    def _configure(self) -> None:
        """WAL, so reads never wait for a deploy; ``synchronous=FULL``, so an acknowledged deploy
        survives a power loss and not only a crash of the gateway (NORMAL may lose the last commits
        then). Deploys are rare and the cost is one fsync of the WAL each; invocations never write.
        """
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RegistryError(f"{self.path} cannot use write-ahead logging (journal mode stays {mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` in one transaction, refusing a newer one."""
        with self._write() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise RegistryError(f"{self.path} has schema {current}, newer than this capfaas"
                                    f" understands ({SCHEMA_VERSION}); upgrade capfaas")
            for step in MIGRATIONS[current:]:
                step(db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``) so it never fails half-way
        for want of the write lock; anything raised inside rolls it back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- functions ---

    def set_warm(self, name: str, replicas: int) -> None:
        """Remember the warm count scale-function set, so a restart keeps it."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM functions WHERE name = ? AND deleted = 0", (name,)).fetchone() is None:
                raise NotFound(f"function {name!r} does not exist")
            db.execute("INSERT INTO warm (name, replicas) VALUES (?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET replicas = excluded.replicas", (name, replicas))

    def warm(self, name: str) -> int | None:
        """The warm count scale-function last set for ``name``, if any (cleared by a delete)."""
        rows = self._read("SELECT replicas FROM warm WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def deploy(self, record: DeploymentRecord, files: Mapping[str, bytes], *, replace: bool,
               max_files: int = DEFAULT_MAX_FILES,
               max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> VersionInfo:
        """Store ``files`` as the next version of ``record.name`` and make it current, in one transaction.

        ``replace=False`` is OpenFaaS's ``POST``: ``AlreadyExists`` when the name is live.
        ``replace=True`` is ``PUT``: ``NotFound`` when it is not. (faas-netes answers a ``POST``
        of an existing name with an error too; faas-cli sends ``PUT`` and falls back to ``POST``
        on 404.) Every secret the record names must exist (``InvalidInput`` otherwise, as
        faas-netes refuses with 400). Invocations already running keep their version.
        """
        checked = check_bundle(files, record.module, max_files=max_files, max_bundle_bytes=max_bundle_bytes)
        now = _now()
        with self._write() as db:
            row = db.execute("SELECT current, created_at, deleted FROM functions WHERE name = ?",
                             (record.name,)).fetchone()
            live = row is not None and not row[2]
            if live and not replace:
                raise AlreadyExists(f"function {record.name!r} exists; update it with PUT")
            if not live and replace:
                raise NotFound(f"function {record.name!r} does not exist; create it with POST")
            self._check_secrets_exist(db, record.secrets)
            version = row[0] + 1 if row is not None else 1
            function_created_at = row[1] if live else now
            if row is None:
                db.execute("INSERT INTO functions (name, current, created_at) VALUES (?, ?, ?)",
                           (record.name, version, now))
            else:
                db.execute("UPDATE functions SET current = ?, created_at = ?, deleted = 0 WHERE name = ?",
                           (version, function_created_at, record.name))
            db.execute("INSERT INTO versions (name, version, created_at, record) VALUES (?, ?, ?, ?)",
                       (record.name, version, now, record.to_json()))
            db.executemany("INSERT INTO files (name, version, path, content, sha256) VALUES (?, ?, ?, ?, ?)",
                           ((record.name, version, f.path, f.content, f.sha256) for f in checked))
        return VersionInfo(record.name, version, now, function_created_at, record)

    @staticmethod
    def _check_secrets_exist(db: sqlite3.Connection, names: Collection[str]) -> None:
        if not names:
            return
        marks = ",".join("?" * len(names))
        found = {r[0] for r in db.execute(f"SELECT name FROM secrets WHERE name IN ({marks})", tuple(names))}
        for name in names:
            if name not in found:
                raise InvalidInput(f"secret {name!r} does not exist; create it first")

    def current(self, name: str) -> VersionInfo | None:
        """The version new invocations of ``name`` run, or ``None`` when it is not deployed."""
        rows = self._read(f"SELECT {_VERSION_COLUMNS} FROM functions f JOIN versions v"
                          " ON v.name = f.name AND v.version = f.current WHERE f.name = ? AND NOT f.deleted",
                          (name,))
        return _info(rows[0]) if rows else None

    def version(self, name: str, version: int) -> VersionInfo | None:
        """One stored version, current or not, even of a deleted function (until pruned)."""
        rows = self._read(f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN functions f ON f.name = v.name"
                          " WHERE v.name = ? AND v.version = ?", (name, version))
        return _info(rows[0]) if rows else None

    def list(self) -> list[VersionInfo]:
        """The current version of every live function, by name."""
        rows = self._read(f"SELECT {_VERSION_COLUMNS} FROM functions f JOIN versions v"
                          " ON v.name = f.name AND v.version = f.current WHERE NOT f.deleted ORDER BY f.name")
        return [_info(row) for row in rows]

    def delete(self, name: str) -> bool:
        """Stop serving ``name``; whether it was live. Its versions stay for running invocations
        until ``prune``, and its numbering continues if it is deployed again."""
        with self._write() as db:
            db.execute("DELETE FROM warm WHERE name = ?", (name,))
            return db.execute("UPDATE functions SET deleted = 1 WHERE name = ? AND NOT deleted",
                              (name,)).rowcount == 1

    def files(self, name: str, version: int) -> dict[str, bytes]:
        """The bundle of one version as ``{path: content}``; ``NotFound`` when there is no such version."""
        return {f.path: f.content for f in self._files(name, version)}

    def _files(self, name: str, version: int) -> list[BundleFile]:
        with self._lock:
            if self._db.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?",
                                (name, version)).fetchone() is None:
                raise NotFound(f"function {name!r} has no version {version}")
            rows = self._db.execute("SELECT path, content, sha256 FROM files WHERE name = ? AND version = ?"
                                    " ORDER BY path", (name, version)).fetchall()
        return [BundleFile(*row) for row in rows]

    def prune(self, keep: Iterable[tuple[str, int]] = ()) -> list[tuple[str, int]]:
        """Forget every version that is neither current nor in ``keep`` (the versions invocations
        still run), and remove their bundles from disk; returns what was forgotten.

        Bundles left on disk by a crash between the two steps are removed by the next call.
        """
        keep = set(keep)
        with self._write() as db:
            stale = [(n, v) for n, v in db.execute(
                "SELECT v.name, v.version FROM versions v JOIN functions f ON f.name = v.name"
                " WHERE f.deleted OR v.version != f.current ORDER BY v.name, v.version") if (n, v) not in keep]
            db.executemany("DELETE FROM versions WHERE name = ? AND version = ?", stale)
            stored = set(db.execute("SELECT name, version FROM versions"))
        self._sweep_bundles(stored)
        return stale

    # --- bundles on disk ---

    def materialize(self, name: str, version: int) -> Path:
        """The bundle of one version as a read-only directory, ``bundles/<name>/<version>/``.

        The directory appears whole or not at all: files are written into a temporary directory
        beside it, fsynced, made read-only (files 0444, directories 0555) and renamed into place.
        An existing directory is reused once its files are checked against the stored hashes
        (once per version and process); one that does not match, and temporaries left by a crash,
        are removed. Safe against other threads and processes materialising the same function.
        """
        key = (name, version)
        target = self.bundles / name / str(version)
        with self._lock:
            if key in self._materialized and target.is_dir():
                return target
        files = self._files(name, version)
        with self._bundle_lock(name) as parent:
            for leftover in parent.glob(".tmp-*"):
                _remove_tree(leftover)
            if target.exists() and not _bundle_matches(target, files):
                _remove_tree(target)
            if not target.exists():
                _write_bundle(parent / f".tmp-{version}-{os.getpid()}", files, target)
        with self._lock:
            self._materialized.add(key)
        return target

    @contextmanager
    def _bundle_lock(self, name: str) -> Iterator[Path]:
        """``bundles/<name>/``, held exclusively (``flock``) across threads and processes."""
        parent = self.bundles / name
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield parent
        finally:
            os.close(fd)

    def _sweep_bundles(self, stored: set[tuple[str, int]]) -> None:
        if not self.bundles.is_dir():
            return
        for entry in sorted(self.bundles.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            with self._bundle_lock(entry.name) as parent:
                for child in parent.iterdir():
                    if child.name.isdigit() and (entry.name, int(child.name)) not in stored:
                        _remove_tree(child)
                        with self._lock:
                            self._materialized.discard((entry.name, int(child.name)))

    # --- secrets ---

    def set_secret(self, name: str, value: bytes, *, create: bool) -> None:
        """Create (``AlreadyExists`` if present) or update (``NotFound`` if absent) one secret.

        Running cVMs keep the value they started with; new ones get the new value.
        """
        try:
            check_name(name, what="secret name")
        except SpecError as exc:
            raise InvalidInput(str(exc)) from None
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"secret {name!r} must be bytes")
        value = bytes(value)
        if len(value) > MAX_SECRET_BYTES:
            raise InvalidInput(f"secret {name!r} is larger than {MAX_SECRET_BYTES} bytes")
        now = _now()
        with self._write() as db:
            exists = db.execute("SELECT 1 FROM secrets WHERE name = ?", (name,)).fetchone() is not None
            if create and exists:
                raise AlreadyExists(f"secret {name!r} exists; update it with PUT")
            if not create and not exists:
                raise NotFound(f"secret {name!r} does not exist; create it with POST")
            if create:
                db.execute("INSERT INTO secrets (name, value, created_at, updated_at) VALUES (?, ?, ?, ?)",
                           (name, value, now, now))
            else:
                db.execute("UPDATE secrets SET value = ?, updated_at = ? WHERE name = ?", (value, now, name))

    def secret_names(self) -> list[str]:
        """The names of all secrets, sorted; values never leave except through ``secret_values``."""
        return [row[0] for row in self._read("SELECT name FROM secrets ORDER BY name")]

    def secret_values(self, names: Iterable[str]) -> dict[str, bytes]:
        """The values of ``names`` for a cVM about to start; ``NotFound`` naming the first missing one."""
        names = list(dict.fromkeys(names))
        if not names:
            return {}
        marks = ",".join("?" * len(names))
        found = dict(self._read(f"SELECT name, value FROM secrets WHERE name IN ({marks})", tuple(names)))
        for name in names:
            if name not in found:
                raise NotFound(f"secret {name!r} does not exist")
        return {name: found[name] for name in names}

    def delete_secret(self, name: str) -> bool:
        """Remove one secret; whether it existed. Functions naming it fail to start until it is back."""
        with self._write() as db:
            return db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 1


# --- file work for materialize, outside the registry's lock --------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bundle(scratch: Path, files: list[BundleFile], target: Path) -> None:
    """Write ``files`` under ``scratch``, make it durable and read-only, then rename it to ``target``."""
    scratch.mkdir(mode=0o700)
    directories = {scratch}
    for item in files:
        path = scratch / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        directories.update(path.parents[: len(Path(item.path).parents) - 1])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
        try:
            view = memoryview(item.content)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o444)
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(directory)
        directory.chmod(0o555)
    os.rename(scratch, target)
    _fsync_dir(target.parent)


def _bundle_matches(target: Path, files: list[BundleFile]) -> bool:
    """Whether ``target`` holds exactly ``files``, byte for byte (by sha256), and nothing else."""
    expected = {f.path: f.sha256 for f in files}
    seen = 0
    for root, dirs, names in os.walk(target):
        if any((Path(root) / d).is_symlink() for d in dirs):
            return False
        for file_name in names:
            path = Path(root) / file_name
            relative = path.relative_to(target).as_posix()
            if relative not in expected or path.is_symlink():
                return False
            if hashlib.sha256(path.read_bytes()).hexdigest() != expected[relative]:
                return False
            seen += 1
    return seen == len(expected)


def _remove_tree(path: Path) -> None:
    """Remove a bundle or a temporary, making its read-only directories writable first."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for root, _dirs, _names in os.walk(path):
        os.chmod(root, 0o700)
    shutil.rmtree(path)
