"""Invocations answered off the socket (gateway/fastpath.py), and connections handed to aiohttp.

Each test speaks HTTP over a real socket to a gateway served as `capfaas serve` serves it, so it
sees what a client sees: the same answers whichever front end serves a request, responses in
order on one keep-alive connection, and the connection handed over intact.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from capfaas.core.cvm import State
from capfaas.gateway.warm import LEAVE_GRACE

from .gateway_support import AUTH, FUNCTIONS, deploy, running_gateway

ECHO = (FUNCTIONS / "echo.py").read_text()
STREAMER = """
def handle(event, context):
    def parts():
        for i in range(3):
            yield f"part {i}\\n"
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": parts()}
"""
SIXTY_KIB = """
def handle(event, context):
    return b"y" * (60 << 10)
"""
BIG = """
def handle(event, context):
    return b"x" * (3 << 20)
"""


class Connection:
    """One keep-alive HTTP/1.1 connection, read a response at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readexactly(2)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Connection]:
    connection = await Connection.open(port)
    try:
        yield connection
    finally:
        connection.close()


def get(path: str, *extra: str, body: bytes = b"", method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: gateway", *extra]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
async def gateway(tmp_path: Path) -> Any:
    async with running_gateway(tmp_path / "state", keepalive_timeout=1.0) as (gw, client):
        await deploy(client, "echo", ECHO)
        yield gw, client


def aiohttp_connections(client: Any) -> int:
    """Connections aiohttp's own server holds: those handed over to it."""
    return len(client.server.runner.server.connections)


async def test_an_invocation_is_answered_without_aiohttp_and_another_route_hands_the_connection_over(
        gateway: Any) -> None:
    _, client = gateway
    before = aiohttp_connections(client)  # the test client's own, used to deploy
    async with connected(client.server.port) as connection:
        connection.send(get("/function/echo/a/b?x=1&y=two+words", "X-Call-Id: call-1", body=b"hi", method="POST"))
        status, headers, body = await connection.response()
        assert status == 200 and headers["x-call-id"] == "call-1" and headers["x-served-by"] == "capfaas"
        assert json.loads(body)["path"] == "/a/b" and json.loads(body)["query"] == {"x": "1", "y": "two words"}
        assert aiohttp_connections(client) == before  # answered by the fast path
        connection.send(get("/system/info", f"Authorization: {AUTH['Authorization']}"))
        status, _, body = await connection.response()
        assert status == 200 and json.loads(body)["provider"]["provider"] == "capfaas"
        assert aiohttp_connections(client) == before + 1  # the same connection, now aiohttp's
        connection.send(get("/function/echo", body=b"again", method="POST"))
        status, _, body = await connection.response()
        assert status == 200 and json.loads(body)["body"] == "again"


async def test_both_front_ends_give_a_function_the_same_request(gateway: Any) -> None:
    """The same request, once plain (fast path) and once as HTTP/1.0 (aiohttp's): the function
    sees the same, and the response has the same headers (values that differ per call aside)."""
    _, client = gateway
    seen = []
    names = []
    for version in ("1.1", "1.0"):
        async with connected(client.server.port) as connection:
            connection.send(get("/function/echo/p?a=1&a=2&b=&c", "X-One: 1", "x-two: " + "été".encode().decode("latin-1"),
                                "X-Bytes: caf\xe9", "Authorization: Basic c2VjcmV0", "Connection: keep-alive",
                                body=b"payload", method="PUT", version=version))
            status, headers, body = await connection.response()
            assert status == 200
            names.append(set(headers) - {"connection", "keep-alive"})
            seen.append((json.loads(body), {k: v for k, v in headers.items() if k not in ("date", "x-call-id",
                                                                                         "x-start-time", "x-duration-seconds", "x-cold-start",
                                                                                         "connection", "keep-alive")}))
    assert seen[0] == seen[1]
    assert names[0] == names[1] and {"x-call-id", "x-start-time", "x-duration-seconds", "x-cold-start"} <= names[0]
    event = seen[0][0]
    assert event["method"] == "PUT" and event["query"] == {"a": "1", "b": "", "c": ""}
    assert event["headers"]["x-two"] == "été" and event["headers"]["X-Bytes"] == "caf\xe9"
    assert "Authorization" not in event["headers"] and "Host" not in event["headers"]


async def test_pipelined_requests_are_answered_in_order_across_a_hand_over(gateway: Any) -> None:
    _, client = gateway
    async with connected(client.server.port) as connection:
        connection.send(get("/function/echo", body=b"1", method="POST") + get("/function/echo", body=b"2", method="POST")
                        + get("/healthz") + get("/function/echo", body=b"3", method="POST"))
        answers = [await connection.response() for _ in range(4)]
        assert [status for status, _, _ in answers] == [200] * 4
        assert [json.loads(answers[i][2])["body"] for i in (0, 1, 3)] == ["1", "2", "3"]
        assert answers[2][2] == b"OK\n"


async def test_many_requests_in_one_write_are_all_answered_in_order(gateway: Any) -> None:
    """More than MAX_PIPELINED at once: the connection stops reading until they are answered."""
    _, client = gateway
    async with connected(client.server.port) as connection:
        connection.send(b"".join(get("/function/echo", body=b"%d" % i, method="POST") for i in range(200)))
        bodies = [json.loads((await connection.response())[2])["body"] for _ in range(200)]
        assert bodies == [str(i) for i in range(200)]
        connection.send(get("/function/echo", body=b"after", method="POST"))
        assert json.loads((await connection.response())[2])["body"] == "after"


@pytest.mark.parametrize("seed", range(6))
async def test_mixed_requests_cut_anywhere_are_answered_in_order(gateway: Any, seed: int) -> None:
    """Invocations and other routes pipelined, the bytes sent in random pieces: whichever request
    the connection is handed over at, every answer comes, in order."""
    _, client = gateway
    chance = random.Random(seed)
    requests, expected = [], []
    for i in range(12):
        kind = chance.choice(["fast", "fast", "healthz", "encoded", "http10"])
        if kind == "fast":
            requests.append(get("/function/echo", body=b"n%d" % i, method="POST"))
        elif kind == "healthz":
            requests.append(get("/healthz"))
        elif kind == "encoded":
            requests.append(get("/function/echo/%41", body=b"n%d" % i, method="POST"))
        else:
            requests.append(get("/function/echo", "Connection: keep-alive", body=b"n%d" % i, method="POST",
                                version="1.0"))
        expected.append(b"OK\n" if kind == "healthz" else f"n{i}")
    stream = b"".join(requests)
    cuts = sorted(chance.sample(range(1, len(stream)), 5))
    async with connected(client.server.port) as connection:
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            connection.send(stream[start:end])
            await connection.writer.drain()
            await asyncio.sleep(chance.choice([0, 0.005]))
        for want in expected:
            status, _, body = await connection.response()
            assert status == 200
            assert (body if want == b"OK\n" else json.loads(body)["body"]) == want


async def test_a_client_that_does_not_read_its_answers_is_not_answered_into_memory(gateway: Any) -> None:
    """Pipelined requests whose answers are never read: the gateway stops answering once its send
    buffer is full, rather than holding every answer in memory."""
    _, client = gateway
    await deploy(client, "sixty", SIXTY_KIB)
    async with connected(client.server.port) as connection:
        connection.send(get("/function/sixty") * 400)  # 24 MiB of answers
        await asyncio.sleep(1.5)
        held = [protocol._transport.get_write_buffer_size() for protocol in client.server.runner.server._open]
        assert held and max(held) < 1 << 20, held
        for _ in range(400):  # read now, every answer comes
            status, _, body = await connection.response()
            assert status == 200 and body == b"y" * (60 << 10)


async def test_a_request_arriving_in_pieces_is_served_whole(gateway: Any) -> None:
    _, client = gateway
    async with connected(client.server.port) as connection:
        request = get("/function/echo", body=b"in pieces", method="POST")
        for start in range(0, len(request), 7):
            connection.send(request[start:start + 7])
            await connection.writer.drain()
            await asyncio.sleep(0.01)
        status, _, body = await connection.response()
        assert status == 200 and json.loads(body)["body"] == "in pieces"


async def test_errors_come_as_through_aiohttp(gateway: Any) -> None:
    _, client = gateway
    async with connected(client.server.port) as connection:
        connection.send(get("/function/nothing-here"))
        status, headers, body = await connection.response()
        assert status == 404 and b"'nothing-here' not found" in body and headers["content-type"].startswith("text/plain")
        connection.send(b"GET /function/echo HTTP/1.1\r\nBad Header: x\r\n\r\n")
        status, _, _ = await connection.response()
        assert status == 400


async def test_streamed_and_large_answers(gateway: Any) -> None:
    _, client = gateway
    await deploy(client, "streamer", STREAMER)
    await deploy(client, "big", BIG)
    before = aiohttp_connections(client)
    async with connected(client.server.port) as connection:
        connection.send(get("/function/streamer"))
        status, headers, body = await connection.response()
        assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"part 0\npart 1\npart 2\n"
        connection.send(get("/function/big"))
        status, headers, body = await connection.response()
        assert status == 200 and body == b"x" * (3 << 20) and headers["content-type"] == "application/octet-stream"
        assert aiohttp_connections(client) == before


async def test_connection_close_and_idle_connections_are_closed(gateway: Any) -> None:
    _, client = gateway
    async with connected(client.server.port) as connection:
        connection.send(get("/function/echo", "Connection: close"))
        status, headers, _ = await connection.response()
        assert status == 200 and headers["connection"] == "close"
        assert await connection.closed()
    async with connected(client.server.port) as connection:
        connection.send(get("/function/echo"))
        assert (await connection.response())[0] == 200
        started = time.monotonic()
        assert await connection.closed()  # after keepalive_timeout (1 s)
        assert 0.8 < time.monotonic() - started < 5


def count_tasks_of_invocations(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Names of the coroutines the gateway's invocation code starts as tasks from now on."""
    started: list[str] = []
    default = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_filename.rsplit("/", 1)[-1] in ("fastpath.py", "warm.py", "app.py",
                                                                        "intravisor.py", "cvm.py"):
            started.append(code.co_qualname)
        return default(loop, coro, **kwargs) if default else asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    return started


async def test_a_warm_invocation_is_answered_without_a_task(gateway: Any) -> None:
    """Request to response by callbacks: a task per invocation cost the gateway more CPU than the
    rest of a quick invocation's bookkeeping."""
    _, client = gateway
    loop = asyncio.get_running_loop()
    async with connected(client.server.port) as first, connected(client.server.port) as second:
        for connection in (first, second):  # two instances, warm now
            connection.send(get("/function/echo"))
        for connection in (first, second):
            assert (await connection.response())[0] == 200
        started = count_tasks_of_invocations(loop)
        try:
            for round in range(20):
                for connection in (first, second):
                    connection.send(get(f"/function/echo?round={round}", body=b"x", method="POST"))
                for connection in (first, second):
                    status, _, body = await connection.response()
                    assert status == 200 and json.loads(body)["query"] == {"round": str(round)}
        finally:
            loop.set_task_factory(None)
    assert started == []


async def test_warm_invocations_leave_no_reference_cycles(gateway: Any) -> None:
    """Each answered invocation is freed as it ends, not left to the cycle collector, whose
    pauses would show in the tail latency."""
    import gc

    _, client = gateway
    await deploy(client, "sleepy", (FUNCTIONS / "sleepy.py").read_text())
    async with connected(client.server.port) as connection:
        connection.send(get("/function/sleepy?seconds=0.001"))  # too slow for a busy-wait: through the event loop
        assert (await connection.response())[0] == 200
        gc.collect()
        gc.disable()
        try:
            for _ in range(200):
                connection.send(get("/function/sleepy?seconds=0.001"))
                assert (await connection.response())[0] == 200
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 100, f"{garbage} objects in reference cycles after 200 invocations"


async def test_a_client_that_leaves_while_queued_frees_its_place(gateway: Any) -> None:
    """A request waiting for the only instance goes away: the instance is not handed to it, and
    the next request is served as soon as the instance is free."""
    _, client = gateway
    await deploy(client, "sleepy", (FUNCTIONS / "sleepy.py").read_text(), labels={"com.openfaas.scale.max": "1"})
    async with connected(client.server.port) as busy:
        busy.send(get("/function/sleepy?seconds=0"))
        assert (await busy.response())[0] == 200
        busy.send(get("/function/sleepy?seconds=0.5"))
        leaving = await Connection.open(client.server.port)
        leaving.send(get("/function/sleepy?seconds=0"))
        await asyncio.sleep(0.2)  # queued behind the busy one
        leaving.close()
        assert (await busy.response())[0] == 200
        started = time.monotonic()
        busy.send(get("/function/sleepy?seconds=0"))
        status, _, body = await busy.response()
        assert status == 200 and body == b"slept 0 s\n" and time.monotonic() - started < 2
    gateway_state, _ = gateway
    pool = gateway_state.service.get("sleepy").pool
    assert not [waiter for waiter in pool.waiters if not waiter.done()] and len(pool.idle) == 1


async def test_a_client_that_leaves_a_quick_invocation_leaves_its_instance_serving(gateway: Any) -> None:
    """The client hangs up while its invocation runs: a reply within ``LEAVE_GRACE`` gives the
    instance back (no new one is started for the next request); one that takes longer has its
    cVM stopped, so that the next request does not wait for work nobody wants."""
    gateway_state, client = gateway
    await deploy(client, "sleepy", (FUNCTIONS / "sleepy.py").read_text(), labels={"com.openfaas.scale.max": "1"})
    async with connected(client.server.port) as first:
        first.send(get("/function/sleepy?seconds=0"))
        assert (await first.response())[0] == 200
    pool = gateway_state.service.get("sleepy").pool
    (instance,) = pool.instances
    quick = await Connection.open(client.server.port)
    quick.send(get(f"/function/sleepy?seconds={LEAVE_GRACE / 4}"))
    await asyncio.sleep(LEAVE_GRACE / 8)  # the invocation is under way
    quick.close()
    await asyncio.sleep(LEAVE_GRACE * 2)
    assert pool.instances == {instance} and pool.cold_starts == 1 and gateway_state.in_flight == 0
    slow = await Connection.open(client.server.port)
    slow.send(get("/function/sleepy?seconds=5"))
    await asyncio.sleep(LEAVE_GRACE / 2)
    slow.close()
    await asyncio.sleep(LEAVE_GRACE * 2)
    assert instance not in pool.instances and instance.state is State.STOPPED and gateway_state.in_flight == 0
    started = time.monotonic()
    async with connected(client.server.port) as after:
        after.send(get("/function/sleepy?seconds=0"))
        assert (await after.response())[0] == 200 and time.monotonic() - started < 2


async def test_a_request_queued_for_a_replaced_version_is_served_by_the_new_one(gateway: Any) -> None:
    """Waiting for the only instance of version 1 when version 2 is deployed: the request queues
    again at version 2 rather than fail, while the one in flight finishes on version 1."""
    _, client = gateway
    versioned = 'import time\ndef handle(event, context):\n    time.sleep(float(event.query.get("s", "0")))\n    return "v{v}"\n'
    await deploy(client, "ver", versioned.format(v=1), labels={"com.openfaas.scale.max": "1"})
    async with connected(client.server.port) as first, connected(client.server.port) as second:
        first.send(get("/function/ver"))
        assert (await first.response())[2] == b"v1"
        first.send(get("/function/ver?s=0.6"))
        await asyncio.sleep(0.1)
        second.send(get("/function/ver"))  # queued behind the first
        await asyncio.sleep(0.1)
        await deploy(client, "ver", versioned.format(v=2), method="PUT", labels={"com.openfaas.scale.max": "1"})
        assert (await first.response())[2] == b"v1"
        status, _, body = await second.response()
        assert (status, body) == (200, b"v2")
