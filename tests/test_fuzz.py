"""Fuzz the gateway with schemathesis, from the OpenAPI document it serves, bounded in examples and time.

The gateway runs in a thread on its own uvloop event loop (as `capfaas serve` runs it) so that
schemathesis's synchronous requests reach a live server. A 5xx is allowed only where a function
failed on /function/*, as the JSON error the gateway writes for that; every other 5xx is the
gateway's own fault. Responses must also match the document (status codes, content types, schemas).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from capfaas.gateway.openapi import openapi_document  # noqa: E402

from .gateway_support import AUTH, FUNCTIONS, PASSWORD  # noqa: E402

MAX_EXAMPLES = 25
"""Per operation; the whole module stays under a minute on two cores."""
TIMEOUT = 10.0
TARGETS = ("echo", "hello", "todos", "wordcount", "sleepy")
"""Deployed functions the fuzzer's names are mapped to (not ``slow``: it runs for its whole timeout)."""


class _Errors(logging.Handler):
    """Errors the gateway logged (an exception in a handler or a background task)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class LiveGateway:
    """A gateway served from a thread, on 127.0.0.1 and a free port."""

    def __init__(self, state_dir: Path) -> None:
        self.errors = _Errors()
        self.state_dir = state_dir
        self.port = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzzed-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        from aiohttp import web

        from capfaas.gateway.app import Settings, create_app
        from capfaas.gateway.fastpath import GatewayRunner
        from capfaas.gateway.server import close_gateway, deploy_directory, open_gateway

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        settings = Settings(state_dir=self.state_dir, admin_password=PASSWORD, max_body=8 << 20, body_timeout=5.0)
        gateway = await open_gateway(settings, "emulated")
        try:
            await deploy_directory(gateway, FUNCTIONS)
            runner = GatewayRunner(create_app(gateway), access_log=None, handler_cancellation=True,
                                   shutdown_timeout=5.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.ready.set()
            await self._stop.wait()
            await runner.cleanup()
        finally:
            await close_gateway(gateway)

    def start(self) -> None:
        for name in ("aiohttp.server", "aiohttp.web", "asyncio", "capfaas"):
            logging.getLogger(name).addHandler(self.errors)
        self.thread.start()
        self.ready.wait(30)
        if self.error is not None or not self.port:
            raise RuntimeError(f"the gateway did not start: {self.error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        for name in ("aiohttp.server", "aiohttp.web", "asyncio", "capfaas"):
            logging.getLogger(name).removeHandler(self.errors)


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    state = tmp_path_factory.mktemp("fuzz") / "state"
    state.mkdir()
    live = LiveGateway(state)
    live.start()
    yield live
    live.stop()
    assert not live.thread.is_alive(), "the gateway did not shut down"


# The document the gateway serves at /openapi.json (checked below to be the same); loaded at import
# because schemathesis's lazy ``from_fixture`` does not work with pytest 9.
schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_served_document_is_the_fuzzed_one(live_gateway: LiveGateway) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{live_gateway.url}/openapi.json", timeout=10) as response:
        assert json.loads(response.read()) == json.loads(json.dumps(openapi_document()))


def _gateways_own_5xx(case: Any, response: Any) -> str | None:
    """Why a 5xx is the gateway's fault, or None when it reports a function's failure as designed."""
    if response.status_code < 500:
        return None
    if case.operation.path.startswith("/function/") and response.status_code in (500, 502, 504):
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if isinstance(body, dict) and {"error", "type", "message", "call_id"} <= set(body):
            return None
    return f"{case.operation.label} answered {response.status_code}: {response.content[:300]!r}"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_5xx_from_the_gateway_and_answers_match_the_document(case: Any, live_gateway: LiveGateway) -> None:
    if case.operation.path.startswith("/system/logs") and case.query and str(case.query.get("follow")).lower() == "true":
        case.query["follow"] = "false"  # a follow never ends by itself
    name = (case.path_parameters or {}).get("name")
    if isinstance(name, str) and len(name) % 3:  # two cases in three aim at a deployed function
        case.path_parameters["name"] = TARGETS[len(name) % len(TARGETS)]
    response = case.call(base_url=live_gateway.url, headers=AUTH, timeout=TIMEOUT)
    problem = _gateways_own_5xx(case, response)
    assert problem is None, problem
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


def test_the_gateway_is_healthy_after_the_fuzzing(live_gateway: LiveGateway) -> None:
    import urllib.request

    started = time.monotonic()
    with urllib.request.urlopen(f"{live_gateway.url}/function/hello", data=b"fuzz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"Hello, fuzz!\n"
    assert time.monotonic() - started < 5
    request = urllib.request.Request(f"{live_gateway.url}/system/functions", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        names = {f["name"] for f in json.loads(response.read())}
    assert {"echo", "hello", "wordcount"} <= names
    assert live_gateway.errors.records == []
