"""The Morello backend's supervisor against a stand-in monitor that behaves as Intravisor does.

Everything here runs for real: the backend writes the YAML, starts ``tests/fake_intravisor.py``
as the monitor, which parses it with Intravisor's rules, prints its noise and runs the real agent,
which connects back, authenticates and serves through the real runtime. Only the host facts are
injected (this is not a Morello board). What the stand-in cannot show is listed in docs/morello.md.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from capfaas.backends.morello.backend import MorelloBackend
from capfaas.backends.morello.config import MorelloConfig
from capfaas.core.backend import BackendError
from capfaas.core.cvm import State
from capfaas.core.intravisor import CVMStartError, FunctionLoadError, Intravisor, Invocation
from capfaas.core.spec import declared_files
from capfaas.plugin_manager import make_plugin_manager

from .morello_support import MORELLO_PURECAP, Board, make_board, processes_under

GiB = 1 << 30

ECHO = """
import sys

def handle(event, context):
    print("out:", event.text[:10])
    print("err:", len(event.body), file=sys.stderr)
    if event.text == "big":
        return b"r" * 300_000
    return "got %d bytes" % len(event.body)
"""


@pytest.fixture
def board() -> Iterator[Board]:
    """Outside /tmp, like the emulated tests: the library OS gives each cVM a private /tmp."""
    root = Path(tempfile.mkdtemp(prefix="capfaas-morello-", dir="/var/tmp"))
    yield make_board(root)
    shutil.rmtree(root, ignore_errors=True)


async def open_intravisor(config: MorelloConfig) -> Intravisor:
    iv = Intravisor(MorelloBackend(config, MORELLO_PURECAP), make_plugin_manager(autoload=False),
                    segment_size=16 * GiB, region_size=GiB)
    await iv.start()
    return iv


@pytest.fixture
async def intravisor(board: Board) -> AsyncIterator[Intravisor]:
    iv = await open_intravisor(board.config)
    yield iv
    await iv.close()


async def test_a_function_runs_through_the_monitor(intravisor: Intravisor, board: Board) -> None:
    cvm = await intravisor.create(board.function("echo", ECHO))
    result = await intravisor.invoke(cvm, Invocation(body=b"hello"))
    assert (result.status, result.outcome, bytes(result.body)) == (200, "ok", b"got 5 bytes")
    assert (result.stdout, result.stderr) == (b"out: hello\n", b"err: 5\n")
    # larger than the inline limit: staged as a capability by core, sent inline by the backend
    big = await intravisor.invoke(cvm, Invocation(body=b"b" * 200_000))
    assert bytes(big.body) == b"got 200000 bytes" and big.stdout == b"out: bbbbbbbbbb\n"
    # a large result: the agent inlines what the runtime shares in its region
    result = await intravisor.invoke(cvm, Invocation(body=b"big"))
    assert (result.status, len(result.body), result.stderr) == (200, 300_000, b"err: 3\n")
    log = (cvm.process.monitor.run_dir / "monitor.log").read_text()  # type: ignore[attr-defined]
    assert "ALL cVMs loaded" in log and "[capfaas agent] connected" in log and "out: hello" not in log


async def test_output_is_never_mixed_with_monitor_noise(intravisor: Intravisor, board: Board) -> None:
    spec = board.function("noisy", """
        import os
        def handle(event, context):
            os.write(1, b"raw fd write\\n")
            print("[    0.000000] looks like a kernel line")
            return "ok"
    """)
    cvm = await intravisor.create(spec)
    for _ in range(3):
        result = await intravisor.invoke(cvm, Invocation())
        assert result.stdout == b"raw fd write\n[    0.000000] looks like a kernel line\n"
        assert b"Deploy" not in result.stdout + result.stderr and b"LKL" not in result.stdout + result.stderr


async def test_invocation_timeout_kills_the_monitor(intravisor: Intravisor, board: Board) -> None:
    spec = board.function("sleepy", "import time\ndef handle(event, context):\n    time.sleep(30)\n", timeout=1.0)
    cvm = await intravisor.create(spec)
    pid = cvm.process.pid
    started = time.monotonic()
    result = await intravisor.invoke(cvm, Invocation())
    assert result.outcome == "timeout" and result.status == 504
    assert time.monotonic() - started < 5
    assert cvm.state is State.STOPPED and "killed by SIGKILL" in cvm.stop_reason
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_function_that_fails_to_load_says_where(intravisor: Intravisor, board: Board) -> None:
    spec = board.function("broken", "def handle(event, context):\n    return 1 +\n")
    with pytest.raises(FunctionLoadError) as caught:
        await intravisor.create(spec)
    assert caught.value.error["type"] == "SyntaxError" and caught.value.error["line"] == 2
    assert not processes_under(board.root)


async def test_the_library_os_rules_apply_inside(intravisor: Intravisor, board: Board) -> None:
    spec = board.function("snoop", """
        def handle(event, context):
            try:
                open("/etc/passwd").read()
            except PermissionError as exc:
                return "refused: " + str(exc)
            return "read it"
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    assert bytes(result.body).startswith(b"refused: ")


async def test_a_hanging_monitor_is_killed_at_the_start_timeout(board: Board) -> None:
    config = board.with_mode("hang", start_timeout=1.5, start_attempts=1)
    iv = await open_intravisor(config)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"nothing connected within 1\.5 s \(start_timeout\); the agent never started"):
            await iv.create(board.function("echo", ECHO))
        assert time.monotonic() - started < 6
        assert not processes_under(board.root)
    finally:
        await iv.close()


async def test_a_spinning_monitor_is_killed_on_its_error_line(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("spin", start_timeout=30.0))
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"2 attempts.*gave up: 'Introvisor: unknown t5 1234'"):
            await iv.create(board.function("echo", ECHO))
        assert time.monotonic() - started < 10  # not the 30 s start timeout
        assert iv.backend.starts == 2  # type: ignore[attr-defined]
        assert not processes_under(board.root)
    finally:
        await iv.close()


async def test_a_dying_monitor_is_restarted(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("die-once"))
    try:
        cvm = await iv.create(board.function("echo", ECHO))
        assert iv.backend.starts == 2  # type: ignore[attr-defined]
        result = await iv.invoke(cvm, Invocation(body=b"after a restart"))
        assert bytes(result.body) == b"got 15 bytes"
    finally:
        await iv.close()


async def test_a_monitor_that_always_dies_is_reported(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("die"))
    try:
        with pytest.raises(BackendError, match=r"did not start \(2 attempts\): the monitor exited with status 139;"
                                               r" the agent never started; last monitor output: .*Segmentation"):
            await iv.create(board.function("echo", ECHO))
    finally:
        await iv.close()


async def test_a_monitor_crash_mid_service_is_a_crash_and_the_next_cvm_starts(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("crash"))
    try:
        spec = board.function("echo", ECHO)
        cvm = await iv.create(spec)
        (board.root / "starts-crash.crash").touch()  # the stand-in crashes when this appears
        await asyncio.wait_for(cvm.process.monitor.exited, 10)  # type: ignore[attr-defined]
        (board.root / "starts-crash.crash").unlink()
        result = await iv.invoke(cvm, Invocation(body=b"x"))
        assert result.outcome == "crashed" and "killed by SIGSEGV" in result.error["message"]
        replacement = await iv.create(spec)  # what the pool does next: a fresh monitor
        assert replacement.state is State.READY
    finally:
        await iv.close()


async def test_a_monitor_spinning_after_its_program_ended_is_killed(board: Board) -> None:
    """The agent ends while its cVM is idle (core is not reading); the monitor then spins."""
    iv = await open_intravisor(board.with_mode("spin-after-exit"))
    try:
        spec = board.function("quitter", """
            import os, threading
            def handle(event, context):
                threading.Timer(0.2, os._exit, (0,)).start()
                return "bye"
        """)
        cvm = await iv.create(spec)
        assert bytes((await iv.invoke(cvm, Invocation())).body) == b"bye"
        monitor = cvm.process.monitor  # type: ignore[attr-defined]
        started = time.monotonic()
        how = await asyncio.wait_for(monitor.wait(), 10)
        assert "killed by SIGKILL" in how and "spins instead of exiting" in how
        assert time.monotonic() - started < 5
        result = await iv.invoke(cvm, Invocation())
        assert result.outcome == "crashed" and "spins instead of exiting" in result.error["message"]
    finally:
        await iv.close()


async def test_an_agent_that_cannot_connect_says_so(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("no-connect", start_attempts=1))
    try:
        with pytest.raises(BackendError, match=r"the agent reported: cannot connect to 127\.0\.0\.1:1"):
            await iv.create(board.function("echo", ECHO))
    finally:
        await iv.close()


async def test_strangers_on_the_control_port_are_refused(intravisor: Intravisor, board: Board) -> None:
    backend = intravisor.backend
    port = backend.listener.port  # type: ignore[attr-defined]
    for line in (b"capfaas-agent " + b"0" * 32 + b" 0.1.0 1\n", b"GET / HTTP/1.0\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(line)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert backend.listener.rejected == 2  # type: ignore[attr-defined]
    cvm = await intravisor.create(board.function("echo", ECHO))  # real agents still get in
    assert cvm.state is State.READY


async def test_concurrent_cvms_and_close_stops_every_monitor(board: Board) -> None:
    iv = await open_intravisor(board.config)
    spec = board.function("echo", ECHO)
    cvms = await asyncio.gather(*(iv.create(spec) for _ in range(3)))  # concurrent starts, one port
    results = await asyncio.gather(*(iv.invoke(cvm, Invocation(body=b"n" * (i + 1))) for i, cvm in enumerate(cvms)))
    assert [bytes(r.body) for r in results] == [b"got 1 bytes", b"got 2 bytes", b"got 3 bytes"]
    pids = [cvm.process.pid for cvm in cvms]
    runs = Path(board.config.work_dir)
    await iv.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not processes_under(board.root)
    assert not any(runs.iterdir())  # run directories are removed unless keep_runs


async def test_an_unusable_configuration_fails_before_any_monitor(board: Board) -> None:
    iv = Intravisor(MorelloBackend(replace(board.config, disk=str(board.root / "missing.img")), MORELLO_PURECAP),
                    make_plugin_manager(autoload=False), segment_size=16 * GiB, region_size=GiB)
    with pytest.raises(BackendError, match=r"missing\.img .*does not exist: make it with `capfaas morello prepare`"):
        await iv.start()


async def test_the_pool_starts_fresh_instances_without_a_template(intravisor: Intravisor, board: Board) -> None:
    from capfaas.plugins.pooling import Scaling, make_pool

    pool = make_pool(intravisor, board.function("echo", ECHO), Scaling(max=2))
    first, cold = await pool.acquire()
    second, _ = await pool.acquire()
    assert cold and pool.template is None and first.process.pid != second.process.pid
    for cvm in (first, second):
        assert bytes((await intravisor.invoke(cvm, Invocation(body=b"pooled"))).body) == b"got 6 bytes"
        pool.release(cvm)
    await pool.close()


async def test_closing_a_pool_without_a_template(intravisor: Intravisor, board: Board) -> None:
    from capfaas.plugins.pooling import Scaling, make_pool

    pool = make_pool(intravisor, board.function("echo", ECHO), Scaling(max=1))
    cvm, _ = await pool.acquire()
    pool.release(cvm)
    await pool.close()
    assert cvm.state is State.STOPPED


async def test_capfiles_reach_the_monitor_and_bad_ones_never_do(board: Board) -> None:
    from capfaas.backends.morello.cvm_yaml import IntravisorConfigError
    from capfaas.core.backend import LaunchRequest, Region
    from capfaas.core.perms import DATA_PERMS

    backend = MorelloBackend(replace(board.config, keep_runs=True), MORELLO_PURECAP)
    memory = await backend.start(16 * GiB)
    try:
        ddc = memory.root_capability().set_bounds_exact(GiB).and_permissions(DATA_PERMS)

        spec = board.function("echo", ECHO)

        def request(capfiles: list[dict]) -> LaunchRequest:
            return LaunchRequest(1, spec, Region(memory.base, GiB, 0), ddc, ddc, settings={"capfiles": capfiles})

        process = await backend.launch(request([{"name": "inbox", "size": 4096, "data": "hello\n"},
                                                {"name": "results", "size": 1 << 20}]))
        process.kill()
        await process.wait()
        log = (process.monitor.run_dir / "monitor.log").read_text()  # type: ignore[attr-defined]
        assert "MON: CF[0] inbox 4096" in log and "MON: CF[1] results 1048576" in log
        with pytest.raises(IntravisorConfigError, match="CAP_File name 'toolongname' must be 1-9"):
            await backend.launch(request([{"name": "toolongname", "size": 16}]))
        with pytest.raises(IntravisorConfigError, match="must be a mapping of name, size"):
            await backend.launch(request([{"key": "inbox"}]))
        assert backend.starts == 1  # the refused configurations started no monitor
    finally:
        await backend.close()


async def test_an_agent_of_another_version_is_refused(board: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    import capfaas.backends.morello.backend as backend_module

    monkeypatch.setattr(backend_module, "__version__", "9.9.9")
    iv = await open_intravisor(board.config)
    try:
        from capfaas import __version__

        with pytest.raises(BackendError, match=rf"the agent in the disk image is capfaas {re.escape(__version__)}, "
                                               r"this host runs 9\.9\.9: run `capfaas morello prepare` again"):
            await iv.create(board.function("echo", ECHO))
        assert iv.backend.starts == 1  # not worth a second attempt  # type: ignore[attr-defined]
    finally:
        await iv.close()


async def test_a_slow_import_runs_into_the_configured_ready_timeout(board: Board) -> None:
    iv = await open_intravisor(board.with_mode("ok", ready_timeout=1.0))
    try:
        assert iv.backend.ready_timeout == 1.0
        started = time.monotonic()
        with pytest.raises(CVMStartError, match=r"^cVM for 'slow' did not become ready within 1 s "
                                                r"\(ready_timeout of the 'morello' backend\)$"):
            await iv.create(board.function("slow", "import time\ntime.sleep(30)\ndef handle(event, context):\n"
                                                   "    return 'late'\n"))
        assert time.monotonic() - started < 6
        assert not processes_under(board.root)
    finally:
        await iv.close()


CONFIGURED = """
import json

def handle(event, context):
    with open("/cap/config") as config:  # text, as declared, then the NUL and zeros up to its size
        settings = config.read().rstrip("\\0")
    if event.body:
        with open("/cap/scratch", "r+b") as scratch:
            scratch.write(event.body)
    with open("/cap/scratch", "rb") as scratch, context.files.open("config") as again:
        kept = scratch.read(16).rstrip(b"\\0").decode()
        size = len(again.read())
    try:
        open("/cap/other")
    except FileNotFoundError as exc:
        missing = str(exc)
    return json.dumps({"settings": settings, "kept": kept, "size": size, "missing": missing})
"""


async def test_function_code_opens_its_declared_capfiles(intravisor: Intravisor, board: Board) -> None:
    declared = declared_files([{"name": "config", "size": 64, "contents": base64.b64encode(b"threshold=3\n").decode()},
                               {"name": "scratch", "size": 4096}])
    spec = replace(board.function("configured", CONFIGURED), capfiles=declared)
    first = await intravisor.create(spec)
    log = (first.process.monitor.run_dir / "monitor.log").read_text()  # type: ignore[attr-defined]
    assert "MON: CF[0] config 64" in log and "MON: CF[1] scratch 4096" in log
    result = await intravisor.invoke(first, Invocation(body=b"written"))
    assert result.status == 200, result.error
    assert json.loads(result.body) == {"settings": "threshold=3\n", "kept": "written", "size": 64,
                                       "missing": "no CAP_File named 'other' is declared for this cVM "
                                                  "(declared: config, scratch)"}
    assert json.loads((await intravisor.invoke(first, Invocation())).body)["kept"] == "written"  # kept in the cVM
    second = await intravisor.create(spec)  # its own monitor: its own capfiles, as declared
    assert json.loads((await intravisor.invoke(second, Invocation())).body)["kept"] == ""


async def test_probing_a_capfile_its_monitor_does_not_hold_makes_it_give_up(intravisor: Intravisor,
                                                                            board: Board) -> None:
    """What ``context.files`` refuses to do, and why: Intravisor spins on an unknown key."""
    spec = board.function("prober", """
        from capfaas.backends.morello.capfile import open_capfile
        def handle(event, context):
            return open_capfile("nothere").read()
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.outcome == "crashed" and "wrong cap key nothere" in result.error["message"]
    assert not processes_under(board.root)
