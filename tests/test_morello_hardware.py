"""On a Morello board only: the real Intravisor monitor, the real library OS, the real agent.

Skipped everywhere else, with the reason. Run on the board with the configuration that
``capfaas morello check`` passes (CAPFAAS_CONFIG or ./capfaas.toml).
"""
from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from capfaas.backends.morello.backend import MorelloBackend
from capfaas.backends.morello.detect import failed_host_check, read_host
from capfaas.core.intravisor import Intravisor, Invocation
from capfaas.core.spec import FunctionSpec, Limits
from capfaas.plugin_manager import make_plugin_manager

AVAILABILITY = MorelloBackend.availability()
pytestmark = pytest.mark.skipif(
    not AVAILABILITY.available,
    reason=f"needs an Arm Morello board with CheriBSD and Intravisor: {AVAILABILITY.reason}")


def function(root: Path, code: str, timeout: float = 120.0) -> FunctionSpec:
    bundle = root / "fn"
    bundle.mkdir()
    (bundle / "fn.py").write_text(textwrap.dedent(code))
    return FunctionSpec(name="fn", bundle=bundle, module="fn.py", limits=Limits(timeout=timeout))


def test_the_board_passes_every_host_check() -> None:
    assert failed_host_check(read_host()) is None


async def test_a_function_runs_in_a_real_cvm(tmp_path: Path) -> None:
    spec = function(tmp_path, """
        def handle(event, context):
            print("inside a cVM")
            return event.text.upper()
    """)
    async with Intravisor(MorelloBackend(), make_plugin_manager(autoload=False)) as iv:
        cvm = await iv.create(spec)
        result = await iv.invoke(cvm, Invocation(body=b"hello morello"))
        assert (result.status, bytes(result.body), result.stdout) == (200, b"HELLO MORELLO", b"inside a cVM\n")
        big = await iv.invoke(cvm, Invocation(body=b"m" * 200_000))
        assert bytes(big.body) == b"M" * 200_000


async def test_a_timeout_kills_the_real_monitor(tmp_path: Path) -> None:
    spec = function(tmp_path, "import time\ndef handle(event, context):\n    time.sleep(600)\n", timeout=5.0)
    async with Intravisor(MorelloBackend(), make_plugin_manager(autoload=False)) as iv:
        cvm = await iv.create(spec)
        pid = cvm.process.pid
        started = time.monotonic()
        result = await iv.invoke(cvm, Invocation())
        assert result.outcome == "timeout" and time.monotonic() - started < 15
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
