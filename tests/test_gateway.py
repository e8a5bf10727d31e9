"""The HTTP gateway, in-process on a real port: every route, every bad input, auth, versions, async."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from capfaas.gateway.openapi import openapi_document

from .gateway_support import AUTH, FUNCTIONS, PASSWORD, deploy, deployment, ndjson, running_gateway


ECHO = (FUNCTIONS / "echo.py").read_text()
SLEEPY = (FUNCTIONS / "sleepy.py").read_text()
WORDCOUNT = (FUNCTIONS / "wordcount.py").read_text()

VERSIONED = """
import asyncio
async def handle(event, context):
    await asyncio.sleep(float(event.query.get("seconds", "0")))
    return "version {v}\\n"
"""

PRINTER = """
def handle(event, context):
    for line in event.text.splitlines():
        print(line)
    return "printed\\n"
"""

FAILING = """
import asyncio, os
async def handle(event, context):
    what = event.query.get("what")
    if what == "raise":
        raise ValueError("no such thing")
    if what == "sleep":
        await asyncio.sleep(10)
    if what == "exit":
        os._exit(3)
    if what == "header":
        return {"statusCode": 200, "headers": {"X-Bad": "a\\r\\nX-Injected: 1"}, "body": "x"}
    if what == "hop":
        return {"statusCode": 200, "headers": {"Transfer-Encoding": "chunked", "Connection": "close",
                                               "X-Fine": "yes"}, "body": "hop"}
    if what == "big":
        return "x" * (12 << 20)
    if what == "unicode":
        return {"statusCode": 200, "headers": {"X-Name": "caf\u00e9 \U0001F600"}, "body": "u"}
    if what == "status":
        return {"statusCode": int(event.query["code"]), "body": "s"}
    return {"statusCode": 418, "body": {"teapot": True}}
"""


@pytest.fixture
async def gw(tmp_path: Path) -> Any:
    async with running_gateway(tmp_path / "state", callback_backoff=0.05) as pair:
        yield pair


async def system(client: Any, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
    return await client.request(method, path, headers={**AUTH, **kw.pop("headers", {})}, **kw)


# -- open routes, info, OpenAPI ------------------------------------------------------------------

async def test_healthz_metrics_and_openapi_are_open(gw: Any) -> None:
    _, client = gw
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.text()).strip() == "OK"
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert (await response.json())["openapi"].startswith("3.")


async def test_system_info(gw: Any) -> None:
    _, client = gw
    response = await system(client, "GET", "/system/info")
    assert response.status == 200
    info = await response.json()
    assert info["provider"]["provider"] == "capfaas"
    assert {"sha", "release"} <= set(info["provider"]["version"])
    assert {"sha", "release", "commit_message"} <= set(info["version"])
    assert info["arch"]


SYSTEM_ROUTES = [("GET", "/system/info"), ("GET", "/system/functions"), ("POST", "/system/functions"),
                 ("PUT", "/system/functions"), ("DELETE", "/system/functions"), ("GET", "/system/function/echo"),
                 ("POST", "/system/scale-function/echo"), ("GET", "/system/secrets"), ("POST", "/system/secrets"),
                 ("PUT", "/system/secrets"), ("DELETE", "/system/secrets"), ("GET", "/system/logs?name=echo")]


async def test_every_system_route_needs_basic_auth(gw: Any) -> None:
    _, client = gw
    await deploy(client, "echo", ECHO)
    wrong = [{}, {"Authorization": aiohttp.encode_basic_auth("admin", "wrong")},
             {"Authorization": aiohttp.encode_basic_auth("root", PASSWORD)}]
    for method, path in SYSTEM_ROUTES:
        for auth in wrong:
            response = await client.request(method, path, headers=auth, json={})
            assert response.status == 401, (method, path, auth)
            assert response.headers["WWW-Authenticate"].startswith("Basic")
    for header in ("Bearer xyz", "Basic !!!notbase64", "Basic " + base64.b64encode(b"admin").decode()):
        response = await client.get("/system/functions", headers={"Authorization": header})
        assert response.status == 401
    # with auth: never 401
    for method, path in SYSTEM_ROUTES:
        response = await client.request(method, path, headers=AUTH, json={} if method != "GET" else None)
        assert response.status != 401, (method, path)
        if path.startswith("/system/logs"):
            response.close()
    # invocations stay open; dot segments cannot reach /system/ without auth
    assert (await client.post("/function/echo", data=b"x")).status == 200
    for sneaky in ("/function/echo/../../system/functions", "/function/%2e%2e/system/functions",
                   "/system/./functions", "/function/..%2fsystem/functions"):
        response = await client.get(sneaky)
        assert response.status in (401, 404), sneaky


async def test_openapi_documents_every_route(gw: Any) -> None:
    gateway, client = gw
    document = openapi_document()
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item if method != "parameters"}
    for route in client.server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        path = re.sub(r"\{path:[^}]*\}", "{path}", path)
        if route.method == "HEAD":
            continue
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"] if route.method == "*" else [route.method]
        for method in methods:
            assert (path, method) in documented, (path, method)


# -- deploy, list, describe, invoke, delete ------------------------------------------------------

async def test_function_lifecycle(gw: Any) -> None:
    _, client = gw
    response = await deploy(client, "echo", ECHO, expect=202, labels={"team": "a"}, envVars={"GREETING": "hi"},
                            annotations={"note": "x"}, image="ignored/image:1")
    assert await response.json() == {"name": "echo", "version": 1}
    response = await deploy(client, "echo", ECHO, expect=409)
    assert "PUT" in await response.text()

    listing = await (await system(client, "GET", "/system/functions")).json()
    assert [f["name"] for f in listing] == ["echo"]
    status = await (await system(client, "GET", "/system/function/echo")).json()
    assert status["name"] == "echo" and status["labels"] == {"team": "a"} and status["envVars"] == {"GREETING": "hi"}
    assert status["annotations"] == {"note": "x"} and status["image"] == "ignored/image:1"
    for key in ("invocationCount", "replicas", "availableReplicas", "createdAt", "usage", "secrets", "limits"):
        assert key in status
    assert status["capfaas"]["version"] == 1

    response = await client.post("/function/echo/some/extra/path?a=1&b=two", data=b"hello",
                                 headers={"Content-Type": "text/plain", "X-Custom": "yes"})
    assert response.status == 200
    seen = await response.json()
    assert seen["method"] == "POST" and seen["path"] == "/some/extra/path"
    assert seen["query"] == {"a": "1", "b": "two"} and seen["body"] == "hello"
    assert seen["headers"]["X-Custom"] == "yes"
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["X-Call-Id"])
    call_id = uuid.UUID(response.headers["X-Call-Id"])
    assert (call_id.version, call_id.variant) == (4, uuid.RFC_4122)
    assert int(response.headers["X-Start-Time"]) / 1e9 == pytest.approx(time.time(), abs=60)
    assert float(response.headers["X-Duration-Seconds"]) >= 0
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        response = await client.request(method, "/function/echo", headers={"X-Call-Id": "my-call-1"})
        assert response.status == 200
        assert (await response.json())["method"] == method
        assert response.headers["X-Call-Id"] == "my-call-1"
    response = await client.head("/function/echo")
    assert response.status == 200
    # the caller's credentials are not the function's business
    seen = await (await client.post("/function/echo", headers=AUTH)).json()
    assert "Authorization" not in seen["headers"]

    status = await (await system(client, "GET", "/system/function/echo")).json()
    assert status["invocationCount"] == 7

    response = await system(client, "DELETE", "/system/functions", json={"functionName": "echo"})
    assert response.status == 200
    assert (await system(client, "GET", "/system/function/echo")).status == 404
    assert (await client.post("/function/echo")).status == 404
    assert (await system(client, "DELETE", "/system/functions", json={"functionName": "echo"})).status == 404
    assert (await system(client, "DELETE", "/system/functions", json={"name": "echo"})).status == 400
    assert (await system(client, "GET", "/system/functions")).status == 200
    # deployed again: numbering goes on
    response = await deploy(client, "echo", ECHO, expect=202)
    assert (await response.json())["version"] == 2


async def test_unknown_function_is_404_everywhere(gw: Any) -> None:
    _, client = gw
    for method, path in (("POST", "/function/nope"), ("GET", "/function/nope/x?y=1"),
                         ("POST", "/async-function/nope"), ("GET", "/system/function/nope")):
        response = await client.request(method, path, headers=AUTH)
        assert response.status == 404, path
        assert "nope" in await response.text()
    response = await system(client, "POST", "/system/scale-function/nope", json={"serviceName": "nope", "replicas": 1})
    assert response.status == 404
    response = await deploy(client, "nope", ECHO, method="PUT", expect=404)


async def test_deploy_validation_says_what_and_where(gw: Any) -> None:
    _, client = gw
    response = await deploy(client, "broken", "def handle(event, context):\n    return 1 +\n", expect=400)
    error = await response.json()
    assert error["type"] == "SyntaxError" and error["file"] == "handler.py" and error["line"] == 2
    assert error["message"].count("line 2") == 1, error["message"]

    response = await deploy(client, "broken", "import json\nx = 1 / 0\ndef handle(e, c):\n    return 1\n", expect=400)
    error = await response.json()
    assert error["type"] == "ZeroDivisionError" and (error["file"], error["line"]) == ("handler.py", 2)

    response = await deploy(client, "broken", "import no_such_module_here\n", expect=400)
    error = await response.json()
    assert error["type"] == "ModuleNotFoundError" and "no_such_module_here" in error["message"]
    assert (error["file"], error["line"]) == ("handler.py", 1)

    response = await deploy(client, "broken", "def other(e, c):\n    return 1\n", expect=400)
    assert "handle" in (await response.json())["message"]
    response = await deploy(client, "broken", "def other(e, c):\n    return 1\n", code={"handler": "main"}, expect=400)
    assert "main" in (await response.json())["message"]
    # nothing of it was deployed
    assert (await system(client, "GET", "/system/function/broken")).status == 404
    assert (await system(client, "GET", "/system/functions")).status == 200


OK = base64.b64encode(b"def handle(event, context):\n    return 'ok'\n").decode()
BAD_DEPLOYMENTS: list[tuple[Any, str]] = [
    ({"service": "bad name", "code": {"files": {"handler.py": ""}}}, "not valid"),
    ({"service": "../x", "code": {"files": {"handler.py": ""}}}, "not valid"),
    ({"service": "a" * 64, "code": {"files": {"handler.py": ""}}}, "not valid"),
    ({"code": {"files": {"handler.py": ""}}}, "service"),
    ({"service": "f"}, "code.files"),
    ({"service": "f", "code": {"files": {}}}, "code.files"),
    ({"service": "f", "code": {"files": {"handler.py": "!!!"}}}, "base64"),
    ({"service": "f", "code": {"files": {"handler.py": 5}}}, "base64"),
    ({"service": "f", "code": {"files": {"../handler.py": ""}, "module": "../handler.py"}}, ".."),
    ({"service": "f", "code": {"files": {"/etc/handler.py": ""}}}, "handler.py"),
    ({"service": "f", "code": {"files": {"other.py": ""}}}, "handler.py"),
    ({"service": "f", "code": {"files": {"handler.py": ""}, "signature": "cobol"}}, "signature"),
    ({"service": "f", "code": {"files": {"handler.py": ""}, "handler": "not an identifier"}}, "handler"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": {"memory": "lots"}}, "memory"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": {"colour": "red"}}, "colour"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": {"memory": 10 ** 30}}, "below 2**62"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": {"memory": "9999999Ei"}}, "below 2**62"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": [1]}, "limits"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "limits": "ab"}, "limits"),
    ({"service": "f", "code": {"files": {"handler.py": ""}, "timeout": -1}}, "timeout"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "secrets": 5}, "secrets"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "secrets": ["missing"]}, "missing"),
    ({"service": "f", "code": {"files": {"handler.py": ""}}, "envVars": {"A": 1}}, "env"),
    ({"service": "f", "code": {"files": {"handler.py": OK}}, "labels": {"com.openfaas.scale.max": "0"}}, "scale.max"),
    ({"service": "f", "code": {"files": {"handler.py": OK}}, "labels": {"com.openfaas.scale.min": "x"}}, "scale.min"),
    ({"service": "f", "code": {"files": {"handler.py": OK}}, "labels": {"com.openfaas.scale.min": "3",
                                                                     "com.openfaas.scale.max": "2"}}, "larger"),
    ([1, 2], "object"),
    ("just a string", "object"),
]


async def test_bad_deployments_are_400_with_the_reason(gw: Any) -> None:
    _, client = gw
    for body, reason in BAD_DEPLOYMENTS:
        for method in ("POST", "PUT"):
            response = await system(client, method, "/system/functions", json=body)
            text = await response.text()
            if method == "PUT" and response.status == 404:
                continue  # a well-formed update of a function that does not exist
            assert response.status == 400, (body, response.status, text)
            assert reason in text, (body, text)
    response = await system(client, "POST", "/system/functions", data=b"{not json",
                            headers={"Content-Type": "application/json"})
    assert response.status == 400 and "JSON" in await response.text()
    assert await (await system(client, "GET", "/system/functions")).json() == []  # nothing was stored


async def test_a_large_deployment_body_arrives_whole(gw: Any) -> None:
    """The deploy body comes in many TCP segments; all of them are read before parsing."""
    _, client = gw
    filler = "# " + "x" * 120 + "\n"
    source = filler * 8000 + "def handle(e, c):\n    return 'big'\n"  # about 1 MiB of code

    async def slowly() -> Any:
        data = json.dumps(deployment("bigcode", source)).encode()
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]
            await asyncio.sleep(0.001)

    response = await system(client, "POST", "/system/functions", data=slowly(),
                            headers={"Content-Type": "application/json"})
    assert response.status == 202, await response.text()
    assert await (await client.post("/function/bigcode")).text() == "big"


# -- versions ------------------------------------------------------------------------------------

async def test_put_is_a_new_version_and_in_flight_calls_finish_on_theirs(gw: Any) -> None:
    _, client = gw
    await deploy(client, "ver", VERSIONED.format(v=1), expect=202)
    assert await (await client.get("/function/ver")).text() == "version 1\n"
    in_flight = asyncio.ensure_future(client.get("/function/ver?seconds=1.0"))
    await asyncio.sleep(0.3)
    response = await deploy(client, "ver", VERSIONED.format(v=2), method="PUT", expect=200)
    assert await response.json() == {"name": "ver", "version": 2}
    assert await (await client.get("/function/ver")).text() == "version 2\n"
    old = await in_flight
    assert old.status == 200 and await old.text() == "version 1\n"
    status = await (await system(client, "GET", "/system/function/ver")).json()
    assert status["capfaas"]["version"] == 2
    # a failed update leaves the current version serving
    await deploy(client, "ver", "syntax error here(", method="PUT", expect=400)
    assert await (await client.get("/function/ver")).text() == "version 2\n"


# -- what a function's failure looks like ----------------------------------------------------------

async def test_function_failures_map_to_statuses(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", body_timeout=2.0) as (_, client):
        await deploy(client, "failing", FAILING, code={"timeout": "1s"})
        response = await client.get("/function/failing")
        assert response.status == 418 and await response.json() == {"teapot": True}

        response = await client.get("/function/failing?what=raise", headers={"X-Call-Id": "c-1"})
        assert response.status == 500
        error = await response.json()
        assert error["type"] == "ValueError" and error["message"] == "no such thing" and error["call_id"] == "c-1"
        assert error["error"] and error["file"] == "handler.py" and error["line"] == 5

        started = time.monotonic()
        response = await client.get("/function/failing?what=sleep")
        assert response.status == 504
        error = await response.json()
        assert "timeout" in error["message"] and "1 s" in error["message"], error
        assert set(error) >= {"error", "type", "message", "call_id"}
        assert time.monotonic() - started < 5

        response = await client.get("/function/failing?what=exit")
        assert response.status == 502
        error = await response.json()
        assert error["type"] == "CVMCrashed" and error["call_id"] == response.headers["X-Call-Id"]

        for _ in range(2):  # the second time, the header's verdict is remembered
            response = await client.get("/function/failing?what=header")
            assert response.status == 502
            assert (await response.json())["type"] == "InvalidHeader"
            assert "X-Injected" not in response.headers

        for _ in range(2):
            response = await client.get("/function/failing?what=hop")
            assert response.status == 200 and await response.text() == "hop"
            assert response.headers["X-Fine"] == "yes" and "Transfer-Encoding" not in response.headers

        response = await client.get("/function/failing?what=unicode")
        assert response.status in (200, 502), response.status
        for code in (100, 101, 103, 199, 204, 205, 304, 599):
            response = await client.get(f"/function/failing?what=status&code={code}")
            assert response.status == code or (code < 200 and response.status == 502), (code, response.status)

        # after all that, the function still answers
        response = await client.get("/function/failing")
        assert response.status == 418


# -- bodies and headers ----------------------------------------------------------------------------

async def test_large_bodies_reach_the_function_whole(gw: Any) -> None:
    _, client = gw
    await deploy(client, "wordcount", WORDCOUNT)
    line = b"the quick brown fox jumps\n"
    body = line * ((12 << 20) // len(line))
    response = await client.post("/function/wordcount", data=body)
    assert await response.json() == {"bytes": len(body), "words": 5 * (len(body) // len(line)),
                                     "lines": len(body) // len(line)}

    async def chunked() -> Any:
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]

    response = await client.post("/function/wordcount", data=chunked())
    assert (await response.json())["bytes"] == len(body)
    for size in (0, 1, 65535, 65536, 65537, 200_000):  # around the inline limit, known and unknown length
        response = await client.post("/function/wordcount", data=b"a " * (size // 2) + b"a" * (size % 2))
        assert (await response.json())["bytes"] == size

        async def once(size: int = size) -> Any:
            yield b"a " * (size // 2) + b"a" * (size % 2)

        response = await client.post("/function/wordcount", data=once())
        assert (await response.json())["bytes"] == size


async def test_large_responses(gw: Any) -> None:
    _, client = gw
    await deploy(client, "failing", FAILING)
    response = await client.get("/function/failing?what=big")
    assert response.status == 200
    assert len(await response.read()) == 12 << 20


async def test_body_above_the_maximum_is_413(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", max_body=1 << 20) as (_, client):
        await deploy(client, "wordcount", WORDCOUNT)
        response = await client.post("/function/wordcount", data=b"x" * (1 << 20))
        assert response.status == 200 and (await response.json())["bytes"] == 1 << 20
        response = await client.post("/function/wordcount", data=b"x" * ((1 << 20) + 1))
        assert response.status == 413

        async def chunked() -> Any:
            for _ in range(3):
                yield b"x" * (512 << 10)

        response = await client.post("/function/wordcount", data=chunked())
        assert response.status == 413
        response = await client.post("/async-function/wordcount", data=b"x" * ((1 << 20) + 1))
        assert response.status == 413
        # the instance was given back each time
        response = await client.post("/function/wordcount", data=b"a b")
        assert (await response.json())["words"] == 2


async def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(1000), wait)
    finally:
        writer.close()


async def test_oversized_and_malformed_headers(gw: Any) -> None:
    _, client = gw
    await deploy(client, "echo", ECHO)
    port = client.server.port
    big = b"GET /function/echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n"
    many = b"GET /function/echo HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    line = b"GET /function/echo?" + b"q" * (64 << 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for request in (big, many, line):
        status = int((await _raw(port, request)).split()[1])
        assert status in (400, 431)
    for request in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /function/echo HTTP/1.1\r\nBad Header: x\r\n\r\n",
                    b"POST /function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                    b"POST /function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"):
        assert (await _raw(port, request)).startswith(b"HTTP/1.") and b" 400 " in (await _raw(port, request))[:20]
    assert (await client.get("/function/echo")).status == 200
    # bytes that are not UTF-8 in header values reach the function (as Latin-1) and come back
    reply = await _raw(port, b"GET /function/echo HTTP/1.1\r\nHost: x\r\nX-Call-Id: \xff\xfeid\r\n"
                             b"X-Other: \xc3\xa9\xff\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b"X-Call-Id: \xc3\xbf\xc3\xbeid\r\n" in reply
    reply = await _raw(port, b"POST /async-function/echo HTTP/1.1\r\nHost: x\r\nX-Call-Id: \xff\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 202 ")


# -- backpressure and slow clients ---------------------------------------------------------------

async def test_burst_beyond_concurrency_and_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", queue=1) as (_, client):
        await deploy(client, "sleepy", SLEEPY, labels={"com.openfaas.scale.max": "1"})
        responses = await asyncio.gather(*(client.get("/function/sleepy?seconds=0.4") for _ in range(6)))
        statuses = sorted(r.status for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        refused = next(r for r in responses if r.status == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert "concurrency" in await refused.text()
        assert (await client.get("/function/sleepy?seconds=0")).status == 200


async def test_slow_clients_do_not_tie_up_the_gateway(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", body_timeout=0.5, keepalive_timeout=1.0) as (_, client):
        await deploy(client, "echo", ECHO, labels={"com.openfaas.scale.max": "1"})
        port = client.server.port
        # slow headers: never finished; the gateway hangs up after keepalive_timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /function/echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # slow body: small, announced, never sent
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"POST /function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        # slow large body: holds the function's only instance until body_timeout
        reader3, writer3 = await asyncio.open_connection("127.0.0.1", port)
        writer3.write(b"POST /function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\nabc")
        started = time.monotonic()
        # meanwhile, the gateway answers others
        assert (await client.get("/healthz")).status == 200
        response = await client.post("/function/echo", data=b"quick")
        assert response.status == 200 and (await response.json())["body"] == "quick"
        assert time.monotonic() - started < 2.0
        assert b" 408 " in (await asyncio.wait_for(reader2.read(200), 5))[:20]
        assert b" 408 " in (await asyncio.wait_for(reader3.read(200), 5))[:20]
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed by the gateway
        for w in (writer, writer2, writer3):
            w.close()
        response = await client.post("/function/echo", data=b"again")
        assert response.status == 200


async def test_a_client_that_leaves_gives_the_instance_back(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state") as (gateway, client):
        await deploy(client, "sleepy", SLEEPY, labels={"com.openfaas.scale.max": "1"})
        for _ in range(2):
            request = asyncio.ensure_future(client.get("/function/sleepy?seconds=5"))
            await asyncio.sleep(0.3)
            request.cancel()  # the client hangs up mid-invocation
            with pytest.raises(asyncio.CancelledError):
                await request
        started = time.monotonic()
        response = await client.get("/function/sleepy?seconds=0")
        assert response.status == 200 and time.monotonic() - started < 3
        assert gateway.in_flight == 0


@pytest.mark.parametrize("version", ["1.1", "1.0"])  # the fast path's, and aiohttp's
async def test_a_reader_that_stalls_gives_the_instance_back(tmp_path: Path, version: str) -> None:
    async with running_gateway(tmp_path / "state", body_timeout=0.5) as (_, client):
        await deploy(client, "failing", FAILING, labels={"com.openfaas.scale.max": "1"})
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port, limit=1024)
        writer.transport.set_write_buffer_limits(0)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"GET /function/failing?what=big HTTP/%s\r\nHost: x\r\n\r\n" % version.encode())
        await reader.read(100)  # the first bytes, then nothing more is read
        writer.transport.pause_reading()
        started = time.monotonic()
        response = await client.get("/function/failing", timeout=aiohttp.ClientTimeout(total=10))
        assert response.status == 418
        assert time.monotonic() - started < 5
        writer.close()


# -- asynchronous invocations ----------------------------------------------------------------------

@contextlib.asynccontextmanager
async def callback_server(callback: Any) -> AsyncIterator[str]:
    """A real HTTP server on loopback that answers POST /cb with ``callback``; yields its URL."""
    app = web.Application()
    app.router.add_post("/cb", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/cb"
    finally:
        await runner.cleanup()


async def test_async_invocation_posts_the_result_to_the_callback(gw: Any) -> None:
    _, client = gw
    await deploy(client, "echo", ECHO)
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = asyncio.Event()

    async def callback(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        if len(received) == 1:
            return web.Response(status=500)  # the first attempt fails: the gateway retries
        arrived.set()
        return web.Response(status=200)

    async with callback_server(callback) as url:
        response = await client.post("/async-function/echo/sub?x=1", data=b"later",
                                     headers={"X-Callback-Url": url, "X-Call-Id": "async-1"})
        assert response.status == 202 and response.headers["X-Call-Id"] == "async-1"
        await asyncio.wait_for(arrived.wait(), 10)
        assert len(received) == 2
        headers, body = received[1]
        assert headers["X-Call-Id"] == "async-1" and headers["X-Function-Name"] == "echo"
        assert headers["X-Function-Status"] == "200" and float(headers["X-Duration-Seconds"]) >= 0
        seen = json.loads(body)
        assert seen["body"] == "later" and seen["path"] == "/sub" and seen["query"] == {"x": "1"}
        assert received[0][0]["X-Call-Id"] == "async-1"

        # without a callback: accepted, run, and its call id generated
        response = await client.post("/async-function/echo", data=b"fire and forget")
        assert response.status == 202 and response.headers["X-Call-Id"]
        # bad callbacks and unknown functions
        response = await client.post("/async-function/echo", headers={"X-Callback-Url": "ftp://x/y"})
        assert response.status == 400
        response = await client.post("/async-function/echo", headers={"X-Callback-Url": "not a url"})
        assert response.status == 400
        assert (await client.post("/async-function/nope")).status == 404


async def test_async_failures_reach_the_callback_as_statuses(gw: Any) -> None:
    _, client = gw
    await deploy(client, "failing", FAILING)
    got: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def callback(request: web.Request) -> web.Response:
        await got.put((dict(request.headers), await request.read()))
        return web.Response()

    async with callback_server(callback) as url:
        response = await client.post("/async-function/failing?what=raise", headers={"X-Callback-Url": url})
        assert response.status == 202
        headers, body = await asyncio.wait_for(got.get(), 10)
        assert headers["X-Function-Status"] == "500"
        assert json.loads(body)["type"] == "ValueError"


# -- logs ----------------------------------------------------------------------------------------

async def test_logs_tail_since_and_follow(gw: Any) -> None:
    _, client = gw
    await deploy(client, "printer", PRINTER)
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    response = await client.post("/function/printer", data=b"one\ntwo\nthree")
    call_id = response.headers["X-Call-Id"]
    response = await system(client, "GET", "/system/logs?name=printer")
    assert response.status == 200 and response.content_type == "application/x-ndjson"
    lines = ndjson(await response.read())
    assert [line["text"] for line in lines] == ["one", "two", "three"]
    assert set(lines[0]) == {"name", "namespace", "instance", "timestamp", "text"}
    assert lines[0]["name"] == "printer" and lines[0]["instance"] == call_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lines[0]["timestamp"])

    tail = ndjson(await (await system(client, "GET", "/system/logs?name=printer&tail=1")).read())
    assert [line["text"] for line in tail] == ["three"]
    assert ndjson(await (await system(client, "GET", "/system/logs?name=printer&tail=0")).read()) == []
    since = ndjson(await (await system(client, "GET", f"/system/logs?name=printer&since={before}")).read())
    assert len(since) == 3
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert ndjson(await (await system(client, "GET", f"/system/logs?name=printer&since={future}")).read()) == []

    follow = await system(client, "GET", "/system/logs?name=printer&follow=true&tail=0")
    assert follow.status == 200
    await client.post("/function/printer", data=b"live line")
    line = await asyncio.wait_for(follow.content.readline(), 5)
    assert json.loads(line)["text"] == "live line"
    follow.close()

    for query in ("", "?name=", "?name=printer&tail=x", "?name=printer&since=yesterday"):
        assert (await system(client, "GET", "/system/logs" + query)).status == 400, query


# -- metrics -------------------------------------------------------------------------------------

METRIC_NAMES = ["gateway_function_invocation_total", "gateway_function_invocation_started",
                "gateway_functions_seconds", "gateway_service_count", "capfaas_cold_starts_total",
                "capfaas_start_seconds", "capfaas_instances", "capfaas_capability_faults_total",
                "capfaas_payload_bytes_total"]


async def test_metrics_have_openfaas_and_capfaas_names(gw: Any) -> None:
    _, client = gw
    text = await (await client.get("/metrics")).text()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    await deploy(client, "echo", ECHO)
    await client.post("/function/echo", data=b"12345")
    await client.post("/function/echo", data=b"12345")
    text = await (await client.get("/metrics")).text()
    assert 'gateway_function_invocation_total{code="200",function_name="echo"} 2' in text
    assert 'gateway_function_invocation_started{function_name="echo"} 2' in text
    assert 'gateway_functions_seconds_count{code="200",function_name="echo"} 2' in text
    assert 'gateway_functions_seconds_bucket{code="200",function_name="echo",le="+Inf"} 2' in text
    assert 'capfaas_cold_starts_total{function_name="echo"} 1' in text
    assert 'capfaas_payload_bytes_total{direction="in",function_name="echo"} 10' in text
    assert re.search(r'capfaas_instances\{function_name="echo",state="idle"\} 1', text)
    assert 'gateway_service_count{function_name="echo"} 1' in text


# -- scaling ---------------------------------------------------------------------------------------

async def test_scale_function(gw: Any) -> None:
    _, client = gw
    await deploy(client, "echo", ECHO)

    async def replicas() -> tuple[int, int]:
        status = await (await system(client, "GET", "/system/function/echo")).json()
        return status["replicas"], status["availableReplicas"]

    response = await system(client, "POST", "/system/scale-function/echo", json={"serviceName": "echo", "replicas": 2})
    assert response.status == 202
    for _ in range(100):
        if await replicas() == (2, 2):
            break
        await asyncio.sleep(0.05)
    assert await replicas() == (2, 2)
    response = await system(client, "POST", "/system/scale-function/echo", json={"serviceName": "echo", "replicas": 0})
    assert response.status == 202
    for _ in range(100):
        if await replicas() == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert await replicas() == (0, 0)
    for bad in ({"serviceName": "echo"}, {"serviceName": "echo", "replicas": -1}, {"replicas": "2"}, [], 3):
        response = await system(client, "POST", "/system/scale-function/echo", json=bad)
        assert response.status == 400, bad
    assert (await client.post("/function/echo")).status == 200


# -- secrets ---------------------------------------------------------------------------------------

READ_SECRET = """
import os
def handle(event, context):
    name = event.query["name"]
    try:
        with open(f"/var/openfaas/secrets/{name}", "rb") as f:
            return f.read()
    except OSError as exc:
        return {"statusCode": 404, "body": repr(exc)}
"""


async def test_secrets_crud_and_files_for_functions(gw: Any) -> None:
    _, client = gw
    assert await (await system(client, "GET", "/system/secrets")).json() == []
    assert (await system(client, "POST", "/system/secrets", json={"name": "api-key", "value": "s3cret"})).status == 201
    assert (await system(client, "POST", "/system/secrets", json={"name": "api-key", "value": "x"})).status == 409
    raw = base64.b64encode(b"\x00\xffbinary").decode()
    assert (await system(client, "POST", "/system/secrets", json={"name": "blob", "rawValue": raw})).status == 201
    assert await (await system(client, "GET", "/system/secrets")).json() == [{"name": "api-key"}, {"name": "blob"}]

    await deploy(client, "reader", READ_SECRET, secrets=["api-key", "blob"])
    assert await (await client.get("/function/reader?name=api-key")).read() == b"s3cret"
    assert await (await client.get("/function/reader?name=blob")).read() == b"\x00\xffbinary"
    assert (await client.get("/function/reader?name=other")).status == 404

    assert (await system(client, "PUT", "/system/secrets", json={"name": "api-key", "value": "new"})).status == 200
    assert (await system(client, "PUT", "/system/secrets", json={"name": "none", "value": "x"})).status == 404
    assert (await system(client, "DELETE", "/system/secrets", json={"name": "blob"})).status == 204
    assert (await system(client, "DELETE", "/system/secrets", json={"name": "blob"})).status == 404
    for bad in ({"name": "bad name", "value": "x"}, {"name": "x"}, {"name": "x", "rawValue": "!!"}, {"value": "x"},
                {"name": 5, "value": "x"}, [], {"name": "x", "value": 5}):
        assert (await system(client, "POST", "/system/secrets", json=bad)).status == 400, bad
    assert (await system(client, "POST", "/system/secrets", data=b"nope")).status == 400
    response = await deploy(client, "reader2", READ_SECRET, secrets=["does-not-exist"], expect=400)
    assert "does-not-exist" in await response.text()


PROBE = """
import json, os
def handle(event, context):
    seen = {"env": dict(os.environ), "files": {}}
    paths = [event.query["state"] + "/admin-password", event.query["state"] + "/registry.sqlite3",
             "/proc/self/environ", "/proc/%d/environ" % os.getppid(), "/proc/1/environ",
             "/proc/%d/cmdline" % os.getppid(), "../../../admin-password", "../../../registry.sqlite3"]
    for path in paths:
        try:
            with open(path, "rb") as f:
                seen["files"][path] = f.read().decode("latin-1")
        except Exception as exc:
            seen["files"][path] = "refused: " + type(exc).__name__
    return {"statusCode": 200, "body": seen}
"""


async def test_the_gateways_secrets_are_not_visible_to_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFAAS_ADMIN_PASSWORD", PASSWORD)
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin-password").write_text(PASSWORD + "\n")
    (state / "admin-password").chmod(0o600)
    async with running_gateway(state) as (_, client):
        assert (await system(client, "POST", "/system/secrets", json={"name": "other", "value": "other-secret"})).status == 201
        await deploy(client, "probe", PROBE)
        response = await client.get(f"/function/probe?state={state}")
        assert response.status == 200
        text = await response.text()
        seen = json.loads(text)
        assert PASSWORD not in text and "other-secret" not in text
        assert not any(key.startswith("CAPFAAS") for key in seen["env"])
        assert all(value.startswith("refused") for value in seen["files"].values()), seen["files"]


async def test_a_full_asynchronous_queue_is_429(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", async_queue=1, async_workers=1) as (gateway, client):
        await deploy(client, "sleepy", SLEEPY)
        statuses = []
        for _ in range(4):
            response = await client.post("/async-function/sleepy?seconds=0.3")
            statuses.append(response.status)
            if response.status == 429:
                assert int(response.headers["Retry-After"]) >= 1
        assert statuses[:2] == [202, 202] and 429 in statuses, statuses
        assert gateway.async_calls is not None
        await asyncio.wait_for(gateway.async_calls.queue.join(), 10)  # the accepted ones ran


async def test_the_asynchronous_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state", async_queue_bytes=3 << 20, async_workers=1) as (gateway, client):
        await deploy(client, "sleepy", SLEEPY)
        statuses = []
        for _ in range(4):
            response = await client.post("/async-function/sleepy?seconds=0.3", data=bytes(1 << 20))
            statuses.append(response.status)
            if response.status == 429:
                assert "3145728 bytes of bodies" in await response.text()
        assert statuses[:3] == [202, 202, 202] and statuses[3] == 429, statuses
        assert gateway.async_calls is not None
        await asyncio.wait_for(gateway.async_calls.queue.join(), 10)
        assert gateway.async_calls.queued_bytes == 0


async def test_the_warm_count_survives_a_restart(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state") as (_, client):
        await deploy(client, "echo", ECHO)
        response = await system(client, "POST", "/system/scale-function/echo", json={"serviceName": "echo", "replicas": 2})
        assert response.status == 202
    async with running_gateway(tmp_path / "state") as (gateway, client):
        for _ in range(100):
            if gateway.service.live["echo"].pool.replicas == 2:
                break
            await asyncio.sleep(0.05)
        assert gateway.service.live["echo"].pool.replicas == 2
        assert gateway.service.registry.warm("echo") == 2
        await system(client, "DELETE", "/system/functions", json={"functionName": "echo"})
        assert gateway.service.registry.warm("echo") is None


async def test_a_crashed_instance_is_replaced_to_keep_the_minimum_warm(tmp_path: Path) -> None:
    crashy = "import os\ndef handle(event, context):\n    if event.text == 'die':\n        os._exit(1)\n    return 'ok'\n"
    async with running_gateway(tmp_path / "state") as (gateway, client):
        await deploy(client, "crashy", crashy, labels={"com.openfaas.scale.min": "1"})
        pool = gateway.service.live["crashy"].pool
        for _ in range(100):
            if pool.replicas == 1:
                break
            await asyncio.sleep(0.05)
        assert pool.replicas == 1
        assert (await client.post("/function/crashy", data=b"die")).status == 502
        assert pool.replicas == 0
        for _ in range(100):  # the reaper looks once a second
            if pool.replicas == 1:
                break
            await asyncio.sleep(0.05)
        assert pool.replicas == 1 and pool.cold_starts == 2
        response = await client.post("/function/crashy", data=b"live")
        assert (response.status, response.headers["X-Cold-Start"]) == (200, "0")


async def test_a_warm_up_that_keeps_failing_is_retried_and_logged_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with running_gateway(tmp_path / "state") as (gateway, client):
        await deploy(client, "steady", "def handle(event, context):\n    return 'ok'\n")
        pool = gateway.service.live["steady"].pool
        attempts = []

        async def failing_start() -> None:
            attempts.append(time.monotonic())
            raise RuntimeError("no room for steady")
        pool.prepare = failing_start  # as a template that cannot start
        pool.scaling = dataclasses.replace(pool.scaling, min=1)
        while len(attempts) < 3:  # the reaper tries once a second
            await asyncio.sleep(0.05)
        failures = [r.getMessage() for r in caplog.records if "warming up" in r.getMessage()]
        assert failures == ["function steady: warming up 1 instances failed: RuntimeError: no room for steady"]


async def test_the_streaming_and_cap_file_examples(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "state") as (_, client):
        for name in ("ticker", "notes", "wordcount"):
            await deploy(client, name, (FUNCTIONS / f"{name}.py").read_text())
        response = await client.get("/function/ticker?count=3&interval=0")
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert [line.split(" at ")[0] for line in (await response.text()).splitlines()] == \
            ["tick 1 of 3", "tick 2 of 3", "tick 3 of 3"]
        assert (await client.get("/function/notes")).status == 404
        assert (await client.put("/function/notes", data=b"remember the milk")).status == 204
        assert await (await client.get("/function/notes")).read() == b"remember the milk"

        async def upload():
            for _ in range(8):
                yield b"two words\n" * 100_000

        answer = await (await client.post("/function/wordcount", data=upload())).json()
        assert answer == {"bytes": 8_000_000, "words": 1_600_000, "lines": 800_000}


async def test_concurrent_invocations_with_the_same_call_id_each_get_their_own_answer(tmp_path: Path) -> None:
    """X-Call-Id is the client's to choose: two at once on one instance are still two invocations."""
    async with running_gateway(tmp_path / "state") as (_, client):
        await deploy(client, "waiter", """
            import asyncio
            async def handle(event, context):
                await asyncio.sleep(0.2)
                return event.text
        """, code={"concurrency": 2}, labels={"com.openfaas.scale.max": "1"})
        responses = await asyncio.wait_for(asyncio.gather(*(
            client.post("/function/waiter", data=text, headers={"X-Call-Id": "same"}) for text in ("one", "two"))), 10)
        assert [(r.status, await r.text()) for r in responses] == [(200, "one"), (200, "two")]
