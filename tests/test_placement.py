"""CPU placement: the gateway's event loop on a CPU of its own while busy, the cVMs on the others."""
from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from capfaas.core.backend import Backend
from capfaas.core.intravisor import Intravisor
from capfaas.gateway.placement import BUSY, IDLE, Layout, Placement, dedicate, layouts

from .gateway_support import CAPFAAS, PASSWORD, served_gateway
from .test_cvm import HEALTHY, assert_still_serving, write_function

CPUS = frozenset(os.sched_getaffinity(0))
several_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="placement needs two CPUs or more")


def affinity(pid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(pid))


def test_the_loop_takes_a_cpu_when_busy_and_gives_it_back_only_well_below() -> None:
    assert not dedicate(False, BUSY - 0.01) and dedicate(False, BUSY)
    assert dedicate(True, BUSY - 0.01) and dedicate(True, IDLE + 0.01)  # no flapping in between
    assert not dedicate(True, IDLE)


def test_layouts_keep_the_first_cpu_for_the_loop() -> None:
    assert layouts(frozenset({3})) is None
    shared, dedicated = layouts(frozenset({1, 2, 5}))  # type: ignore[misc]
    assert shared == Layout(frozenset({1, 2, 5}), frozenset({1, 2, 5}))
    assert dedicated == Layout(frozenset({1}), frozenset({2, 5}))


def test_an_unknown_mode_is_refused_with_the_choices(intravisor: Intravisor) -> None:
    with pytest.raises(ValueError, match="unknown CPU placement 'fast': choose one of auto, shared, dedicated"):
        Placement(intravisor.backend, "fast")


@several_cpus
async def test_confine_moves_running_cvms_and_the_ones_cloned_later(intravisor: Intravisor, tmp_path: Path) -> None:
    before = await intravisor.create(write_function(tmp_path, "before", HEALTHY))
    one = frozenset({max(CPUS)})
    try:
        assert intravisor.backend.confine(one)
        after = await intravisor.create(write_function(tmp_path, "after", HEALTHY))
        for cvm in (before, after):
            threads = os.listdir(f"/proc/{cvm.process.pid}/task")
            assert {affinity(int(thread)) for thread in threads} == {one}
            await assert_still_serving(intravisor, cvm)
        assert affinity(0) == CPUS  # the gateway's own thread is not the backend's to move
    finally:
        intravisor.backend.confine(CPUS)
    assert affinity(before.process.pid) == CPUS


@several_cpus
async def test_auto_dedicates_a_cpu_while_the_process_is_busy(intravisor: Intravisor, tmp_path: Path) -> None:
    cvm = await intravisor.create(write_function(tmp_path, "placed", HEALTHY))
    first = min(CPUS)
    placement = Placement(intravisor.backend, "auto", interval=0.1)
    spinning = threading.Event()
    spinning.set()

    def spin() -> None:  # a whole CPU's worth of this process's time
        while spinning.is_set():
            pass

    async def until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    spinner = threading.Thread(target=spin)
    placement.start()
    try:
        spinner.start()
        await until(lambda: placement.dedicated, "a busy loop did not get a CPU of its own")
        assert affinity(0) == {first}
        assert affinity(cvm.process.pid) == CPUS - {first}
        await assert_still_serving(intravisor, cvm)
        spinning.clear()
        await until(lambda: not placement.dedicated, "an idle loop kept its CPU")
        assert affinity(0) == CPUS and affinity(cvm.process.pid) == CPUS
    finally:
        spinning.clear()
        if spinner.is_alive():
            spinner.join()
        placement.close()
        os.sched_setaffinity(0, CPUS)
    assert affinity(0) == CPUS


class PlainBackend(Backend):
    """A backend as a third-party package might write it: nothing about CPUs."""

    name, priority, description = "plain", 0, "places nothing"

    @classmethod
    def availability(cls) -> Any:
        raise NotImplementedError

    async def start(self, segment_size: int) -> Any:
        raise NotImplementedError

    async def launch(self, request: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


@several_cpus
async def test_a_backend_that_cannot_place_its_cvms_leaves_the_loop_alone() -> None:
    placement = Placement(PlainBackend(), "dedicated")
    placement.start()
    try:
        assert not placement.dedicated and affinity(0) == CPUS
    finally:
        placement.close()
        os.sched_setaffinity(0, CPUS)


@several_cpus
def test_serve_dedicated_pins_the_loop_and_moves_the_cvms(tmp_path: Path) -> None:
    with served_gateway(tmp_path, env={"CAPFAAS_ADMIN_PASSWORD": PASSWORD},
                        extra=("--cpu-placement", "dedicated", "--deploy", str(Path(__file__).parents[1] / "functions"))) as served:
        status, _, body = served.request("POST", "/function/hello", b"placed", auth=False)
        assert (status, body) == (200, b"Hello, placed!\n")
        first = min(CPUS)
        assert affinity(served.process.pid) == {first}
        cvms = served.children()
        assert cvms and {affinity(pid) for pid in cvms} == {CPUS - {first}}
        _, _, metrics = served.request("GET", "/metrics")
        assert "\ncapfaas_gateway_dedicated_cpu 1\n" in metrics.decode()


def test_an_unknown_placement_from_the_environment_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {**os.environ, "CAPFAAS_CPU_PLACEMENT": "fast"}
    done = subprocess.run([*CAPFAAS, "serve", "--port", "1"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"'fast' is not a CPU placement (from --cpu-placement or CAPFAAS_CPU_PLACEMENT)" in done.stderr
    assert not (tmp_path / ".capfaas").exists()
