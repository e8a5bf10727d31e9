"""Cold-start pooling: templates, single-flight starts, scale to zero, recycling, the global budget."""
from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path

import pytest

from capfaas.core.cvm import State
from capfaas.core.intravisor import FunctionLoadError, Invocation
from capfaas.core.spec import FunctionSpec, Limits
from capfaas.plugins.pooling import BudgetExhausted, FunctionPool, PoolBusy, Scaling, budget_of



def spec(root: Path, name: str, code: str, **limits: object) -> FunctionSpec:
    bundle = root / name
    bundle.mkdir()
    (bundle / "fn.py").write_text(textwrap.dedent(code))
    return FunctionSpec(name=name, bundle=bundle, module="fn.py", limits=Limits(timeout=10.0, **limits))


async def call(pool: FunctionPool, body: bytes = b"") -> tuple[bytes, bool]:
    cvm, cold = await pool.acquire()
    try:
        result = await pool.intravisor.invoke(cvm, Invocation(body=body))
        assert result.status == 200, result.error
        return bytes(result.body), cold
    finally:
        pool.release(cvm)


LIFECYCLE = """
    import os, random
    EVENTS = []
    def init():
        EVENTS.append(("init", os.getpid()))
    def before_snapshot():
        EVENTS.append(("before_snapshot", os.getpid()))
    def after_restore():
        EVENTS.append(("after_restore", os.getpid()))
    def handle(event, context):
        return {"body": {"events": EVENTS, "pid": os.getpid(), "random": random.random()}}
"""


async def test_instances_are_cloned_from_a_template_that_ran_init_once(intravisor, bundles) -> None:
    import json

    pool = FunctionPool(intravisor, spec(bundles, "life", LIFECYCLE), Scaling(max=3))
    await pool.prepare()
    template_pid = pool.template.pid
    cvms = [(await pool.acquire())[0] for _ in range(3)]
    answers = []
    for cvm in cvms:
        answers.append(json.loads(bytes((await intravisor.invoke(cvm, Invocation())).body)))
    for cvm in cvms:
        pool.release(cvm)
    for answer in answers:
        events = [tuple(e) for e in answer["events"]]
        assert events[:2] == [("init", template_pid), ("before_snapshot", template_pid)]
        assert events[2:] == [("after_restore", answer["pid"])]
        assert answer["pid"] != template_pid
    assert len({a["random"] for a in answers}) == 3, "instances share the template's random state"
    assert pool.cold_starts == 3
    await pool.close()


async def test_a_broken_function_fails_in_its_template(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "broken", "def init():\n    raise ValueError('no db')\n"
                                                            "def handle(e, c):\n    pass\n"), Scaling())
    with pytest.raises(FunctionLoadError, match="no db"):
        await pool.acquire()


async def test_a_burst_starts_only_what_it_needs(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "burst", "import time\ndef handle(e, c):\n"
                                                           "    time.sleep(0.02)\n    return 'ok'\n"),
                        Scaling(max=3, queue=100))
    results = await asyncio.gather(*(call(pool) for _ in range(40)))
    assert all(body == b"ok" for body, _ in results)
    assert pool.cold_starts == 3 and pool.replicas == 3
    assert sum(cold for _, cold in results) == 3
    await pool.close()


async def test_a_full_queue_refuses_with_retry_after(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "slowpoke", "import time\ndef handle(e, c):\n"
                                                              "    time.sleep(0.3)\n    return 'ok'\n"),
                        Scaling(max=1, queue=2))
    outcomes = await asyncio.gather(*(call(pool) for _ in range(6)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, PoolBusy)]
    assert len(refused) == 3 and all(o.retry_after >= 1 for o in refused)
    assert sum(1 for o in outcomes if isinstance(o, tuple)) == 3
    await pool.close()


async def test_idle_instances_scale_to_zero(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "idle", "def handle(e, c):\n    return 'ok'\n"),
                        Scaling(max=2, idle_timeout=0.05))
    await call(pool)
    assert pool.replicas == 1
    await pool.reap_idle(time.monotonic())
    assert pool.replicas == 1, "reaped before its idle time"
    await asyncio.sleep(0.1)
    await pool.reap_idle(time.monotonic())
    assert pool.replicas == 0
    assert (await call(pool))[1] is True  # the next request is a cold start again
    await pool.close()


async def test_scale_to_zero_can_be_turned_off(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "keeper", "def handle(e, c):\n    return 'ok'\n"),
                        Scaling(max=2, idle_timeout=0.01, scale_to_zero=False))
    await pool.scale_to(2)
    await asyncio.sleep(0.05)
    await pool.reap_idle(time.monotonic())
    assert pool.replicas == 1
    await pool.close()


async def test_instances_are_recycled_after_n_invocations(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "worn", "import os\ndef handle(e, c):\n    return str(os.getpid())\n"),
                        Scaling(max=1, recycle_after=3))
    pids = [(await call(pool))[0] for _ in range(7)]
    assert len(set(pids[:3])) == 1 and pids[3] != pids[0] and pids[6] != pids[3]
    assert pool.cold_starts == 3
    await pool.close()


async def test_instances_are_recycled_past_the_memory_threshold(intravisor, bundles) -> None:
    code = "import os\nHOARD = []\ndef handle(e, c):\n    HOARD.append(bytearray(64 << 20))\n    return str(os.getpid())\n"
    pool = FunctionPool(intravisor, spec(bundles, "hoarder", code, memory=512 << 20),
                        Scaling(max=1, recycle_rss=48 << 20))
    first = (await call(pool))[0]
    second = (await call(pool))[0]
    assert first != second
    await pool.close()


async def test_the_budget_stops_idle_instances_of_other_functions_first(intravisor, bundles) -> None:
    budget = budget_of(intravisor)
    budget.instances = 2
    hello = "def handle(e, c):\n    return 'ok'\n"
    first = FunctionPool(intravisor, spec(bundles, "first", hello), Scaling(max=2))
    second = FunctionPool(intravisor, spec(bundles, "second", hello), Scaling(max=2))
    await first.scale_to(2)
    oldest = first.idle[0]
    await call(second)
    assert oldest.state is State.STOPPED and first.replicas == 1 and second.replicas == 1
    cvms = [(await first.acquire())[0], (await second.acquire())[0]]
    third = FunctionPool(intravisor, spec(bundles, "third", hello), Scaling(max=2))
    with pytest.raises(BudgetExhausted, match=r"budget is spent \(2 instances"):
        await third.acquire()
    for pool, cvm in zip((first, second), cvms):
        pool.release(cvm)
    for pool in (first, second, third):
        await pool.close()


async def test_instances_are_recycled_before_their_lifetime_cpu_limit(intravisor, bundles) -> None:
    code = ("import os, time\ndef handle(e, c):\n    end = time.process_time() + 0.3\n"
            "    while time.process_time() < end:\n        pass\n    return str(os.getpid())\n")
    pool = FunctionPool(intravisor, spec(bundles, "burner", code, cpu_seconds=1), Scaling(max=1))
    pids = [(await call(pool))[0] for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] != pids[1], pids  # replaced after half its CPU budget
    await pool.close()


async def test_the_budget_keeps_host_memory_free(intravisor, bundles) -> None:
    from capfaas.plugins.pooling import memory_available

    budget = budget_of(intravisor)
    hello = "def handle(e, c):\n    return 'ok'\n"
    first = FunctionPool(intravisor, spec(bundles, "first", hello), Scaling(max=2))
    await call(first)
    budget.reserve = memory_available()  # as if the host had no memory to spare
    second = FunctionPool(intravisor, spec(bundles, "second", hello), Scaling(max=2))
    with pytest.raises(BudgetExhausted, match="MiB kept free"):
        await call(second)
    assert first.replicas == 0, "the idle instance of the other function was not stopped first"
    for pool in (first, second):
        await pool.close()


async def test_an_async_instance_serves_several_invocations_at_once(intravisor, bundles) -> None:
    code = ("import asyncio, os\nRUNNING = [0, 0]\nasync def handle(e, c):\n"
            "    RUNNING[0] += 1\n    RUNNING[1] = max(RUNNING)\n    await asyncio.sleep(0.2)\n"
            "    RUNNING[0] -= 1\n"
            "    return os.getpid().to_bytes(4, 'little') + bytes([RUNNING[1]]) + bytes(e.body) * 20000\n")
    pool = FunctionPool(intravisor, spec(bundles, "together", code, concurrency=4), Scaling(max=1, queue=8))
    results = await asyncio.gather(*(call(pool, str(i).encode()) for i in range(8)))
    assert pool.cold_starts == 1 and len({body[:4] for body, _ in results}) == 1
    assert max(body[4] for body, _ in results) == 4, "the instance never ran 4 invocations at once"
    assert [body[5:] for body, _ in results] == [str(i).encode() * 20000 for i in range(8)]  # each its own reply
    cvm = next(iter(pool.instances))
    assert cvm.in_flight == 0 and cvm in pool.idle and not pool.partial
    await pool.close()


async def test_concurrency_needs_an_async_handler(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "plain", "def handle(e, c):\n    return 'ok'\n", concurrency=2),
                        Scaling())
    with pytest.raises(FunctionLoadError, match="concurrency 2 needs an async def handler"):
        await pool.acquire()
    await pool.close()


async def test_init_code_in_a_template_cannot_fork(intravisor, bundles) -> None:
    pool = FunctionPool(intravisor, spec(bundles, "forker", "import os\ndef init():\n    os.fork()\n"
                                                            "def handle(e, c):\n    return 'ok'\n"), Scaling())
    with pytest.raises(FunctionLoadError, match="PermissionError.*fork"):
        await pool.acquire()
    await pool.close()


async def _spare_of(pool: FunctionPool) -> int:
    """The pid of the clone the pool's template forked ahead of need, once it is there."""
    for _ in range(200):
        if pool.template._spares:
            return (await pool.template._spares[-1]).pid
        await asyncio.sleep(0.01)
    raise AssertionError("the template forked no spare clone")


async def test_a_cold_start_takes_the_spare_clone_and_the_template_forks_the_next(intravisor, bundles) -> None:
    import json
    import os

    pool = FunctionPool(intravisor, spec(bundles, "spared", LIFECYCLE), Scaling(max=2))
    await pool.prepare()
    spare = await _spare_of(pool)
    cvm, cold = await pool.acquire()
    try:
        assert cold and cvm.process.pid == spare  # the clone forked ahead became the instance
        answer = json.loads(bytes((await intravisor.invoke(cvm, Invocation())).body))
        assert answer["pid"] == spare and ("after_restore", spare) in [tuple(e) for e in answer["events"]]
    finally:
        pool.release(cvm)
    following = await _spare_of(pool)
    assert following != spare
    second, _ = await pool.acquire()
    try:
        other = json.loads(bytes((await intravisor.invoke(second, Invocation())).body))
        assert other["random"] != answer["random"]  # each clone reseeded when it became an instance
    finally:
        pool.release(second)
    leftover = await _spare_of(pool)
    await pool.close()
    for _ in range(200):  # the template is gone, and with it the clone nobody took
        try:
            os.kill(leftover, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"the spare clone {leftover} outlived its template")


PROBER = """
    import os
    def handle(event, context):
        return {"body": [fd for fd in range(3, 1024) if _is_segment(fd)]}
    def _is_segment(fd):
        try:
            return os.fstat(fd).st_size > (8 << 30)
        except OSError:
            return False
"""


async def test_clones_keep_no_descriptor_to_the_segment(intravisor, bundles) -> None:
    import json

    pool = FunctionPool(intravisor, spec(bundles, "prober", PROBER), Scaling(max=2))
    await pool.prepare()
    await _spare_of(pool)
    first, _ = await pool.acquire()  # the spare clone
    second, _ = await pool.acquire()  # forked on demand: the next spare is not there yet
    try:
        for cvm in (first, second):
            assert json.loads(bytes((await intravisor.invoke(cvm, Invocation())).body)) == []
    finally:
        pool.release(first)
        pool.release(second)
    await pool.close()
