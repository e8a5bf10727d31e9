"""The gateway on the Morello backend, against the stand-in monitor: deployments that declare
CAP_Files, and functions calling functions (``context.call``).

The gateway, registry, pools and intravisor are the real ones; only the host facts are injected
and the monitor is ``tests/fake_intravisor.py`` (with ``tests/fake_lkl.py`` for the CAP_File devices).
"""
from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from capfaas.backends.morello.backend import MorelloBackend
from capfaas.core.intravisor import Intravisor
from capfaas.gateway.app import Gateway, Settings, create_app
from capfaas.gateway.logs import LogStore
from capfaas.gateway.metrics import gateway_metrics
from capfaas.gateway.server import close_gateway
from capfaas.gateway.service import FunctionService
from capfaas.plugin_manager import make_plugin_manager
from capfaas.registry import Registry

from .gateway_support import AUTH, PASSWORD, deployment
from .morello_support import MORELLO_PURECAP, Board, make_board, processes_under

GiB = 1 << 30


@pytest.fixture
def board() -> Iterator[Board]:
    """Outside /tmp, like the emulated tests: the library OS gives each cVM a private /tmp."""
    root = Path(tempfile.mkdtemp(prefix="capfaas-morello-", dir="/var/tmp"))
    yield make_board(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def gateway(board: Board) -> AsyncIterator[tuple[Gateway, TestClient]]:
    """What ``capfaas serve --backend morello`` runs, with the stand-in board's configuration."""
    pm = make_plugin_manager(autoload=False)
    intravisor = Intravisor(MorelloBackend(board.config, MORELLO_PURECAP), pm, segment_size=16 * GiB, region_size=GiB)
    await intravisor.start()
    state = board.root / "state"
    state.mkdir()
    service = FunctionService(Registry(state), intravisor, pm, state)
    gw = Gateway(Settings(state_dir=state, admin_password=PASSWORD), service, intravisor, pm, gateway_metrics(),
                 LogStore())
    client = TestClient(TestServer(create_app(gw), host="127.0.0.1"))
    await client.start_server()
    try:
        yield gw, client
    finally:
        await client.close()
        await close_gateway(gw)
    assert not processes_under(board.root)


async def deploy(client: TestClient, name: str, source: str, **fields: Any) -> tuple[int, str]:
    response = await client.post("/system/functions", json=deployment(name, source, **fields), headers=AUTH)
    return response.status, await response.text()


def contents(data: bytes) -> str:
    return base64.b64encode(data).decode()


READS_CONFIG = """
def handle(event, context):
    with open("/cap/config") as config:
        return config.read().rstrip("\\0")
"""


async def test_a_deployment_declares_capfiles_its_cvms_open(gateway: tuple[Gateway, TestClient]) -> None:
    _, client = gateway
    declared = [{"name": "config", "size": 64, "contents": contents(b"threshold=3\n"),
                 "grants": {"configured": "rw"}}]
    assert (await deploy(client, "configured", READS_CONFIG, capFiles=declared))[0] == 202
    response = await client.post("/function/configured")
    assert (response.status, await response.text()) == (200, "threshold=3\n")
    listed = await (await client.get("/system/files", headers=AUTH)).json()
    assert listed == [], "the gateway made a shared object no cVM on Morello can reach"


@pytest.mark.parametrize(("declared", "reason"), [
    ([{"name": "config", "size": 64, "grants": {"reader": "r"}}],
     "CAP_File 'config' is granted to 'reader', but on Morello each cVM has its own monitor, so a capfile is "
     "reachable only from the cVM whose YAML declares it"),
    ([{"name": "config", "size": 64, "contents": contents(b"\xff\xfe")}],
     "CAP_File 'config' has binary contents; a capfile's data is text"),
    ([{"name": "settings.ini", "size": 64}], "CAP_File name 'settings.ini' must be 1-9 of [A-Za-z0-9_]"),
    ([{"name": "config", "size": 12, "contents": contents(b"threshold=3\n")}],
     "CAP_File 'config': 12 bytes of data do not fit 12 bytes with the terminating NUL"),
])
async def test_capfiles_morello_cannot_provide_are_refused_at_deploy(gateway: tuple[Gateway, TestClient],
                                                                     declared: list[dict], reason: str) -> None:
    gw, client = gateway
    status, text = await deploy(client, "configured", READS_CONFIG, capFiles=declared)
    assert status == 400
    assert text.startswith("function 'configured' declares CAP_Files that Intravisor's capfiles cannot provide: ")
    assert reason in text
    assert gw.intravisor.backend.starts == 0  # refused before any monitor started  # type: ignore[attr-defined]
    assert (await client.get("/system/function/configured", headers=AUTH)).status == 404


GREETER = """
def handle(event, context):
    if event.text == "fail":
        raise ValueError("no greeting today")
    if event.text == "big":
        return "g" * 300_000
    return f"Hello, {event.text[:5]}! ({len(event.body)} bytes)"
"""

CALLER = """
import json
from capfaas.core.handlers import FunctionCallError

def handle(event, context):
    small = context.call("greeter", event.body)
    large = context.call("greeter", b"x" * 300_000)  # shared in this cVM's region, sent inline
    big = context.call("greeter", "big")  # a large result: shared in the callee's region, sent inline
    try:
        context.call("greeter", "fail")
    except FunctionCallError as exc:
        failed = [exc.status, str(exc)]
    return json.dumps({"small": [small.status, small.text], "large": large.text,
                       "big": [len(big.body), big.text.strip("g")], "failed": failed})
"""


async def test_a_function_calls_another_with_context_call(gateway: tuple[Gateway, TestClient]) -> None:
    _, client = gateway
    for name, source in (("greeter", GREETER), ("caller", CALLER)):
        status, text = await deploy(client, name, source)
        assert status == 202, text
    response = await client.post("/function/caller", data=b"world")
    assert response.status == 200, await response.text()
    assert json.loads(await response.text()) == {
        "small": [200, "Hello, world! (5 bytes)"], "large": "Hello, xxxxx! (300000 bytes)", "big": [300_000, ""],
        "failed": [500, "calling 'greeter' failed (ValueError): no greeting today"]}
