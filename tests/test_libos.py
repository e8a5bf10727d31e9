"""The library OS on real processes: each test starts a child Python that enters the libOS and
then misbehaves; the parent checks what the child could and could not do.

The child reports through one JSON line on stdout. Nothing is mocked: the mount namespace,
Landlock, seccomp and rlimits are the kernel's, applied to the child for good.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from capfaas.plugins.libos import LibOSPolicy, LibraryOS, Rule, capfaas_libos
from capfaas.plugins.libos.seccomp import (
    AF_INET, AF_UNIX, CLONE_THREAD, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, TIOCSTI,
    confinement_filter, seal_filter,
)
from capfaas.plugins.libos.syscalls import ARCHES, X32_SYSCALL_BIT, current_arch

REPO = Path(__file__).resolve().parents[1]
RESULT = "@@libos-result@@"
ARCH = current_arch()

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the library OS confines Linux processes")


def _landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)))


def _seccomp_filters() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(21, 0, 0, 0, 0) >= 0  # PR_GET_SECCOMP: EINVAL without CONFIG_SECCOMP


def _user_namespaces() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


LANDLOCK_ABI = _landlock_abi() if sys.platform == "linux" else 0
SECCOMP = sys.platform == "linux" and ARCH is not None and _seccomp_filters()
MOUNT_NS = sys.platform == "linux" and (os.geteuid() == 0 or _user_namespaces())
needs_mount_ns = pytest.mark.skipif(not MOUNT_NS, reason="no mount namespace: not root and no user namespaces")
needs_landlock = pytest.mark.skipif(not LANDLOCK_ABI, reason="kernel without Landlock")
needs_seccomp = pytest.mark.skipif(not SECCOMP, reason="kernel without seccomp filters (or unknown architecture)")


def _disallowed_extension() -> str | None:
    """A native extension module installed here that the default allow-list refuses."""
    for name in ("_testcapi", "_curses", "readline", "_posixshmem", "xxlimited", "_testmultiphase"):
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return name
    return None


DISALLOWED_EXTENSION = _disallowed_extension()

PRELUDE = """
import json, os, sys
from capfaas.plugins.libos import LibraryOS, LibOSPolicy
RESULT = {result!r}
results = {{}}

def attempt(name, fn, *args, **kwargs):
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        results[name] = {{"ok": False, "type": type(exc).__name__, "message": str(exc),
                          "errno": getattr(exc, "errno", None)}}
        return None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, (int, float, str, bool, list, dict, type(None))):
        value = repr(value)
    results[name] = {{"ok": True, "value": value}}
    return value

libos = LibraryOS()
"""

PARENT = """
import subprocess, sys
child = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(child.stdout)
sys.stderr.write(child.stderr)
print("parent alive, child exited", child.returncode)
"""


@dataclass
class Outcome:
    results: dict[str, Any]
    proc: subprocess.CompletedProcess[str]

    def __getitem__(self, name: str) -> Any:
        return self.results[name]


@dataclass
class Area:
    """A scratch tree outside /tmp (the cVM's /tmp is private): the bundle and another function's files."""

    root: Path
    bundle: Path
    other_file: Path


@pytest.fixture
def area() -> Iterator[Area]:
    base = "/var/tmp" if os.path.isdir("/var/tmp") else str(Path.home())
    root = Path(tempfile.mkdtemp(prefix="capfaas-libos-", dir=base))
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "data.txt").write_text("bundle data")
    (bundle / "helper.py").write_text("VALUE = 42\n")
    other = root / "other-function"
    other.mkdir()
    (other / "secret.txt").write_text("another function's data")
    yield Area(root, bundle, other / "secret.txt")
    shutil.rmtree(root, ignore_errors=True)


def cvm_command(bundle: Path, body: str, *, before: str = "", allow_fork: bool = False,
                **policy: Any) -> list[str]:
    """The command line of a child that enters the libOS with ``policy`` and runs ``body``."""
    policy = {"bundle_dir": str(bundle), **policy}
    script = "\n".join([
        PRELUDE.format(result=RESULT),
        textwrap.dedent(before),
        "try:\n    enforcement = libos.enter(LibOSPolicy(**%r), allow_fork=%r)\n"
        "except BaseException as exc:\n"
        "    results['enter'] = {'ok': False, 'type': type(exc).__name__, 'message': str(exc)}\n"
        "else:\n"
        "    results['enter'] = {'ok': True, 'applied': sorted(enforcement.applied_names),\n"
        "                        'unavailable': sorted(enforcement.unavailable_names)}\n" % (policy, allow_fork),
        "if results['enter']['ok']:\n" + textwrap.indent(textwrap.dedent(body) or "pass", "    "),
        "print(RESULT + json.dumps(results), flush=True)",
    ])
    return [sys.executable, "-c", script]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra or {})}


def parse(proc: subprocess.CompletedProcess[str]) -> Outcome:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"the child reported nothing (exit {proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return Outcome(json.loads(lines[-1][len(RESULT):]), proc)


def run_cvm(bundle: Path, body: str, *, before: str = "", allow_fork: bool = False, via_parent: bool = False,
            host_env: dict[str, str] | None = None, **policy: Any) -> Outcome:
    """Run ``body`` in a child confined by ``LibOSPolicy(bundle_dir=bundle, **policy)``."""
    cmd = cvm_command(bundle, body, before=before, allow_fork=allow_fork, **policy)
    if via_parent:  # a sacrificial parent in its own session: a failed refusal kills it, not pytest
        cmd = [sys.executable, "-c", PARENT, *cmd]
    proc = subprocess.run(cmd, env=child_env(host_env), capture_output=True, text=True, timeout=60,
                          start_new_session=via_parent)
    return parse(proc)


def assert_denied(result: dict[str, Any], rule: Rule) -> None:
    assert result["ok"] is False, f"expected a refusal, got {result}"
    assert result["type"] == "PermissionError", result
    assert result["message"].startswith("capfaas libOS: "), result
    assert result["message"].endswith(f"(rule: {rule.value})"), result


def assert_refused_by_os(result: dict[str, Any], *errnos: int) -> None:
    """Refused below the audit layer: a plain OSError from the kernel, not the libOS's message."""
    assert result["ok"] is False, f"expected a refusal, got {result}"
    assert "capfaas libOS" not in result["message"], result
    assert result["errno"] in errnos, result


# -- the record of what was enforced ---------------------------------------------------------------


def test_enforcement_lists_every_layer_the_kernel_offers(area: Area) -> None:
    out = run_cvm(area.bundle, """
        attempt("enter_again", libos.enter, LibOSPolicy(bundle_dir="."))
        results["describe"] = enforcement.describe()
    """)
    applied, unavailable = set(out["enter"]["applied"]), set(out["enter"]["unavailable"])
    expected = {"no-new-privs", "capabilities", "rlimits", "environment", "audit-hook"}
    expected |= {"mount-namespace"} if MOUNT_NS else set()
    expected |= {"landlock"} if LANDLOCK_ABI else set()
    expected |= {"seccomp"} if SECCOMP else set()
    assert expected <= applied
    assert not applied & unavailable
    if MOUNT_NS and SECCOMP and LANDLOCK_ABI >= 6 and os.geteuid() == 0:
        assert unavailable == set()
    assert out["enter_again"]["type"] == "RuntimeError"
    assert "applied landlock" in out["describe"] or "unavailable landlock" in out["describe"]


def test_enter_refuses_a_process_that_already_runs_threads(area: Area) -> None:
    out = run_cvm(area.bundle, "", before="""
        import threading, time
        threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
    """)
    assert out["enter"]["ok"] is False
    assert out["enter"]["type"] == "RuntimeError" and "threads" in out["enter"]["message"]


def test_plugin_hook_returns_a_library_os() -> None:
    assert isinstance(capfaas_libos(), LibraryOS)


# -- files -------------------------------------------------------------------------------------------


def test_bundle_is_readable_and_importable_but_not_writable(area: Area) -> None:
    out = run_cvm(area.bundle, """
        attempt("read", lambda: open("data.txt").read())
        attempt("import", lambda: __import__("helper").VALUE)
        attempt("append", lambda: open("data.txt", "a"))
        attempt("create", lambda: open("new.txt", "w"))
        attempt("mkdir", os.mkdir, "sub")
        attempt("remove", os.remove, "data.txt")
        attempt("os_open", os.open, os.path.abspath("data.txt"), os.O_WRONLY)
    """)
    assert out["read"] == {"ok": True, "value": "bundle data"}
    assert out["import"] == {"ok": True, "value": 42}
    for name in ("append", "create", "mkdir", "remove", "os_open"):
        assert_denied(out[name], Rule.READ_ONLY)
    assert (area.bundle / "data.txt").read_text() == "bundle data"


@needs_mount_ns
def test_bundle_kept_in_the_host_tmp_stays_visible_and_read_only(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "data.txt").write_text("under host /tmp")
    out = run_cvm(bundle, """
        attempt("read", lambda: open("data.txt").read())
        attempt("write", lambda: open("data.txt", "w"))
        attempt("tmp", lambda: open("/tmp/scratch", "w").write("ok"))
    """)
    assert out["read"] == {"ok": True, "value": "under host /tmp"}
    assert_denied(out["write"], Rule.READ_ONLY)
    assert out["tmp"] == {"ok": True, "value": 2}


@needs_mount_ns
def test_tmp_trees_can_be_removed_through_directory_descriptors(area: Area) -> None:
    out = run_cvm(area.bundle, """
        import shutil
        os.makedirs("/tmp/tree/a/b")
        open("/tmp/tree/a/b/f", "w").close()
        attempt("rmtree", shutil.rmtree, "/tmp/tree")
        results["gone"] = not os.path.exists("/tmp/tree")
        bundle = os.open(".", os.O_RDONLY)
        attempt("unlink_in_bundle", os.unlink, "data.txt", dir_fd=bundle)
    """)
    assert out["rmtree"]["ok"] is True and out["gone"] is True  # shutil uses dir_fd-relative calls
    assert_denied(out["unlink_in_bundle"], Rule.READ_ONLY)


@needs_mount_ns
def test_tmp_is_writable_and_private_to_each_cvm(area: Area) -> None:
    tag = uuid.uuid4().hex
    host_file = Path("/tmp") / f"capfaas-host-{tag}"
    host_file.write_text("host")
    try:
        first = subprocess.Popen(cvm_command(area.bundle, f"""
            attempt("write", lambda: open("/tmp/cvm-{tag}", "w").write("mine"))
            results["sees_host_file"] = os.path.exists({str(host_file)!r})
            print("ready", flush=True)
            sys.stdin.read()
            attempt("still_there", lambda: open("/tmp/cvm-{tag}").read())
        """), env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.stdout is not None and first.stdin is not None
        assert first.stdout.readline().strip() == "ready"
        second = run_cvm(area.bundle, f"""
            results["sees_first"] = os.path.exists("/tmp/cvm-{tag}")
            results["sees_host_file"] = os.path.exists({str(host_file)!r})
            attempt("write", lambda: open("/tmp/cvm-{tag}", "w").write("other"))
        """)
        host_sees_cvm_file = os.path.exists(f"/tmp/cvm-{tag}")
        stdout, stderr = first.communicate("", timeout=30)
        first_out = parse(subprocess.CompletedProcess(first.args, first.returncode, stdout, stderr))
    finally:
        host_file.unlink()
    assert first_out["write"] == {"ok": True, "value": 4}
    assert first_out["still_there"] == {"ok": True, "value": "mine"}  # the second cVM's write went elsewhere
    assert first_out["sees_host_file"] is False and second["sees_host_file"] is False
    assert second["sees_first"] is False
    assert second["write"]["ok"] is True
    assert not host_sees_cvm_file


@needs_mount_ns
def test_tmp_is_bounded_by_its_quota(area: Area) -> None:
    out = run_cvm(area.bundle, """
        def fill():
            chunk = b"x" * (256 << 10)
            for i in range(16):
                with open(f"/tmp/fill{i}", "wb") as f:
                    f.write(chunk)
        attempt("fill", fill)
    """, tmp_quota=1 << 20)
    assert out["fill"]["ok"] is False
    assert out["fill"]["errno"] == errno.ENOSPC


def test_host_files_and_other_functions_files_are_denied(area: Area) -> None:
    out = run_cvm(area.bundle, f"""
        for path in ("/etc/passwd", "/proc/self/mem", "/proc/self/maps", {str(area.other_file)!r}):
            attempt(path, lambda: open(path, "rb").read())
        attempt("listdir", os.listdir, "/etc")
        attempt("other_dir", os.listdir, {str(area.other_file.parent)!r})
        attempt("relative_escape", lambda: open("../other-function/secret.txt").read())
    """)
    for name in ("/etc/passwd", "/proc/self/mem", "/proc/self/maps", str(area.other_file), "listdir",
                 "other_dir", "relative_escape"):
        assert_denied(out[name], Rule.HOST_FILES)
    assert "opening '/etc/passwd' for reading is denied" in out["/etc/passwd"]["message"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full to stand in for a CAP_File device")
def test_devices_the_policy_names_open_read_write_and_no_others(area: Area) -> None:
    body = """
        attempt("write", lambda: open("/dev/full", "wb", buffering=0).write(b"x"))
        attempt("read", lambda: open("/dev/full", "rb").read(4))
        attempt("other", lambda: open("/dev/tty", "r+b"))
    """
    granted = run_cvm(area.bundle, body, extra_devices=("/dev/full",))
    assert granted["write"]["type"] == "OSError" and granted["write"]["errno"] == errno.ENOSPC  # the device itself
    assert granted["read"] == {"ok": True, "value": "\x00\x00\x00\x00"}
    assert_denied(granted["other"], Rule.HOST_FILES)
    assert_denied(run_cvm(area.bundle, body)["write"], Rule.HOST_FILES)
    with pytest.raises(ValueError, match="not a character device"):
        LibOSPolicy(bundle_dir=str(area.bundle), extra_devices=(str(area.other_file),))


# -- processes and signals ---------------------------------------------------------------------------


def test_processes_cannot_be_started(area: Area) -> None:
    out = run_cvm(area.bundle, """
        import subprocess
        attempt("subprocess", subprocess.run, ["/bin/true"])
        attempt("system", os.system, "true")
        attempt("popen", os.popen, "true")
        attempt("execv", os.execv, "/bin/true", ["true"])
        attempt("posix_spawn", os.posix_spawn, "/bin/true", ["true"], {})
        attempt("fork", os.fork)
    """)
    for name in ("subprocess", "system", "popen", "execv", "posix_spawn"):
        assert_denied(out[name], Rule.PROCESSES)
    assert_denied(out["fork"], Rule.FORK)


def test_signals_reach_only_the_cvm_itself_and_the_parent_survives(area: Area) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = run_cvm(area.bundle, f"""
            import signal
            attempt("kill_parent", os.kill, os.getppid(), signal.SIGKILL)
            attempt("kill_other", os.kill, {victim.pid}, signal.SIGKILL)
            attempt("killpg", os.killpg, os.getpgid(0), signal.SIGKILL)
            attempt("self", os.kill, os.getpid(), 0)
        """, via_parent=True)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    assert "parent alive" in out.proc.stdout
    for name in ("kill_parent", "kill_other", "killpg"):
        assert_denied(out[name], Rule.SIGNALS)
    assert out["self"]["ok"] is True


# -- network ---------------------------------------------------------------------------------------


def test_sockets_are_denied_without_network_but_asyncio_still_works(area: Area) -> None:
    out = run_cvm(area.bundle, """
        import asyncio, socket
        attempt("socket", socket.socket)
        attempt("unix", socket.socket, socket.AF_UNIX)
        attempt("connect", socket.create_connection, ("127.0.0.1", 9), 1)
        attempt("resolve", socket.getaddrinfo, "localhost", 80)
        attempt("socketpair", lambda: len(socket.socketpair()))
        async def main():
            await asyncio.sleep(0)
            return "async ok"
        attempt("asyncio", asyncio.run, main())
    """)
    for name in ("socket", "unix", "connect", "resolve"):
        assert_denied(out[name], Rule.NETWORK)
    assert out["socketpair"] == {"ok": True, "value": 2}
    assert out["asyncio"] == {"ok": True, "value": "async ok"}


def test_sockets_work_when_the_function_is_granted_the_network(area: Area) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        out = run_cvm(area.bundle, f"""
            import socket
            def talk():
                with socket.create_connection(("127.0.0.1", {port}), 5) as s:
                    s.sendall(b"hello from a cVM")
                return "sent"
            attempt("connect", talk)
            attempt("bind", lambda: socket.create_server(("127.0.0.1", 0)).getsockname()[1] > 0)
            attempt("unix", socket.socket, socket.AF_UNIX)
        """, allow_network=True)
        server.settimeout(5)
        conn, _ = server.accept()
        with conn:
            received = conn.recv(100)
    assert out["connect"] == {"ok": True, "value": "sent"}
    assert received == b"hello from a cVM"
    assert out["bind"] == {"ok": True, "value": True}
    assert_denied(out["unix"], Rule.SOCKET_FAMILIES)


# -- raw memory and native code ----------------------------------------------------------------------


def test_ctypes_cffi_and_mmap_are_denied_even_if_imported_before(area: Area) -> None:
    out = run_cvm(area.bundle, """
        for name in ("ctypes", "_ctypes", "ctypes.util", "mmap", "cffi", "_cffi_backend"):
            attempt(name, __import__, name)
        attempt("saved_mmap", saved_mmap.mmap, -1, 4096)
        results["cached"] = sorted(n for n in sys.modules if n in ("ctypes", "_ctypes", "mmap"))
    """, before="""
        import ctypes, mmap as saved_mmap
    """)
    for name in ("ctypes", "_ctypes", "ctypes.util", "mmap", "cffi", "_cffi_backend", "saved_mmap"):
        assert_denied(out[name], Rule.RAW_MEMORY)
    assert out["cached"] == []


def test_native_extensions_outside_the_allow_list_are_denied(area: Area) -> None:
    if DISALLOWED_EXTENSION is None:
        pytest.skip("no native extension outside the allow-list is installed to try")
    out = run_cvm(area.bundle, f"""
        import importlib.machinery, _imp
        attempt("json", lambda: __import__("json").dumps({{"a": [1, 2]}}))
        attempt("math", lambda: __import__("math").sqrt(16.0))
        attempt("zlib", lambda: len(__import__("zlib").decompress(__import__("zlib").compress(b"x" * 100))))
        attempt("bz2", lambda: len(__import__("bz2").compress(b"x")) > 0)
        attempt("disallowed", __import__, {DISALLOWED_EXTENSION!r})
        spec = importlib.machinery.PathFinder.find_spec({DISALLOWED_EXTENSION!r})
        attempt("create_dynamic", _imp.create_dynamic, spec)
    """)
    assert out["json"] == {"ok": True, "value": '{"a": [1, 2]}'}
    assert out["math"] == {"ok": True, "value": 4.0}
    assert out["zlib"] == {"ok": True, "value": 100}  # loaded after enter(): libz found
    assert out["bz2"] == {"ok": True, "value": True}
    assert_denied(out["disallowed"], Rule.NATIVE_EXTENSIONS)
    assert_denied(out["create_dynamic"], Rule.NATIVE_EXTENSIONS)
    assert f"loading native extension {DISALLOWED_EXTENSION!r}" in out["disallowed"]["message"]


def test_the_allow_list_is_the_policys(area: Area) -> None:
    out = run_cvm(area.bundle, """
        attempt("math", lambda: __import__("math").floor(2.5))
        attempt("_csv", __import__, "_csv")
    """, allowed_extensions=frozenset({"math"}))
    assert out["math"] == {"ok": True, "value": 2}
    assert_denied(out["_csv"], Rule.NATIVE_EXTENSIONS)


def test_audit_hook_cannot_be_added_to_or_patched(area: Area) -> None:
    out = run_cvm(area.bundle, """
        from capfaas.plugins.libos.audit import AuditGuard
        seen = []
        attempt("add", sys.addaudithook, lambda event, args: seen.append(event))
        open("data.txt").close()
        results["added_hook_ran"] = bool(seen)
        attempt("patch_code", setattr, AuditGuard.hook, "__code__", (lambda self, event, args: None).__code__)
        attempt("patch_class", setattr, AuditGuard, "hook", lambda self, event, args: None)
        attempt("after_patch", lambda: open("/etc/passwd").read())
        class Lenient:
            def hook(self, event, args):
                pass
        guard = next(o for o in __import__("gc").get_objects() if type(o) is AuditGuard)
        attempt("swap_class", setattr, guard, "__class__", Lenient)
    """)
    assert out["added_hook_ran"] is False  # refused (CPython swallows the refusal: no exception)
    assert out["patch_class"]["ok"] is True  # allowed, and useless: the hook is a bound method
    assert_denied(out["after_patch"], Rule.HOST_FILES)
    assert_denied(out["patch_code"], Rule.AUDIT_HOOKS)
    assert_denied(out["swap_class"], Rule.AUDIT_HOOKS)


# -- environment, secrets, memory, output ---------------------------------------------------------


@needs_mount_ns
def test_environment_is_replaced_and_secrets_are_read_only_files(area: Area) -> None:
    out = run_cvm(area.bundle, """
        results["environ"] = dict(os.environ)
        secret = "/var/openfaas/secrets/api-key"
        attempt("read", lambda: open(secret, "rb").read())
        attempt("mode", lambda: oct(os.stat(secret).st_mode & 0o777))
        attempt("write", lambda: open(secret, "wb"))
        attempt("create", lambda: open("/var/openfaas/secrets/new", "w"))
        attempt("chmod", os.chmod, secret, 0o666)
    """, host_env={"CAPFAAS_ADMIN_PASSWORD": "hunter2"}, env={"GREETING": "hi"}, secrets={"api-key": b"s3cret"})
    environ = out["environ"]
    assert "CAPFAAS_ADMIN_PASSWORD" not in environ and "PYTHONPATH" not in environ
    assert environ == {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "GREETING": "hi"}
    assert out["read"] == {"ok": True, "value": "s3cret"}
    assert out["mode"] == {"ok": True, "value": "0o400"}
    for name in ("write", "create", "chmod"):
        assert_denied(out[name], Rule.READ_ONLY)
    assert not Path("/var/openfaas/secrets/api-key").exists()  # never written to the host


def test_memory_limit_raises_memory_error_in_the_cvm_only(area: Area) -> None:
    out = run_cvm(area.bundle, """
        attempt("huge", lambda: len(bytearray(1 << 30)))
        attempt("small", lambda: len(bytearray(1 << 20)))
    """, memory_limit=256 << 20)
    assert out["huge"]["ok"] is False and out["huge"]["type"] == "MemoryError"
    assert out["small"] == {"ok": True, "value": 1 << 20}
    assert out.proc.returncode == 0


BYPASS_SETUP = """
import ctypes, gc, socket, _posixsubprocess
libc = ctypes.CDLL(None)
raw_syscall = libc.syscall  # resolved before enter(): calling it raises no audit event
raw_syscall.restype = ctypes.c_long
"""

FIND_GUARD = """
guard = next(o for o in gc.get_objects() if type(o).__name__ == "AuditGuard")
"""
DISABLE_AUDIT = FIND_GUARD + """
guard.handlers.clear()  # what code walking interpreter objects can do to the audit layer
"""


@needs_seccomp
@needs_landlock
def test_os_layers_refuse_when_the_audit_hook_is_bypassed(area: Area) -> None:
    assert ARCH is not None
    nr = ARCH.numbers
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = run_cvm(area.bundle, DISABLE_AUDIT + textwrap.dedent(f"""
        attempt("passwd", lambda: open("/etc/passwd").read())
        attempt("other", lambda: open({str(area.other_file)!r}).read())
        attempt("root_listing", os.listdir, "/")
        attempt("bundle_write", lambda: open("data.txt", "a"))
        r, w = os.pipe()
        attempt("fork_exec", _posixsubprocess.fork_exec, [b"/bin/true"], [b"/bin/true"], True, (), None, None,
                -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, True)
        attempt("fork", os.fork)
        attempt("socket", socket.socket)
        attempt("kill", os.kill, {victim.pid}, 9)
        results["raw_kill"] = raw_syscall({nr["kill"]}, {victim.pid}, 9)
        results["raw_unshare"] = raw_syscall({nr["unshare"]}, 0x20000)
        results["raw_execve"] = raw_syscall({nr["execve"]}, b"/bin/true", None, None)
        results["raw_ptrace"] = raw_syscall({nr["ptrace"]}, 16, {victim.pid}, 0, 0)  # PTRACE_ATTACH
        """), before=BYPASS_SETUP, via_parent=True)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    not_found = (errno.ENOENT,) if MOUNT_NS else (errno.EACCES,)
    assert_refused_by_os(out["passwd"], *not_found)  # gone from the private root (Landlock without it)
    assert_refused_by_os(out["other"], *not_found)
    assert_refused_by_os(out["root_listing"], errno.EACCES)  # Landlock
    assert_refused_by_os(out["bundle_write"], errno.EROFS, errno.EACCES)
    for name in ("fork_exec", "fork", "socket", "kill"):
        assert_refused_by_os(out[name], errno.EPERM)  # seccomp (and Landlock's signal scope)
    for name in ("raw_kill", "raw_unshare", "raw_execve", "raw_ptrace"):
        assert out[name] == -1, name
    assert "parent alive" in out.proc.stdout


@needs_seccomp
def test_a_template_forks_and_its_sealed_children_cannot(area: Area) -> None:
    out = run_cvm(area.bundle, FIND_GUARD + textwrap.dedent("""
        import signal
        attempt("template_code_forks", os.fork)  # function code in a template: the audit rule holds
        r, w = os.pipe()
        pid = libos.fork()  # the template forks a cVM
        if pid == 0:
            results.clear()
            mapped = []
            libos.seal(lambda: mapped.append(len(saved_mmap.mmap(-1, 4096))))  # the runtime maps its region
            results["mapped_in_prepare"] = mapped
            attempt("mmap_after_seal", saved_mmap.mmap, -1, 4096)
            attempt("fork", os.fork)
            attempt("kill_template", os.kill, os.getppid(), signal.SIGKILL)
            guard.handlers.clear()
            attempt("fork_no_audit", os.fork)
            attempt("kill_template_no_audit", os.kill, os.getppid(), signal.SIGKILL)
            attempt("self", os.kill, os.getpid(), 0)
            os.write(w, json.dumps(results).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        results["child"] = json.loads(os.read(r, 1 << 16))
        results["child_status"] = status
    """), before="import gc, mmap as saved_mmap", allow_fork=True)
    assert_denied(out["template_code_forks"], Rule.FORK)
    child = out["child"]
    assert out["child_status"] == 0
    assert child["mapped_in_prepare"] == [4096]
    assert_denied(child["mmap_after_seal"], Rule.RAW_MEMORY)
    assert_denied(child["fork"], Rule.FORK)
    assert_denied(child["kill_template"], Rule.SIGNALS)
    assert_refused_by_os(child["fork_no_audit"], errno.EPERM)
    assert_refused_by_os(child["kill_template_no_audit"], errno.EPERM)
    if LANDLOCK_ABI >= 6:  # otherwise the template's filter pins signals to the template's pid
        assert child["self"]["ok"] is True


# -- the seccomp programs themselves, run by a small BPF interpreter --------------------------------


def run_bpf(program: bytes, nr: int, arch: int, *args: int) -> int:
    """Evaluate a classic-BPF seccomp program on one system call, as the kernel would."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif op == 0x15:  # jeq #k
            pc += 1 + (jt if acc == k else jf)
        elif op == 0x45:  # jset #k
            pc += 1 + (jt if acc & k else jf)
        elif op == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {op:#x}")


EPERM_RET = SECCOMP_RET_ERRNO | errno.EPERM


@pytest.mark.parametrize("arch_name", ["x86_64", "aarch64"])
def test_confinement_filter_decisions(arch_name: str) -> None:
    arch = ARCHES[arch_name]
    nr = arch.numbers
    pid = 4242
    prog = confinement_filter(arch, pid, allow_fork=False, allow_network=False, restrict_signals=True)
    run = lambda name, *args: run_bpf(prog, nr[name], arch.audit_arch, *args)  # noqa: E731
    other_arch = next(a for a in ARCHES.values() if a.audit_arch != arch.audit_arch)
    assert run_bpf(prog, nr["clone"], other_arch.audit_arch) == SECCOMP_RET_KILL_PROCESS
    assert run("clone", CLONE_THREAD | 0x100 | 0x800) == SECCOMP_RET_ALLOW  # a thread
    assert run("clone", 0x11) == EPERM_RET  # fork through clone (SIGCHLD)
    assert run("clone", CLONE_THREAD | 0x10000000) == EPERM_RET  # a thread in a new user namespace
    assert run("clone3") == SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run("execve") == EPERM_RET and run("ptrace") == EPERM_RET and run("io_uring_setup") == EPERM_RET
    assert run("kill", pid, 9) == SECCOMP_RET_ALLOW
    assert run("kill", pid + 1, 9) == EPERM_RET and run("kill", 0, 9) == EPERM_RET
    assert run("kill", (-1) & 0xFFFFFFFFFFFFFFFF, 9) == EPERM_RET
    assert run("tgkill", pid, pid + 7, 10) == SECCOMP_RET_ALLOW
    assert run("socket", AF_INET) == EPERM_RET and run("socket", AF_UNIX) == EPERM_RET
    assert run("socketpair", AF_UNIX) == SECCOMP_RET_ALLOW and run("socketpair", AF_INET) == EPERM_RET
    assert run("ioctl", 1, TIOCSTI) == EPERM_RET and run("ioctl", 1, 0x5401) == SECCOMP_RET_ALLOW  # TCGETS
    assert run("prlimit64", 0) == SECCOMP_RET_ALLOW and run("prlimit64", 1) == EPERM_RET
    assert run("setpriority", 0, 0) == SECCOMP_RET_ALLOW and run("setpriority", 2, 0) == EPERM_RET  # PRIO_USER
    if "fork" in nr:
        assert run("fork") == EPERM_RET and run("vfork") == EPERM_RET
    if arch.has_x32:
        assert run_bpf(prog, nr["socket"] | X32_SYSCALL_BIT, arch.audit_arch, AF_INET) == EPERM_RET
    networked = confinement_filter(arch, pid, allow_fork=False, allow_network=True, restrict_signals=True)
    assert run_bpf(networked, nr["socket"], arch.audit_arch, AF_INET) == SECCOMP_RET_ALLOW
    assert run_bpf(networked, nr["socket"], arch.audit_arch, AF_UNIX) == EPERM_RET


@pytest.mark.parametrize("arch_name", ["x86_64", "aarch64"])
def test_template_and_seal_filters(arch_name: str) -> None:
    arch = ARCHES[arch_name]
    nr = arch.numbers
    template = confinement_filter(arch, 100, allow_fork=True, allow_network=False, restrict_signals=False)
    assert run_bpf(template, nr["clone"], arch.audit_arch, 0x11) == SECCOMP_RET_ALLOW
    assert run_bpf(template, nr["clone"], arch.audit_arch, 0x11 | 0x20000) == EPERM_RET  # CLONE_NEWNS
    assert run_bpf(template, nr["kill"], arch.audit_arch, 200, 9) == SECCOMP_RET_ALLOW
    sealed = seal_filter(arch, 200)
    assert len(sealed) == len(seal_filter(arch, 0))  # seal() fills a slot prepared before the fork
    assert run_bpf(sealed, nr["clone"], arch.audit_arch, 0x11) == EPERM_RET
    assert run_bpf(sealed, nr["clone"], arch.audit_arch, CLONE_THREAD) == SECCOMP_RET_ALLOW
    assert run_bpf(sealed, nr["kill"], arch.audit_arch, 200, 9) == SECCOMP_RET_ALLOW
    assert run_bpf(sealed, nr["kill"], arch.audit_arch, 100, 9) == EPERM_RET
