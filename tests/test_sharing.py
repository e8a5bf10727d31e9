"""Shared objects between cVMs: zero-copy CAP_Calls, CAP_Files with grants and revocation."""
from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from capfaas.core.shared import SHARED_AREA_BASE

from .gateway_support import AUTH, deploy, running_gateway

SENDER = """
import hashlib
def handle(event, context):
    size = int(event.query.get("size", 32 << 20))
    buffer = context.buffer(size)
    buffer.view[:] = bytes(range(256)) * (size // 256)
    answer = context.call("inspector", buffer)
    return {"body": {"sent_address": buffer.capability.address, "sha256": hashlib.sha256(buffer.view).hexdigest(),
                     "answer": answer.json()}}
"""

INSPECTOR = """
import hashlib
from capfaas.core.perms import Perm
def handle(event, context):
    cap = event.capability
    try:
        event.body[0] = 1
        written = True
    except TypeError:
        written = False
    return {"body": {"address": cap.address, "length": len(event.body), "may_store": bool(cap.perms & Perm.STORE),
                     "written": written, "sha256": hashlib.sha256(event.body).hexdigest()}}
"""

PRODUCER = """
def handle(event, context):
    return bytes(range(256)) * 4096  # 1 MiB result for a calling function
"""

CONSUMER = """
import hashlib
def handle(event, context):
    answer = context.call("producer")
    return {"body": {"address": answer.capability.address if answer.capability is not None else None,
                     "sha256": hashlib.sha256(answer.body).hexdigest()}}
"""

OWNER = """
from capfaas.core.faults import CapabilityFault
def handle(event, context):
    action = event.query["do"]
    if action == "create":
        f = context.files.create("notes", 4096, b"hello, capabilities")
        context.files.grant("notes", "reader")
        context.files.grant("notes", "writer", write=True)
        return {"body": {"name": f.name, "size": f.size}}
    if action == "overflow":
        with open("/cap/notes", "r+b") as f:
            f.seek(4090)
            try:
                f.write(b"0123456789")
            except CapabilityFault as exc:
                return {"body": {"fault": type(exc).__name__, "message": str(exc)}}
        return "no fault"
    if action == "delete":
        context.files.delete("notes")
        return "deleted"
    if action == "list":
        return {"body": context.files.list()}
"""

READER = """
from capfaas.core.faults import CapabilityFault
KEPT = {}
def handle(event, context):
    action = event.query["do"]
    if action == "read":
        with open("/cap/notes", "rb") as f:
            return f.read(19)
    if action == "text":
        with open("/cap/notes") as f:
            return f.read().rstrip("\\0")
    if action == "write":
        try:
            open("/cap/notes", "r+b")
        except PermissionError as exc:
            return {"body": {"refused": str(exc)}}
        return "opened for writing"
    if action == "view":
        view = context.files.open("notes").view()
        try:
            view[0] = 0
        except TypeError as exc:
            return {"body": {"readonly": view.readonly, "error": str(exc)}}
        return "wrote through a read-only grant"
    if action == "keep":
        KEPT["file"] = context.files.open("notes")
        return KEPT["file"].read(5)
    if action == "reuse":
        try:
            KEPT["file"].seek(0)
            return KEPT["file"].read(5)
        except CapabilityFault as exc:
            return {"body": {"fault": type(exc).__name__, "message": str(exc)}}
    if action == "keep-view":
        KEPT["view"] = context.files.open("notes").view()
        return bytes(KEPT["view"][:5])
    if action == "reuse-view":
        return bytes(KEPT["view"][:5])
"""

WRITER = """
def handle(event, context):
    with open("/cap/notes", "r+b") as f:
        f.write(event.body)
    return "ok"
"""

STRANGER = """
def handle(event, context):
    try:
        open("/cap/notes", "rb")
    except PermissionError as exc:
        return {"body": {"refused": str(exc)}}
    return "opened"
"""


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Any]:
    async with running_gateway(tmp_path / "state") as (gateway, client):
        for name, source in (("sender", SENDER), ("inspector", INSPECTOR), ("producer", PRODUCER),
                             ("consumer", CONSUMER), ("owner", OWNER), ("reader", READER), ("writer", WRITER),
                             ("stranger", STRANGER)):
            await deploy(client, name, source)
        yield gateway, client


async def call(client: Any, name: str, query: str = "", body: bytes = b"") -> tuple[int, Any]:
    response = await client.post(f"/function/{name}{query}", data=body)
    raw = await response.read()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


async def test_a_call_hands_a_shared_buffer_over_without_a_copy(gw: Any) -> None:
    _, client = gw
    status, body = await call(client, "sender", "?size=33554432")
    assert status == 200, body
    answer = body["answer"]
    assert answer["address"] == body["sent_address"] >= SHARED_AREA_BASE  # the same bytes, not a copy
    assert answer["length"] == 32 << 20 and answer["sha256"] == body["sha256"]
    assert not answer["may_store"] and not answer["written"]  # the callee's grant is read-only


async def test_a_large_result_comes_back_to_the_caller_as_a_grant(gw: Any) -> None:
    _, client = gw
    status, body = await call(client, "consumer")
    assert status == 200, body
    assert body["address"] is not None and body["address"] >= SHARED_AREA_BASE
    import hashlib
    assert body["sha256"] == hashlib.sha256(bytes(range(256)) * 4096).hexdigest()


async def test_cap_files_are_files_with_grants(gw: Any) -> None:
    gateway, client = gw
    status, body = await call(client, "owner", "?do=create")
    assert status == 200 and body == {"name": "/cap/notes", "size": 4096}
    assert (await call(client, "reader", "?do=read")) == (200, b"hello, capabilities")
    assert (await call(client, "reader", "?do=text")) == (200, b"hello, capabilities")
    status, body = await call(client, "reader", "?do=write")
    assert status == 200 and "read-write grant" in body["refused"]
    status, body = await call(client, "reader", "?do=view")
    assert body["readonly"] is True
    status, body = await call(client, "stranger")
    assert "holds no read grant" in body["refused"]
    assert (await call(client, "writer", body=b"HELLO"))[0] == 200
    assert (await call(client, "reader", "?do=read"))[1] == b"HELLO, capabilities"
    status, body = await call(client, "owner", "?do=overflow")
    assert body["fault"] == "BoundsFault" and "outside the capability's bounds" in body["message"]
    listed = await (await client.get("/system/files", headers=AUTH)).json()
    assert listed == [{"name": "notes", "size": 4096, "owner": "owner", "readers": ["reader"], "writers": ["writer"]}]
    assert (await call(client, "owner", "?do=list"))[1][0]["name"] == "notes"


async def test_deleting_a_cap_file_revokes_it_for_every_holder(gw: Any) -> None:
    gateway, client = gw
    await call(client, "owner", "?do=create")
    assert (await call(client, "reader", "?do=keep")) == (200, b"hello")
    assert (await call(client, "owner", "?do=delete")) == (200, b"deleted")
    status, body = await call(client, "reader", "?do=reuse")
    assert body["fault"] == "TagFault" and "revoked" in body["message"]
    status, body = await call(client, "reader", "?do=read")
    assert status == 500 and body["type"] == "FileNotFoundError"
    assert await (await client.get("/system/files", headers=AUTH)).json() == []


async def test_a_raw_view_of_a_revoked_cap_file_faults_the_holder_alone(gw: Any) -> None:
    gateway, client = gw
    await call(client, "owner", "?do=create")
    assert (await call(client, "reader", "?do=keep-view")) == (200, b"hello")
    response = await client.delete("/system/files/notes", headers=AUTH)
    assert response.status == 200
    status, body = await call(client, "reader", "?do=reuse-view")
    assert status == 502 and "SIGBUS" in body["message"]
    assert (await call(client, "owner", "?do=list")) == (200, [])  # everyone else serves on


async def test_a_deployment_declares_cap_files(gw: Any) -> None:
    _, client = gw
    declared = [{"name": "config", "size": 64, "contents": base64.b64encode(b"threshold=3").decode(),
                 "grants": {"reader": "r"}}]
    source = "def handle(event, context):\n    return open('/cap/config', 'rb').read(11)\n"
    await deploy(client, "configured", source, capFiles=declared)
    assert (await call(client, "configured")) == (200, b"threshold=3")
    listed = await (await client.get("/system/files", headers=AUTH)).json()
    assert listed[0]["owner"] == "configured" and listed[0]["readers"] == ["reader"]
    bad = [{"name": "../x", "size": 1}]
    response = await deploy(client, "broken", source, capFiles=bad, expect=400)
    assert "invalid CAP_File name" in await response.text()
    response = await client.delete("/system/functions", json={"functionName": "configured"}, headers=AUTH)
    assert response.status == 200
    assert await (await client.get("/system/files", headers=AUTH)).json() == []


async def test_a_sequence_hands_one_shared_copy_of_the_body_through_every_stage(gw: Any) -> None:
    _, client = gw
    stage = ("def handle(event, context):\n"
             "    print(hex(event.capability.address), len(event.body), flush=True)\n"
             "    return event.capability\n")
    for name in ("one", "two", "three"):
        await deploy(client, name, stage)
    response = await client.post("/system/functions", headers=AUTH,
                                 json={"service": "pipeline", "code": {"sequence": ["one", "two", "three"]}})
    assert response.status == 202, await response.text()
    body = bytes(range(256)) * (16 << 12)  # 16 MiB
    response = await client.post("/function/pipeline", data=body)
    assert response.status == 200 and await response.read() == body
    seen = set()
    for name in ("one", "two", "three"):
        logs = await (await client.get(f"/system/logs?name={name}", headers=AUTH)).text()
        (line,) = [json.loads(entry)["text"] for entry in logs.splitlines()]
        address, length = line.split()
        assert int(length) == len(body)
        seen.add(int(address, 16))
    (address,) = seen  # every stage read the very bytes the gateway wrote: no copy between them
    assert address >= SHARED_AREA_BASE


STREAM_COUNTER = """
import hashlib, resource
def handle(event, context):
    if event.stream is None:
        return {"body": {"streamed": False, "bytes": len(event.body)}}
    digest, total = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    while n := event.stream.readinto(buffer):
        digest.update(memoryview(buffer)[:n])
        total += n
    return {"body": {"streamed": True, "bytes": total, "sha256": digest.hexdigest(),
                     "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}
"""


async def test_a_chunked_request_streams_into_the_function_in_bounded_memory(gw: Any) -> None:
    import hashlib
    _, client = gw
    await deploy(client, "counter", STREAM_COUNTER, limits={"memory": "256Mi"})
    block = bytes(range(256)) * 4096
    blocks = 192  # 192 MiB, more than the function's memory limit could hold next to its runtime

    async def chunks() -> Any:
        for _ in range(blocks):
            yield block

    response = await client.post("/function/counter", data=chunks())
    body = await response.json()
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(block)
    assert response.status == 200, body
    assert body["streamed"] and body["bytes"] == blocks * len(block) and body["sha256"] == expected.hexdigest()
    assert body["peak_rss"] < 96 << 20  # the body never was in the function's memory at once
    small = await client.post("/function/counter", data=b"x" * 10)
    assert (await small.json()) == {"streamed": False, "bytes": 10}


async def test_a_function_that_stops_reading_its_stream_leaves_the_gateway_serving(gw: Any) -> None:
    _, client = gw
    await deploy(client, "quitter", "def handle(event, context):\n    return event.stream.read(5)\n")

    async def chunks() -> Any:
        for _ in range(64):
            yield bytes(1 << 20)

    response = await client.post("/function/quitter", data=chunks())
    assert response.status == 200 and await response.read() == bytes(5)
    again = await client.post("/function/quitter", data=chunks())
    assert again.status == 200


STREAMER = """
import hashlib
def handle(event, context):
    blocks = int(event.query.get("blocks", "4"))
    fail_at = int(event.query.get("fail_at", "-1"))
    def body():
        block = bytes(range(256)) * 4096
        for i in range(blocks):
            if i == fail_at:
                raise RuntimeError("the source ran dry")
            yield block
        yield context.call("producer").body[:16]  # requests still work while streaming
    return {"headers": {"Content-Type": "application/x-blocks"}, "body": body()}
"""

ASYNC_STREAMER = """
import asyncio
async def handle(event, context):
    async def body():
        for word in ("streamed ", "from ", "an ", "async ", "generator"):
            await asyncio.sleep(0)
            yield word
    return body()
"""


async def test_a_generator_streams_its_response_chunked(gw: Any) -> None:
    import hashlib
    import aiohttp
    _, client = gw
    await deploy(client, "streamer", STREAMER, limits={"memory": "128Mi"})
    await deploy(client, "astreamer", ASYNC_STREAMER)
    blocks = 192  # 192 MiB: more than the function's memory limit, so it never held all of it
    response = await client.post(f"/function/streamer?blocks={blocks}")
    assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["Content-Type"] == "application/x-blocks"
    digest, total = hashlib.sha256(), 0
    async for chunk in response.content.iter_chunked(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(bytes(range(256)) * 4096)
    expected.update(bytes(range(16)))
    assert total == blocks * (1 << 20) + 16 and digest.hexdigest() == expected.hexdigest()
    response = await client.post("/function/astreamer")
    assert await response.read() == b"streamed from an async generator"
    broken = await client.post("/function/streamer?blocks=8&fail_at=3")
    assert broken.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await broken.read()  # cut off: the client can tell the body is incomplete
    logs = await (await client.get("/system/logs?name=streamer", headers=AUTH)).text()
    assert "the source ran dry" in logs
    again = await client.post("/function/streamer?blocks=1")
    assert again.status == 200 and len(await again.read()) == (1 << 20) + 16


PIPE_SOURCE = """
from capfaas.core.handlers import FunctionCallError
def handle(event, context):
    target = event.query.get("to", "sink")
    chunk = bytes(range(256)) * 256  # 64 KiB writes
    try:
        with context.stream_call(target) as stream:
            for _ in range(int(event.query.get("chunks", "1024"))):
                stream.write(chunk)
    except BrokenPipeError:
        return {"body": {"broken": True, "answer": stream.result.text}}
    except FunctionCallError as exc:
        return {"body": {"error": exc.kind, "status": exc.status}}
    return stream.result.body
"""

PIPE_SINK = """
import hashlib
def handle(event, context):
    if event.query.get("peek"):
        return event.stream.read(5)
    digest, total, buffer = hashlib.sha256(), 0, bytearray(1 << 16)
    while n := event.stream.readinto(buffer):
        digest.update(memoryview(buffer)[:n])
        total += n
    return {"body": {"bytes": total, "sha256": digest.hexdigest()}}
"""


async def test_a_function_streams_to_another_through_a_cap_stream(gw: Any) -> None:
    import hashlib
    _, client = gw
    await deploy(client, "source", PIPE_SOURCE)
    await deploy(client, "sink", PIPE_SINK)
    await deploy(client, "peeker", PIPE_SINK.replace('event.query.get("peek")', "True"))
    status, body = await call(client, "source", "?chunks=1024")  # 64 MiB, 16 times the ring
    expected = hashlib.sha256(bytes(range(256)) * 256 * 1024).hexdigest()
    assert status == 200 and body == {"bytes": 64 << 20, "sha256": expected}
    status, body = await call(client, "source", "?to=peeker")
    assert status == 200 and body == {"broken": True, "answer": "\x00\x01\x02\x03\x04"}  # it read 5 bytes, then left
    status, body = await call(client, "source", "?to=nowhere&chunks=1")
    assert status == 200 and body == {"error": "FunctionNotFound", "status": 404}


HOARDER = """
def handle(event, context):
    files = []
    for i in range(6):
        try:
            with context.files.create(f"hoard{i}", 256 << 20):  # closing it unmaps it here
                files.append("created")
        except MemoryError as exc:
            files.append(str(exc))
    answers = []
    for _ in range(3):  # asks straight, never mapping what it gets
        reply = context.caller.request({"op": "buffer", "size": 300 << 20})
        answers.append(reply.get("error", {}).get("type", "granted"))
        if "grant" in reply:
            context.caller.grants.accept(reply["grant"], transient=True)
    return {"body": {"buffers": answers, "files": files}}
"""


async def test_shared_memory_is_bounded_per_invocation_and_per_function(gw: Any) -> None:
    _, client = gw
    await deploy(client, "hoarder", HOARDER)
    status, body = await call(client, "hoarder")
    assert status == 200, body
    assert body["buffers"] == ["granted", "MemoryError", "MemoryError"]
    assert body["files"][:4] == ["created"] * 4 and "allowance per function" in body["files"][4]
    assert (await call(client, "sender", "?size=1048576"))[0] == 200  # others still get buffers


async def test_a_client_that_leaves_a_stream_halfway_costs_only_that_instance(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", max_body=1 << 20) as (_, client):
        for name, source in (("streamer", STREAMER), ("producer", PRODUCER), ("counter", STREAM_COUNTER)):
            await deploy(client, name, source)
        response = await client.post("/function/streamer?blocks=256")  # 256 MiB: far more than is read
        assert len(await response.content.read(1 << 20)) > 0
        response.close()  # gone, with most of the stream unsent
        again = await client.post("/function/streamer?blocks=1")
        assert again.status == 200 and len(await again.read()) == (1 << 20) + 16

        async def too_much() -> Any:
            for _ in range(4):
                yield bytes(1 << 20)

        refused = await client.post("/function/counter", data=too_much())  # chunked, past max_body
        assert refused.status == 413 and "larger than 1048576 bytes" in await refused.text()
        small = await client.post("/function/counter", data=b"fine")
        assert (await small.json()) == {"streamed": False, "bytes": 4}


async def test_a_generator_is_sent_whole_where_no_stream_reaches_the_caller(gw: Any) -> None:
    _, client = gw
    await deploy(client, "gathered", ASYNC_STREAMER, code={"concurrency": 2})  # one channel, several invocations
    response = await client.post("/function/gathered")
    assert response.status == 200 and "Transfer-Encoding" not in response.headers
    assert await response.read() == b"streamed from an async generator"


async def test_concurrent_sequences_with_one_call_id_keep_their_own_buffers(gw: Any) -> None:
    import asyncio
    _, client = gw
    stage = "def handle(event, context):\n    return event.capability\n"
    await deploy(client, "pass", stage)
    response = await client.post("/system/functions", headers=AUTH,
                                 json={"service": "piped", "code": {"sequence": ["pass", "pass"]},
                                       "labels": {"com.openfaas.scale.max": "4"}})
    assert response.status == 202, await response.text()
    bodies = [bytes([i]) * (8 << 20) for i in range(4)]
    responses = await asyncio.gather(*(client.post("/function/piped", data=body, headers={"X-Call-Id": "same"})
                                       for body in bodies))
    assert [r.status for r in responses] == [200] * 4
    assert [await r.read() for r in responses] == bodies


HALVES = """
def handle(event, context):
    buffer = context.buffer(2 << 20)
    buffer.view[:1 << 20] = b"s" * (1 << 20)  # a secret half, kept
    buffer.view[1 << 20:] = b"p" * (1 << 20)  # the half it hands over
    public = buffer.capability.set_address(buffer.capability.base + (1 << 20)).set_bounds(1 << 20)
    answer = context.call("peeker", public)
    return {"body": {"answer": answer.text}}
"""

PEEKER = """
from capfaas.core.capability import Capability
from capfaas.core.perms import Perm
def handle(event, context):
    cap = event.capability
    mapped = [g.mapped_size for g in context.caller.grants.held.values()]
    if event.query.get("steal"):
        return Capability.root().set_address(cap.base - (1 << 20)).set_bounds(1 << 20).and_permissions(
            Perm.LOAD | Perm.GLOBAL)  # the caller's other half, claimed
    return f"{cap.top - cap.base} {bytes(event.body[:1]).decode()} {mapped}"
"""


async def test_a_callee_is_granted_just_the_argument_not_the_buffer_around_it(gw: Any) -> None:
    _, client = gw
    await deploy(client, "halves", HALVES)
    await deploy(client, "peeker", PEEKER)
    status, body = await call(client, "halves")
    assert status == 200 and body["answer"] == f"{1 << 20} p [{1 << 20}]"  # one MiB mapped, not two
    stealer = HALVES.replace('context.call("peeker", public)', 'context.call("peeker", public, headers={})')
    await deploy(client, "stealer", stealer.replace('"peeker"', '"peeker-steals"'))
    await deploy(client, "peeker-steals", PEEKER.replace('event.query.get("steal")', "True"))
    status, body = await call(client, "stealer")
    assert status == 500 and body["type"] == "FunctionCallError"
    assert "CapabilityFault" in body["message"] and "not derivable" in body["message"]
