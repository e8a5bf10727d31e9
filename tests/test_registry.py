"""The function registry on real SQLite files, with real processes killed in the middle of its work."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from capfaas.core.spec import FunctionSpec, Limits, MiB
from capfaas.registry import (
    DB_FILE,
    SCHEMA_VERSION,
    AlreadyExists,
    BundleTooLarge,
    DeploymentRecord,
    InvalidInput,
    NotFound,
    Registry,
    RegistryError,
    check_bundle,
    parse_limits,
)

ROOT = Path(__file__).resolve().parents[1]
HANDLER = b"def handle(event, context):\n    return 'hello'\n"


def code(text: str) -> dict[str, bytes]:
    return {"handler.py": text.encode()}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    with Registry(tmp_path / "state") as reg:
        yield reg


def run_child(script: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


# --- the database file -------------------------------------------------------------------------

def test_database_is_wal_private_and_at_the_schema_version(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Registry(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / DB_FILE).stat().st_mode) == 0o600
    raw = sqlite3.connect(state / DB_FILE)  # an independent look at what is on disk
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"functions", "versions", "files", "secrets"} <= tables
    finally:
        raw.close()


def test_connection_settings(registry: Registry) -> None:
    db = registry._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        reg.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    with Registry(tmp_path) as reg:
        assert reg.current("fn").version == 1


def test_a_file_that_is_not_a_registry_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(RegistryError, match="cannot be opened as a capfaas registry"):
        Registry(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path).close()
    raw = sqlite3.connect(tmp_path / DB_FILE)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RegistryError, match="upgrade capfaas"):
        Registry(tmp_path)


# --- versions and OpenFaaS POST / PUT / DELETE -------------------------------------------------

def test_every_deploy_is_a_new_version(registry: Registry) -> None:
    record = DeploymentRecord("fn")
    infos = [registry.deploy(record, code("v1"), replace=False),
             registry.deploy(record, code("v2"), replace=True),
             registry.deploy(record, code("v3"), replace=True)]
    assert [i.version for i in infos] == [1, 2, 3]
    assert registry.current("fn") == infos[-1]
    for n in (1, 2, 3):
        assert registry.version("fn", n).version == n
        assert registry.files("fn", n) == code(f"v{n}")  # old versions stay for running invocations
    assert registry.version("fn", 4) is None
    assert infos[0].created_at <= infos[1].created_at <= infos[2].created_at
    assert infos[0].created_at.endswith("Z")
    assert {i.function_created_at for i in infos} == {infos[0].created_at}


def test_post_of_a_live_name_is_already_exists(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    with pytest.raises(AlreadyExists, match="PUT"):
        registry.deploy(DeploymentRecord("fn"), code("v2"), replace=False)
    assert registry.current("fn").version == 1
    assert registry.files("fn", 1) == code("v1")


def test_put_of_an_unknown_name_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound, match="POST"):
        registry.deploy(DeploymentRecord("fn"), code("v1"), replace=True)
    assert registry.current("fn") is None
    assert registry.list() == []


def test_delete_then_deploy_again_continues_the_numbering(registry: Registry) -> None:
    first = registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    registry.deploy(DeploymentRecord("fn"), code("v2"), replace=True)
    assert registry.delete("fn") is True
    assert registry.delete("fn") is False
    assert registry.delete("never") is False
    assert registry.current("fn") is None
    assert registry.list() == []
    assert registry.files("fn", 2) == code("v2")  # still there for invocations in flight
    with pytest.raises(NotFound):
        registry.deploy(DeploymentRecord("fn"), code("v3"), replace=True)
    again = registry.deploy(DeploymentRecord("fn"), code("v3"), replace=False)
    assert again.version == 3
    assert registry.files("fn", 3) == code("v3")
    assert again.function_created_at >= first.function_created_at
    assert again.function_created_at == again.created_at


def test_list_shows_current_versions_of_live_functions(registry: Registry) -> None:
    for name in ("b", "a", "c"):
        registry.deploy(DeploymentRecord(name), code(name), replace=False)
    registry.deploy(DeploymentRecord("a", env={"X": "1"}), code("a2"), replace=True)
    registry.delete("c")
    assert [(i.name, i.version) for i in registry.list()] == [("a", 2), ("b", 1)]
    assert registry.list()[0].record.env == {"X": "1"}


def test_record_is_stored_as_given(registry: Registry) -> None:
    record = DeploymentRecord(
        "fn", module="main.py", handler="entry", signature="lambda", env={"A": "1"}, secrets=("db",),
        labels={"com.openfaas.scale.min": "2"}, annotations={"topic": "t"},
        limits={"memory": "128Mi", "cpu": "500m", "timeout": "1m30s"}, network=True,
        extra={"image": "capfaas:upload", "namespace": "openfaas-fn", "constraints": ["x"],
               "requests": {"memory": "64Mi"}, "readOnlyRootFilesystem": True, "envProcess": ""},
    )
    registry.set_secret("db", b"pw", create=True)
    registry.deploy(record, {"main.py": b"x"}, replace=False)
    with Registry(registry.state_dir) as other:
        assert other.current("fn").record == record


def test_concurrent_updates_from_threads_each_get_their_own_version(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    versions: list[int] = []

    def update(i: int) -> None:
        versions.append(registry.deploy(DeploymentRecord("fn"), code(f"t{i}"), replace=True).version)

    threads = [threading.Thread(target=update, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(2, 10))
    assert registry.current("fn").version == 9


def test_a_second_registry_on_the_same_directory_sees_commits_at_once(registry: Registry) -> None:
    with Registry(registry.state_dir) as other:
        registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
        assert other.current("fn").version == 1
        other.deploy(DeploymentRecord("fn"), code("v2"), replace=True)
        assert registry.current("fn").version == 2


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "x" * 64, "fn\0", "é"])
def test_bad_function_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="function name"):
        DeploymentRecord(name)


@pytest.mark.parametrize("fields, reason", [
    ({"module": "sub/handler.py"}, "module"),
    ({"module": "handler.txt"}, "module"),
    ({"handler": "not an identifier"}, "handler"),
    ({"signature": "wsgi"}, "signature"),
    ({"env": {"A": 1}}, "env"),
    ({"env": {"A=B": "1"}}, "environment variable"),
    ({"labels": ["x"]}, "labels"),
    ({"secrets": "db"}, "secrets"),
    ({"secrets": 3}, "secrets"),
    ({"secrets": ["../etc"]}, "secret name"),
    ({"limits": {"memory": "128m"}}, "128Mi"),
    ({"limits": {"memory": -1}}, "memory"),
    ({"limits": {"timeout": "soon"}}, "duration"),
    ({"limits": {"timeout": 0}}, "timeout"),
    ({"limits": {"cpu": "lots"}}, "CPU"),
    ({"limits": {"memroy": "1Gi"}}, "not known"),
    ({"network": "yes"}, "network"),
    ({"extra": {"x": object()}}, "JSON|serializable"),
])
def test_bad_records(fields: dict, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        DeploymentRecord("fn", **fields)


def test_record_json_round_trip() -> None:
    record = DeploymentRecord("fn", env={"A": "b"}, secrets=["s1", "s2", "s1"], limits={"memory": 1 << 20},
                              extra={"image": "i", "constraints": ["c"]})
    assert record.secrets == ("s1", "s2")
    assert DeploymentRecord.from_json(record.to_json()) == record
    with pytest.raises(InvalidInput, match="unknown fields"):
        DeploymentRecord.from_json('{"name": "fn", "colour": "red"}')


def test_limits_as_openfaas_writes_them() -> None:
    assert parse_limits({}) == Limits()
    limits = parse_limits({"memory": "256Mi", "cpu": "100m", "timeout": "1m30s", "tmp": "1.5Mi",
                           "output": 4096, "cpu_seconds": "10", "open_files": 32})
    assert limits == Limits(memory=256 * MiB, timeout=90.0, tmp=1572864, output=4096, cpu_seconds=10,
                            open_files=32)
    assert parse_limits({"memory": "1G", "timeout": "500ms"}) == Limits(memory=10**9, timeout=0.5)
    assert parse_limits({"timeout": 2}).timeout == 2.0
    assert parse_limits({"timeout": "2.5"}).timeout == 2.5


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a/../b", "./a", "a//b", "a/", ".",
                                  "", "a\0b", "a\\b", "x/" * 600 + "y", "\ud800"])
def test_path_tricks_are_refused_and_nothing_is_stored(registry: Registry, path: str) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    with pytest.raises(InvalidInput, match="bundle file path"):
        registry.deploy(DeploymentRecord("fn"), {"handler.py": b"v2", path: b"x"}, replace=True)
    assert registry.current("fn").version == 1


def test_check_bundle_alone_before_staging_files_anywhere() -> None:
    rows = check_bundle({"handler.py": HANDLER, "lib/a.py": b"A"}, "handler.py")
    assert [(r.path, r.sha256) for r in rows] == [("handler.py", hashlib.sha256(HANDLER).hexdigest()),
                                                  ("lib/a.py", hashlib.sha256(b"A").hexdigest())]
    with pytest.raises(InvalidInput, match="climbs out"):
        check_bundle({"handler.py": b"", "../../etc/cron.d/x": b""}, "handler.py")
    with pytest.raises(BundleTooLarge):
        check_bundle({"handler.py": b"xx"}, "handler.py", max_bundle_bytes=1)


def test_a_file_cannot_also_be_a_directory(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="also the directory"):
        registry.deploy(DeploymentRecord("fn"), {"handler.py": b"", "lib": b"", "lib/x.py": b""}, replace=False)


def test_bundle_must_hold_the_module(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="handler.py"):
        registry.deploy(DeploymentRecord("fn"), {"main.py": HANDLER}, replace=False)
    with pytest.raises(InvalidInput, match="handler.py"):
        registry.deploy(DeploymentRecord("fn"), {}, replace=False)


def test_contents_must_be_bytes(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="bytes"):
        registry.deploy(DeploymentRecord("fn"), {"handler.py": "text"}, replace=False)


def test_oversized_bundles_are_refused(registry: Registry) -> None:
    files = {"handler.py": b"x" * 600, "data.bin": b"y" * 500}
    with pytest.raises(BundleTooLarge, match="1000 bytes"):
        registry.deploy(DeploymentRecord("fn"), files, replace=False, max_bundle_bytes=1000)
    with pytest.raises(BundleTooLarge, match="at most 1 "):
        registry.deploy(DeploymentRecord("fn"), files, replace=False, max_files=1)
    assert registry.current("fn") is None
    assert registry.deploy(DeploymentRecord("fn"), files, replace=False, max_bundle_bytes=1100).version == 1


def test_secrets_named_by_a_deployment_must_exist(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="secret 'db' does not exist"):
        registry.deploy(DeploymentRecord("fn", secrets=["db"]), code("v1"), replace=False)
    assert registry.current("fn") is None
    registry.set_secret("db", b"pw", create=True)
    assert registry.deploy(DeploymentRecord("fn", secrets=["db"]), code("v1"), replace=False).version == 1


# --- specs -------------------------------------------------------------------------------------

def test_to_spec(registry: Registry, tmp_path: Path) -> None:
    record = DeploymentRecord("fn", handler="main", signature="functions-framework", env={"A": "1"},
                              limits={"memory": "64Mi", "timeout": 5}, network=True)
    info = registry.deploy(record, code("x"), replace=False)
    spec = info.to_spec(tmp_path, secrets={"db": b"pw"})
    assert spec == FunctionSpec(name="fn", bundle=tmp_path, module="handler.py", handler="main",
                                signature="functions-framework", env={"A": "1"}, secrets={"db": b"pw"},
                                network=True, limits=Limits(memory=64 * MiB, timeout=5.0))
    assert info.to_spec(tmp_path).secrets == {}


# --- bundles on disk ---------------------------------------------------------------------------

def test_materialize_writes_a_read_only_bundle(registry: Registry) -> None:
    files = {"handler.py": HANDLER, "lib/util.py": b"X = 1\n", "lib/data/a.bin": bytes(range(256)), "empty": b""}
    registry.deploy(DeploymentRecord("fn"), files, replace=False)
    bundle = registry.materialize("fn", 1)
    assert bundle == registry.state_dir / "bundles" / "fn" / "1"
    found = {}
    for root, dirs, names in os.walk(bundle):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o555
        for name in names:
            path = Path(root) / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o444
            found[path.relative_to(bundle).as_posix()] = path.read_bytes()
    assert found == files
    assert os.listdir(bundle.parent) == ["1"]  # no temporary left beside it


def test_materialize_is_idempotent_across_registries(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    inode = registry.materialize("fn", 1).stat().st_ino
    assert registry.materialize("fn", 1).stat().st_ino == inode
    with Registry(registry.state_dir) as other:
        assert other.materialize("fn", 1).stat().st_ino == inode  # checked, reused, not rewritten


def test_materialize_replaces_a_damaged_bundle(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), {"handler.py": HANDLER, "lib/a.py": b"A"}, replace=False)
    bundle = registry.materialize("fn", 1)
    (bundle / "lib").chmod(0o755)
    (bundle / "lib" / "a.py").chmod(0o644)
    (bundle / "lib" / "a.py").write_bytes(b"tampered")
    (bundle / "lib" / "extra.py").write_bytes(b"")
    with Registry(registry.state_dir) as other:
        fresh = other.materialize("fn", 1)
    assert (fresh / "lib" / "a.py").read_bytes() == b"A"
    assert not (fresh / "lib" / "extra.py").exists()
    assert stat.S_IMODE((fresh / "lib").stat().st_mode) == 0o555


def test_materialize_removes_what_a_crash_left(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    leftover = registry.state_dir / "bundles" / "fn" / ".tmp-1-99999"
    (leftover / "lib").mkdir(parents=True)
    (leftover / "lib" / "half").write_bytes(b"hal")
    (leftover / "lib").chmod(0o555)
    bundle = registry.materialize("fn", 1)
    assert not leftover.exists()
    assert (bundle / "handler.py").read_bytes() == b"v1"


def test_materialize_of_an_unknown_version(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.materialize("fn", 1)
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    with pytest.raises(NotFound, match="no version 2"):
        registry.materialize("fn", 2)
    with pytest.raises(NotFound):
        registry.files("fn", 2)


def test_materialize_from_threads_at_once(registry: Registry) -> None:
    files = {"handler.py": HANDLER} | {f"d/{i}.bin": os.urandom(4096) for i in range(50)}
    registry.deploy(DeploymentRecord("fn"), files, replace=False)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(registry.materialize("fn", 1))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1
    assert len(os.listdir(results[0] / "d")) == 50


def test_prune_keeps_current_and_in_use_versions(registry: Registry) -> None:
    for n in range(1, 5):
        registry.deploy(DeploymentRecord("fn"), code(f"v{n}"), replace=n > 1)
        registry.materialize("fn", n)
    registry.deploy(DeploymentRecord("gone"), code("g"), replace=False)
    registry.materialize("gone", 1)
    registry.delete("gone")
    assert registry.prune(keep={("fn", 2)}) == [("fn", 1), ("fn", 3), ("gone", 1)]
    assert [n for n in range(1, 5) if registry.version("fn", n)] == [2, 4]
    assert sorted(os.listdir(registry.state_dir / "bundles" / "fn")) == ["2", "4"]
    assert os.listdir(registry.state_dir / "bundles" / "gone") == []
    with pytest.raises(NotFound):
        registry.files("fn", 1)
    assert registry._db.execute("SELECT count(*) FROM files WHERE version IN (1, 3)").fetchone()[0] == 0
    assert registry.prune() == [("fn", 2)]
    assert registry.current("fn").version == 4
    assert registry.deploy(DeploymentRecord("gone"), code("g2"), replace=False).version == 2


def test_prune_removes_bundles_a_crash_left_without_rows(registry: Registry) -> None:
    registry.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
    orphan = registry.state_dir / "bundles" / "fn" / "7"
    orphan.mkdir(parents=True)
    orphan.chmod(0o555)
    assert registry.prune() == []
    assert not orphan.exists()


# --- secrets -----------------------------------------------------------------------------------

def test_secrets_crud(registry: Registry) -> None:
    assert registry.secret_names() == []
    registry.set_secret("db", b"one", create=True)
    registry.set_secret("api-key", b"\x00\xffbinary", create=True)
    with pytest.raises(AlreadyExists):
        registry.set_secret("db", b"two", create=True)
    assert registry.secret_values(["db"]) == {"db": b"one"}
    registry.set_secret("db", b"two", create=False)
    with pytest.raises(NotFound):
        registry.set_secret("absent", b"x", create=False)
    assert registry.secret_names() == ["api-key", "db"]
    assert registry.secret_values(["db", "api-key"]) == {"db": b"two", "api-key": b"\x00\xffbinary"}
    assert registry.secret_values([]) == {}
    with pytest.raises(NotFound, match="'missing'"):
        registry.secret_values(["db", "missing"])
    assert registry.delete_secret("db") is True
    assert registry.delete_secret("db") is False
    assert registry.secret_names() == ["api-key"]
    with Registry(registry.state_dir) as other:
        assert other.secret_values(["api-key"]) == {"api-key": b"\x00\xffbinary"}


@pytest.mark.parametrize("name", ["", "..", "a/b", "x" * 64])
def test_bad_secret_names(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidInput, match="secret name"):
        registry.set_secret(name, b"x", create=True)


def test_secret_values_must_be_bytes_and_bounded(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="bytes"):
        registry.set_secret("s", "text", create=True)
    with pytest.raises(InvalidInput, match="larger"):
        registry.set_secret("s", b"x" * ((1 << 20) + 1), create=True)
    assert registry.secret_names() == []


# --- crashes -----------------------------------------------------------------------------------

STOP_INSIDE_DEPLOY = """
import os, sys, time
from pathlib import Path
from capfaas.registry import DeploymentRecord, Registry

registry = Registry(Path(sys.argv[1]))
inserted = 0

def stop_after_many_files(statement):
    global inserted
    if statement.startswith("INSERT INTO files"):
        inserted += 1
        if inserted == 48:  # 12 MiB into the transaction: far past SQLite's page cache
            print("inside", flush=True)
            time.sleep(600)

registry._db.set_trace_callback(stop_after_many_files)
files = {"handler.py": b"v2"} | {f"data/{i:03}.bin": os.urandom(256 << 10) for i in range(64)}
registry.deploy(DeploymentRecord("fn"), files, replace=True, max_bundle_bytes=1 << 30)
print("committed", flush=True)
"""


def test_kill_in_the_middle_of_a_deploy_serves_the_previous_version(tmp_path: Path) -> None:
    v1 = {"handler.py": HANDLER, "lib/a.py": b"A" * 10000}
    with Registry(tmp_path) as reg:
        reg.deploy(DeploymentRecord("fn", env={"V": "1"}), v1, replace=False)
    wal = tmp_path / (DB_FILE + "-wal")
    child = run_child(STOP_INSIDE_DEPLOY, tmp_path)
    try:
        assert child.stdout.readline() == "inside\n", child.stderr.read()
        half_written = wal.stat().st_size
        kill(child)
    finally:
        if child.poll() is None:
            child.kill()
    assert half_written > 4 << 20  # the half-written deploy really reached the disk
    with Registry(tmp_path) as reg:
        current = reg.current("fn")
        assert (current.version, current.record.env) == (1, {"V": "1"})
        assert reg.files("fn", 1) == v1
        assert reg.version("fn", 2) is None
        assert reg._db.execute("SELECT count(*) FROM files WHERE version = 2").fetchone()[0] == 0
        assert reg._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (reg.materialize("fn", 1) / "lib" / "a.py").read_bytes() == b"A" * 10000
        assert reg.deploy(DeploymentRecord("fn"), code("v2"), replace=True).version == 2


DEPLOY_FOREVER = """
import hashlib, sys
from pathlib import Path
from capfaas.registry import DeploymentRecord, Registry

def bundle(n):
    return {"handler.py": f"version {n}".encode(), "data.bin": hashlib.sha256(str(n).encode()).digest() * 8192}

registry = Registry(Path(sys.argv[1]))
n = registry.current("fn").version if registry.current("fn") else 0
while True:
    n += 1
    registry.deploy(DeploymentRecord("fn", env={"N": str(n)}), bundle(n), replace=n > 1)
    print(n, flush=True)
"""


def expected_bundle(n: int) -> dict[str, bytes]:
    return {"handler.py": f"version {n}".encode(), "data.bin": hashlib.sha256(str(n).encode()).digest() * 8192}


def test_kill_at_random_moments_never_serves_a_half_written_version(tmp_path: Path) -> None:
    rng = random.Random(1234)
    last_acknowledged = 0
    for _ in range(4):
        child = run_child(DEPLOY_FOREVER, tmp_path)
        try:
            for _ in range(3):
                last_acknowledged = int(child.stdout.readline() or child.stderr.read())
            threading.Event().wait(rng.uniform(0, 0.05))
            kill(child)
        finally:
            if child.poll() is None:
                child.kill()
        with Registry(tmp_path) as reg:
            current = reg.current("fn")
            assert current.version >= last_acknowledged
            assert current.record.env == {"N": str(current.version)}
            for n in range(1, current.version + 1):
                assert reg.files("fn", n) == expected_bundle(n)
            assert reg.version("fn", current.version + 1) is None


def test_deploys_survive_an_unclean_exit(tmp_path: Path) -> None:
    script = """
import os, sys
from pathlib import Path
from capfaas.registry import DeploymentRecord, Registry
registry = Registry(Path(sys.argv[1]))
registry.set_secret("db", b"pw", create=True)
registry.deploy(DeploymentRecord("fn", secrets=["db"]), {"handler.py": b"v1"}, replace=False)
registry.deploy(DeploymentRecord("fn", secrets=["db"]), {"handler.py": b"v2"}, replace=True)
os._exit(0)  # no close, no checkpoint: only the WAL holds the commits
"""
    child = run_child(script, tmp_path)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert (tmp_path / (DB_FILE + "-wal")).stat().st_size > 0
    with Registry(tmp_path) as reg:
        assert reg.current("fn").version == 2
        assert reg.files("fn", 1) == {"handler.py": b"v1"}
        assert reg.secret_values(reg.current("fn").record.secrets) == {"db": b"pw"}


def test_deploys_survive_a_clean_close(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        reg.deploy(DeploymentRecord("fn"), code("v1"), replace=False)
        reg.set_secret("s", b"v", create=True)
    with Registry(tmp_path) as reg:
        assert [(i.name, i.version) for i in reg.list()] == [("fn", 1)]
        assert reg.files("fn", 1) == code("v1")
        assert reg.secret_names() == ["s"]


MATERIALIZE = """
import sys
from pathlib import Path
from capfaas.registry import Registry
registry = Registry(Path(sys.argv[1]))
print("start", flush=True)
registry.materialize("fn", 1)
print("done", flush=True)
"""


def test_kill_in_the_middle_of_materialize_leaves_no_half_bundle(tmp_path: Path) -> None:
    files = {"handler.py": HANDLER} | {f"d{i % 7}/{i}.bin": os.urandom(16 << 10) for i in range(300)}
    with Registry(tmp_path) as reg:
        reg.deploy(DeploymentRecord("fn"), files, replace=False)
    parent = tmp_path / "bundles" / "fn"
    bundle = parent / "1"
    interrupted = 0
    for _ in range(3):
        child = run_child(MATERIALIZE, tmp_path)
        try:
            assert child.stdout.readline() == "start\n", child.stderr.read()
            while child.poll() is None and not (parent.is_dir() and any(parent.glob(".tmp-*/d0/*"))):
                pass  # kill it as soon as it is writing files
            if child.poll() is None:
                kill(child)
        finally:
            if child.poll() is None:
                child.kill()
        if bundle.exists():  # the rename won the race with the kill: then the bundle is whole
            assert sum(len(names) for _, _, names in os.walk(bundle)) == len(files)
            break
        interrupted += 1
    assert interrupted >= 1
    with Registry(tmp_path) as reg:
        assert reg.materialize("fn", 1) == bundle
    assert os.listdir(parent) == ["1"]
    found = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert found == files


def test_the_warm_count_is_kept_until_a_delete(tmp_path: Path) -> None:
    with Registry(tmp_path) as registry:
        registry.deploy(DeploymentRecord(name="fn"), {"handler.py": b"def handle(e, c): pass\n"}, replace=False)
        assert registry.warm("fn") is None
        registry.set_warm("fn", 3)
        registry.set_warm("fn", 2)
    with Registry(tmp_path) as registry:
        assert registry.warm("fn") == 2
        with pytest.raises(NotFound):
            registry.set_warm("other", 1)
        registry.delete("fn")
        assert registry.warm("fn") is None
