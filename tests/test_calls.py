"""CAP_Calls: one function calling another through the intravisor, without HTTP."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .gateway_support import AUTH, deploy, running_gateway

ADDER = """
def handle(event, context):
    numbers = event.json()
    return {"body": {"sum": sum(numbers), "called_by_header": event.headers.get("X-From")}}
"""

CALLER = """
def handle(event, context):
    answer = context.call("adder", event.body, headers={"X-From": context.function_name})
    return {"statusCode": answer.status, "body": {"via": context.function_name, "answer": answer.json()}}
"""

FAILING = """
def handle(event, context):
    raise ValueError("no numbers today")
"""

ERRORS = """
from capfaas.core.handlers import FunctionCallError
def handle(event, context):
    try:
        context.call(event.text)
    except FunctionCallError as exc:
        return {"body": {"function": exc.function, "kind": exc.kind, "status": exc.status, "message": str(exc)}}
    return "no error"
"""

LOOP = """
def handle(event, context):
    return context.call(event.text or "loop").body
"""

LARGE = """
def handle(event, context):
    payload = bytes(range(256)) * 8192  # 2 MiB: handed over as a capability to this cVM's memory
    answer = context.call("measure", context.share(payload))
    return answer.body
"""

MEASURE = """
import hashlib
def handle(event, context):
    return {"body": {"bytes": len(event.body), "sha256": hashlib.sha256(event.body).hexdigest()}}
"""

ODD_SIZES = """
import hashlib
def handle(event, context):
    size = int(event.text)  # sizes whose bounds are not exactly representable round up
    answer = context.call("odd-echo", bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return {"body": {"sent": size, "got": len(answer.body), "sha256": hashlib.sha256(answer.body).hexdigest()}}
"""

ODD_ECHO = """
def handle(event, context):
    return bytes(event.body)
"""

CAPABILITY_ECHO = """
def handle(event, context):
    return event.capability or bytes(event.body)  # the body handed back as it came, without a copy
"""

ASYNC_CALLER = """
import asyncio
async def handle(event, context):
    answers = await asyncio.gather(*(context.acall("adder", f"[{i}, {i}]") for i in range(4)))
    return {"body": [a.json()["sum"] for a in answers]}
"""


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Any]:
    async with running_gateway(tmp_path / "state") as (gateway, client):
        for name, source in (("adder", ADDER), ("caller", CALLER), ("failing", FAILING), ("errors", ERRORS),
                             ("loop", LOOP), ("large", LARGE), ("measure", MEASURE), ("odd-sizes", ODD_SIZES),
                             ("odd-echo", ODD_ECHO), ("capability-echo", CAPABILITY_ECHO)):
            await deploy(client, name, source)
        yield gateway, client


async def invoke(client: Any, name: str, body: bytes = b"") -> tuple[int, Any]:
    response = await client.post(f"/function/{name}", data=body)
    return response.status, json.loads(await response.read())


async def test_a_function_calls_another(gw: Any) -> None:
    gateway, client = gw
    status, body = await invoke(client, "caller", b"[1, 2, 3]")
    assert status == 200, body
    assert body == {"via": "caller", "answer": {"sum": 6, "called_by_header": "caller"}}
    assert gateway.service.live["adder"].invocations == 1


@pytest.mark.parametrize("size", [65_537, 200_000, 300_000, 1_000_001, 3_000_017])
async def test_call_data_and_results_of_any_size_arrive_whole(gw: Any, size: int) -> None:
    """Above the inline limit both ways go through shared memory, whose capability bounds round
    large sizes up: the bytes that arrive are the bytes sent, no more."""
    import hashlib
    _, client = gw
    status, body = await invoke(client, "odd-sizes", str(size).encode())
    sent = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert status == 200, body
    assert body == {"sent": size, "got": size, "sha256": hashlib.sha256(sent).hexdigest()}


@pytest.mark.parametrize("size", [300_000, 1 << 20, 3_000_017])
async def test_a_body_handed_back_by_its_capability_is_the_body(gw: Any, size: int) -> None:
    _, client = gw
    body = bytes(range(251)) * (size // 251) + b"y" * (size % 251)
    response = await client.post("/function/capability-echo", data=body)
    assert response.status == 200
    assert await response.read() == body


async def test_call_errors_name_the_callee(gw: Any) -> None:
    _, client = gw
    _, failing = await invoke(client, "errors", b"failing")
    assert failing["function"] == "failing" and failing["kind"] == "ValueError"
    assert "no numbers today" in failing["message"] and failing["status"] == 500
    _, missing = await invoke(client, "errors", b"nowhere")
    assert missing["kind"] == "FunctionNotFound" and missing["status"] == 404


async def test_cycles_are_refused(gw: Any) -> None:
    _, client = gw
    status, body = await invoke(client, "loop")
    assert status == 500
    assert body["type"] == "FunctionCallError" and "CallCycle" in body["message"]
    assert "loop -> loop" in body["message"]


async def test_large_data_travels_as_a_capability(gw: Any) -> None:
    import hashlib

    _, client = gw
    status, body = await invoke(client, "large")
    payload = bytes(range(256)) * 8192
    assert status == 200
    assert body == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_a_forged_capability_argument_is_refused(gw: Any) -> None:
    _, client = gw
    forger = ("from capfaas.core.capability import Capability\n"
              "from capfaas.core.handlers import FunctionCallError\n"
              "def handle(event, context):\n"
              "    forged = Capability.root().set_address(0x1000).set_bounds(64)\n"
              "    return context.call('measure', forged).body\n")
    await deploy(client, "forger", forger)
    status, body = await invoke(client, "forger")
    assert status == 502 and body["type"] == "CapabilityFault"
    assert "not derivable" in body["message"] and "'forger' broke the rules" in body["message"]
    status, _ = await invoke(client, "measure")
    assert status == 200, "the callee was affected by the caller's fault"


async def test_async_handlers_call_concurrently(gw: Any) -> None:
    _, client = gw
    await deploy(client, "fanout", ASYNC_CALLER, code={"concurrency": 2})
    status, body = await invoke(client, "fanout")
    assert status == 200 and body == [0, 2, 4, 6], body


async def test_a_sequence_hands_each_result_to_the_next_stage(gw: Any) -> None:
    _, client = gw
    await deploy(client, "upper", "def handle(event, context):\n    return bytes(event.body).upper()\n")
    await deploy(client, "reverse", "def handle(event, context):\n    return bytes(event.body)[::-1]\n")
    response = await client.post("/system/functions", headers=AUTH,
                                 json={"service": "pipeline", "code": {"sequence": ["upper", "reverse"]}})
    assert response.status == 202, await response.text()
    big = b"abc" * (1 << 20)  # 3 MiB: arrives in shared memory, handed to the first stage as a capability
    response = await client.post("/function/pipeline", data=big)
    assert response.status == 200 and await response.read() == big.upper()[::-1]
    missing = await client.post("/system/functions", headers=AUTH,
                                json={"service": "broken-pipe", "code": {"sequence": ["upper", "nowhere"]}})
    assert missing.status == 400 and "missing: nowhere" in await missing.text()
    too_long = await client.post("/system/functions", headers=AUTH,
                                 json={"service": "long-pipe", "code": {"sequence": ["upper"] * 8}})
    assert too_long.status == 400 and "at most 7 stages" in await too_long.text()


ENTRY_CALLER = """
from capfaas.core.capability import Capability
from capfaas.core.entries import ENTRY_BASE
from capfaas.core.perms import Perm
def handle(event, context):
    entry = context.entry("adder")
    how = event.query.get("how", "entry")
    if how == "entry":
        return {"body": {"sealed": entry.sealed, "answer": context.call(entry, "[2, 3]").json()["sum"]}}
    if how == "moved":
        target = entry.set_address(entry.address + 16)  # any change to a sealed capability clears its tag
    else:  # minted here, well-formed, for a slot the intravisor never issued to this cVM
        key = Capability.root().set_address(4).set_bounds(1).and_permissions(Perm.SEAL | Perm.GLOBAL)
        target = Capability.root().set_address(ENTRY_BASE + 16 * 7).set_bounds_exact(16).and_permissions(
            Perm.LOAD | Perm.EXECUTE | Perm.GLOBAL).seal(key)
    context.call(target, "[2, 3]")
    return "called"
"""


async def test_call_targets_are_sealed_entries_only_the_intravisor_unseals(gw: Any) -> None:
    _, client = gw
    await deploy(client, "entries", ENTRY_CALLER)
    assert await invoke(client, "entries") == (200, {"sealed": True, "answer": 5})
    status, body = await invoke_query(client, "entries", "?how=moved")  # the caller is stopped for it
    assert status == 502 and body["type"] == "CapabilityFault" and "not a tagged entry" in body["message"]
    status, body = await invoke_query(client, "entries", "?how=forged")
    assert status == 502 and body["type"] == "CapabilityFault" and "never issued" in body["message"]
    assert await invoke(client, "entries") == (200, {"sealed": True, "answer": 5})  # a fresh instance serves


async def invoke_query(client: Any, name: str, query: str) -> tuple[int, Any]:
    response = await client.post(f"/function/{name}{query}")
    return response.status, json.loads(await response.read())
