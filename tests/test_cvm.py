"""Real cVMs on the emulated backend: functions that work, and functions that misbehave.

Every misbehaviour must be contained with a precise error while another cVM keeps serving.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from capfaas.core.cvm import State
from capfaas.core.intravisor import FunctionLoadError, Intravisor, Invocation
from capfaas.core.spec import FunctionSpec, Limits



@pytest.fixture
def tmp_path(bundles: Path) -> Path:
    """The bundles live outside /tmp (see conftest's ``bundles``)."""
    return bundles


def write_function(root: Path, name: str, code: str, timeout: float = 5.0) -> FunctionSpec:
    bundle = root / name
    bundle.mkdir()
    (bundle / "fn.py").write_text(textwrap.dedent(code))
    return FunctionSpec(name=name, bundle=bundle, module="fn.py", limits=Limits(timeout=timeout, output=4096))


HEALTHY = """
def handle(event, context):
    return "still serving " + event.text
"""


async def assert_still_serving(iv: Intravisor, cvm) -> None:
    result = await iv.invoke(cvm, Invocation(body=b"ok"))
    assert (result.status, result.body) == (200, b"still serving ok")


async def test_round_trip_with_event_and_context(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "introspect", """
        import json
        def handle(event, context):
            return {"statusCode": 201, "headers": {"X-Fn": context.function_name},
                    "body": {"method": event.method, "path": event.path, "query": event.query,
                             "header": event.headers.get("X-In"), "body": event.text,
                             "id": context.invocation_id, "remaining": context.remaining_time() > 0}}
    """)
    cvm = await intravisor.create(spec)
    assert cvm.state is State.READY
    result = await intravisor.invoke(cvm, Invocation(method="PUT", path="/a/b", query={"q": "1"},
                                                     headers={"X-In": "yes"}, body=b"payload", id="call-7"))
    assert result.status == 201 and result.headers["X-Fn"] == "introspect"
    assert json.loads(bytes(result.body)) == {"method": "PUT", "path": "/a/b", "query": {"q": "1"},
                                              "header": "yes", "body": "payload", "id": "call-7",
                                              "remaining": True}
    assert cvm.state is State.IDLE and cvm.invocations == 1


async def test_async_handler_and_logs(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "asyncfn", """
        import asyncio
        async def handle(event, context):
            await asyncio.sleep(0.01)
            print("to stdout")
            context.logger.warning("to the log")
            return b"async done"
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.body == b"async done"
    assert b"to stdout" in result.stdout and b"to the log" in result.stderr


async def test_large_body_arrives_zero_copy_and_result_returns_by_capability(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "count", """
        def handle(event, context):
            assert isinstance(event.body, memoryview) and event.body.readonly
            assert event.capability is not None and event.capability.length >= len(event.body)
            return {"body": bytes(event.body).upper(), "headers": {"X-Len": str(len(event.body))}}
    """)
    cvm = await intravisor.create(spec)
    payload = os.urandom(1 << 20).hex().encode()
    result = await intravisor.invoke(cvm, Invocation(body=payload))
    assert result.status == 200, result.error
    assert isinstance(result.body, memoryview) and result.body.readonly
    assert bytes(result.body) == payload.upper() and result.headers["X-Len"] == str(len(payload))


async def test_handler_exception_becomes_an_error_result(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "raises", """
        def handle(event, context):
            raise ValueError("bad input: " + event.text)
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation(body=b"x"))
    assert result.status == 500 and result.outcome == "error"
    assert result.error["type"] == "ValueError" and result.error["message"] == "bad input: x"
    assert result.error["file"] == "fn.py" and result.error["line"] == 3
    assert b"Traceback" in result.stderr
    assert cvm.state is State.IDLE


@pytest.mark.parametrize(
    ("code", "kind", "line"),
    [
        ("def handle(event, context)\n    return 1\n", "SyntaxError", 1),
        ("import no_such_module_anywhere\n", "ModuleNotFoundError", 1),
        ("x = 1\nraise RuntimeError('init failed')\n", "RuntimeError", 2),
        ("def other(event, context):\n    pass\n", "AttributeError", None),
    ],
    ids=["syntax", "import", "init", "no-handler"],
)
async def test_broken_code_is_reported_with_file_and_line(intravisor: Intravisor, tmp_path: Path,
                                                          code: str, kind: str, line: int | None) -> None:
    spec = write_function(tmp_path, "broken", code)
    with pytest.raises(FunctionLoadError) as info:
        await intravisor.create(spec)
    assert info.value.error["type"] == kind
    if line is not None:
        assert (info.value.error["file"], info.value.error["line"]) == ("fn.py", line)
        assert f"fn.py, line {line}" in str(info.value)
    assert not intravisor.cvms


MISBEHAVIOURS = {
    "loops-forever": ("def handle(event, context):\n    while True:\n        pass\n", 504, "1 s timeout"),
    "exits": ("import os\ndef handle(event, context):\n    os._exit(7)\n", 502, "exited with status 7"),
    "segfaults": ("import os, signal\ndef handle(event, context):\n    os.kill(os.getpid(), signal.SIGSEGV)\n",
                  502, "killed by SIGSEGV"),
    "crafts-a-capability": (
        "from capfaas.core.capability import Capability\n"
        "def handle(event, context):\n"
        "    return Capability.root().set_address(0x1000).set_bounds(64)\n", 502, "not derivable"),
    "forges-a-tag": (
        "from capfaas.core.capability import Capability\n"
        "def handle(event, context):\n"
        "    return Capability(True, Capability.root().pesbt, 0x1000)\n", 502, "not derivable"),
}


@pytest.mark.parametrize("name", list(MISBEHAVIOURS))
async def test_misbehaving_function_is_contained(intravisor: Intravisor, tmp_path: Path, name: str) -> None:
    code, status, said = MISBEHAVIOURS[name]
    healthy = await intravisor.create(write_function(tmp_path, "healthy", HEALTHY))
    bad = await intravisor.create(write_function(tmp_path, name, code, timeout=1.0))
    result = await intravisor.invoke(bad, Invocation())
    assert result.status == status, result.body
    assert said in result.error["message"]
    assert bad.state is State.STOPPED and bad.id not in intravisor.cvms
    await assert_still_serving(intravisor, healthy)
    replacement = await intravisor.create(write_function(tmp_path, name + "-again", HEALTHY))
    await assert_still_serving(intravisor, replacement)


async def test_memory_limit_contains_a_runaway_allocation(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "hog", """
        def handle(event, context):
            hoard = []
            while True:
                hoard.append(bytearray(16 << 20))
    """)
    healthy = await intravisor.create(write_function(tmp_path, "healthy", HEALTHY))
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.status in (500, 502)
    assert "MemoryError" in (result.error["type"] + result.error["message"]) or "killed" in result.error["message"]
    await assert_still_serving(intravisor, healthy)


async def test_output_flood_is_truncated(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "flood", """
        import sys
        def handle(event, context):
            for _ in range(100_000):
                print("x" * 100)
                sys.stderr.write("y" * 100)
            return "done"
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.body == b"done"
    assert len(result.stdout) <= 4096 + 200 and len(result.stderr) <= 4096 + 200
    assert b"truncated" in result.stdout


ESCAPES = {
    "reads-etc-passwd": "open('/etc/passwd').read()",
    "reads-proc-self-mem": "open('/proc/self/mem', 'rb').read(1)",
    "reads-another-function": "open(OTHER).read()",
    "starts-a-subprocess": "__import__('subprocess').run(['true'])",
    "forks": "__import__('os').fork()",
    "kills-its-parent": "__import__('os').kill(__import__('os').getppid(), 9)",
    "opens-a-socket": "__import__('socket').socket()",
    "imports-ctypes": "__import__('ctypes')",
    "imports-mmap": "__import__('mmap')",
}


@pytest.mark.parametrize("name", list(ESCAPES))
async def test_escape_attempts_are_denied(intravisor: Intravisor, tmp_path: Path, name: str) -> None:
    other = write_function(tmp_path, "other", HEALTHY)
    code = f"OTHER = {str(other.bundle / 'fn.py')!r}\ndef handle(event, context):\n    return repr({ESCAPES[name]})\n"
    cvm = await intravisor.create(write_function(tmp_path, name, code))
    healthy = await intravisor.create(other)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.status == 500, bytes(result.body)
    assert result.error["type"] in ("PermissionError", "ImportError"), result.error
    assert "capfaas libOS" in result.error["message"] and "rule" in result.error["message"]
    assert cvm.state is State.IDLE
    await assert_still_serving(intravisor, healthy)


async def test_cvm_sees_only_its_own_region(intravisor: Intravisor, tmp_path: Path) -> None:
    spec = write_function(tmp_path, "prober", """
        import gc, os
        def handle(event, context):
            segment_fds = [fd for fd in range(3, 1024) if _is_segment(fd)]
            buffers = [o for o in gc.get_objects() if isinstance(o, memoryview)]
            return {"body": {"fds": segment_fds, "largest": max((o.nbytes for o in buffers), default=0)}}
        def _is_segment(fd):
            try:
                return os.fstat(fd).st_size > (8 << 30)
            except OSError:
                return False
    """)
    cvm = await intravisor.create(spec)
    result = await intravisor.invoke(cvm, Invocation())
    seen = json.loads(bytes(result.body))
    assert seen["fds"] == []  # no descriptor reaches the whole segment
    assert seen["largest"] <= intravisor.region_size  # nothing mapped beyond its own region


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_cvms_run_as_batch_work_so_a_woken_one_does_not_preempt_the_gateway(intravisor: Intravisor,
                                                                                 tmp_path: Path) -> None:
    cvm = await intravisor.create(write_function(tmp_path, "healthy", HEALTHY))
    assert os.sched_getscheduler(cvm.process.pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the gateway keeps the default policy
    await assert_still_serving(intravisor, cvm)


async def test_template_survives_and_reports_exits(intravisor: Intravisor, tmp_path: Path) -> None:
    cvm = await intravisor.create(write_function(tmp_path, "healthy", HEALTHY))
    os.kill(cvm.process.pid, signal.SIGKILL)
    result = await intravisor.invoke(cvm, Invocation())
    assert result.status == 502 and "killed by SIGKILL" in result.error["message"]
    again = await intravisor.create(write_function(tmp_path, "healthy2", HEALTHY))
    await assert_still_serving(intravisor, again)


async def test_the_intravisor_busy_waits_only_for_quick_replies(intravisor: Intravisor, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone, it waits for a reply without sleeping, as long as the cVM last answered within
    REPLY_SPIN; a slow function is waited for on the event loop, its CPU not burnt."""
    import capfaas.core.intravisor as intravisor_module

    monkeypatch.setattr(intravisor_module, "REPLY_SPIN", 0.005)  # wide: the test must not hang on timing
    quick = await intravisor.create(write_function(tmp_path, "quick", HEALTHY))
    slow = await intravisor.create(write_function(tmp_path, "slow", """
        import time
        def handle(event, context):
            time.sleep(0.05)
            return "still serving " + event.text
    """))
    assert quick.process.read_reply(0.001) is None  # nothing was sent: it gives up after its budget
    for cvm in (quick, slow):
        await assert_still_serving(intravisor, cvm)
    spun: list[int | None] = []
    process_type = type(quick.process)
    waited = process_type.read_reply
    monkeypatch.setattr(process_type, "read_reply", lambda self, seconds: spun.append(self.pid) or waited(self, seconds))
    for cvm in (slow, slow, quick, quick):
        await assert_still_serving(intravisor, cvm)
    assert spun.count(slow.process.pid) == 0 and quick.process.pid in spun
    assert slow.reply_seconds > 0.05


async def test_memory_growth_is_reported_after_a_slow_invocation_and_every_few_quick_ones(
        intravisor: Intravisor, tmp_path: Path) -> None:
    """Quick invocations skip measuring memory, so the pool learns of slow growth within
    USAGE_EVERY of them, and of a large allocation (which takes time) at once."""
    from capfaas.core.runtime import USAGE_EVERY

    cvm = await intravisor.create(write_function(tmp_path, "grower", """
        HOARD = []
        def handle(event, context):
            if event.text == "big":
                HOARD.append(bytearray(64 << 20))
            else:
                HOARD.append(b"x" * 1024)
            return ""
    """))
    for _ in range(USAGE_EVERY):
        await intravisor.invoke(cvm, Invocation(body=b"small"))
    assert cvm.peak_rss > 0 and cvm.cpu_seconds > 0
    before = cvm.peak_rss
    await intravisor.invoke(cvm, Invocation(body=b"big"))
    assert cvm.peak_rss >= before + (64 << 20)


async def test_each_invocation_gets_the_output_it_printed_quick_or_slow(
        intravisor: Intravisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick reply is read while the event loop waits, a slow one through it: either way the
    output printed before it is that invocation's, not the next one's."""
    import capfaas.core.intravisor as intravisor_module

    monkeypatch.setattr(intravisor_module, "REPLY_SPIN", 0.015)  # wide: "quick" must not depend on this machine
    cvm = await intravisor.create(write_function(tmp_path, "talker", """
        import time
        def handle(event, context):
            print("said", event.text)
            if event.text.startswith("slow"):
                time.sleep(0.03)
            return ""
    """))
    directly = set()
    for text in ("quick 1", "quick 2", "slow 1", "quick 3", "slow 2", "slow 3", "quick 4"):
        result = await intravisor.invoke(cvm, Invocation(body=text.encode()))
        assert result.stdout == f"said {text}\n".encode(), (text, result.stdout)
        directly.add(cvm.answered_directly)
    assert directly == {True, False}  # both ways were taken


async def test_dispatch_calls_back_once_and_an_abandoned_invocation_never(
        intravisor: Intravisor, tmp_path: Path) -> None:
    """The intravisor's invocations without a coroutine: ``done`` gets the result (at once when the
    cVM answered within the busy-wait); after ``abandon`` it is never called, and the cVM is left
    busy for the caller to stop, since its reply would come to the next invocation."""
    import asyncio

    cvm = await intravisor.create(write_function(tmp_path, "napper", """
        import time
        def handle(event, context):
            time.sleep(float(event.text or 0))
            return "woke"
    """))
    results: list[tuple[object, object]] = []
    for text in (b"", b"", b"0.05"):
        finished = asyncio.Event()
        intravisor.dispatch(cvm, Invocation(body=text), lambda result, error: (results.append((result, error)),
                                                                                   finished.set()))
        await asyncio.wait_for(finished.wait(), 5)
    assert [(result.status, result.body, error) for result, error in results] == [(200, b"woke", None)] * 3
    results.clear()
    running = intravisor.dispatch(cvm, Invocation(body=b"0.2"), lambda result, error: results.append((result, error)))
    assert intravisor.abandon(running) and not intravisor.abandon(running)
    await asyncio.sleep(0.5)  # its reply has come by now
    assert results == [] and cvm.state is State.BUSY
    await intravisor.stop(cvm, "abandoned")


async def test_dispatch_reports_a_crash_to_done(intravisor: Intravisor, tmp_path: Path) -> None:
    import asyncio

    cvm = await intravisor.create(write_function(tmp_path, "quitter", """
        import os
        def handle(event, context):
            os._exit(7)
    """))
    results = asyncio.get_running_loop().create_future()
    running = intravisor.dispatch(cvm, Invocation(), lambda result, error: results.set_result((result, error)))
    result, error = await asyncio.wait_for(results, 5)
    assert error is None and result.status == 502 and result.outcome == "crashed" and "status 7" in result.body.decode()
    assert not intravisor.abandon(running) and cvm.state is State.STOPPED


async def test_invoke_hooks_see_each_invocation_and_a_failing_hook_is_reported(tmp_path: Path) -> None:
    """A plugin's capfaas_before_invoke and capfaas_after_invoke run around every invocation; one
    that raises fails that invocation for its caller, rather than leaving the caller waiting."""
    import asyncio

    from capfaas.backends.emulated.backend import EmulatedBackend
    from capfaas.hookspecs import hookimpl
    from capfaas.plugin_manager import make_plugin_manager

    seen: list[tuple[object, ...]] = []

    class Recorder:
        @hookimpl
        def capfaas_before_invoke(self, spec: FunctionSpec, invocation_id: str) -> None:
            seen.append(("before", invocation_id))

        @hookimpl
        def capfaas_after_invoke(self, spec: FunctionSpec, invocation_id: str, status: int, duration: float) -> None:
            seen.append(("after", invocation_id, status))
            if invocation_id == "boom":
                raise RuntimeError("the hook failed")

    pm = make_plugin_manager(autoload=False)
    pm.register(Recorder())
    async with Intravisor(EmulatedBackend(), pm, segment_size=4 << 30, region_size=1 << 30) as iv:
        cvm = await iv.create(write_function(tmp_path, "dozer", """
            import time
            def handle(event, context):
                time.sleep(0.002)  # too slow for the busy-wait: the reply comes through the event loop
                return "rested"
        """))
        result = await asyncio.wait_for(iv.invoke(cvm, Invocation(body=b"a", id="one")), 5)
        assert result.body == b"rested"
        with pytest.raises(RuntimeError, match="the hook failed"):
            await asyncio.wait_for(iv.invoke(cvm, Invocation(body=b"b", id="boom")), 5)
    assert seen == [("before", "one"), ("after", "one", 200), ("before", "boom"), ("after", "boom", 200)]
