"""Helpers for the gateway tests: a real gateway on a real port, in-process or as `capfaas serve`."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from capfaas.gateway.app import Gateway, Settings, create_app
from capfaas.gateway.fastpath import GatewayRunner
from capfaas.gateway.server import close_gateway, open_gateway

PASSWORD = "test-admin-password-0123456789"
AUTH = {"Authorization": aiohttp.encode_basic_auth("admin", PASSWORD)}
FUNCTIONS = Path(__file__).resolve().parents[1] / "functions"
CAPFAAS = [sys.executable, "-m", "capfaas"]


def code(source: str) -> str:
    """Function source, dedented."""
    return textwrap.dedent(source).lstrip()


def deployment(name: str, source: str, *, module: str = "handler.py", **fields: Any) -> dict[str, Any]:
    """A FunctionDeployment with capfaas's ``code`` field holding one file."""
    code_field = {"files": {module: base64.b64encode(code(source).encode()).decode()}, "module": module}
    code_field.update(fields.pop("code", {}))
    return {"service": name, "code": code_field, **fields}


class GatewayTestServer(TestServer):
    """aiohttp's test server with the runner `capfaas serve` uses (invocations on the fast path)."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


@contextlib.asynccontextmanager
async def running_gateway(state_dir: Path, **options: Any) -> AsyncIterator[tuple[Gateway, TestClient]]:
    """A gateway (emulated backend) served on 127.0.0.1 by aiohttp's test server, as `serve` runs it."""
    backoff = options.pop("callback_backoff", None)
    settings = Settings(state_dir=state_dir, admin_password=PASSWORD, **options)
    state_dir.mkdir(parents=True, exist_ok=True)
    gateway = await open_gateway(settings, "emulated")
    if backoff is not None:
        assert gateway.async_calls is not None
        gateway.async_calls.backoff = backoff
    server = GatewayTestServer(create_app(gateway), host="127.0.0.1", handler_cancellation=True)
    client = TestClient(server)
    try:
        await client.start_server()
        yield gateway, client
    finally:
        await client.close()
        await close_gateway(gateway)


async def deploy(client: TestClient, name: str, source: str, *, method: str = "POST", expect: int | None = None,
                 **fields: Any) -> aiohttp.ClientResponse:
    response = await client.request(method, "/system/functions", json=deployment(name, source, **fields), headers=AUTH)
    if expect is not None:
        assert response.status == expect, await response.text()
    elif response.status not in (200, 202):
        raise AssertionError(f"deploy of {name} answered {response.status}: {await response.text()}")
    return response


# -- a real `capfaas serve` ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A `capfaas serve` subprocess and how to talk to it."""

    process: subprocess.Popen[bytes]
    port: int
    cwd: Path
    env: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, *, auth: bool = True,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if auth:
            token = base64.b64encode(f"admin:{self.password()}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def password(self) -> str:
        return self.env.get("CAPFAAS_ADMIN_PASSWORD") or (self.cwd / ".capfaas" / "admin-password").read_text().strip()

    def cli(self, *args: str, stdin: bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
        """`capfaas ARGS` against this gateway, from its directory (so it finds the state dir)."""
        env = {**self.env, "CAPFAAS_GATEWAY": self.url}
        return subprocess.run([*CAPFAAS, *args], cwd=self.cwd, env=env, input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout)

    def children(self) -> list[int]:
        """PIDs of the gateway's whole process tree below it (its cVMs and templates)."""
        found: list[int] = []
        frontier = [self.process.pid]
        while frontier:
            parent = frontier.pop()
            try:
                kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            found.extend(int(k) for k in kids)
            frontier.extend(int(k) for k in kids)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_served(cwd: Path, *, env: dict[str, str] | None = None, port: int | None = None,
                 extra: tuple[str, ...] = (), timeout: float = 30.0) -> Served:
    """Start `capfaas serve` in ``cwd`` on a free port and wait until /healthz answers."""
    port = port or free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CAPFAAS_")}
    environment.update({"CAPFAAS_BACKEND": "emulated", **(env or {})})
    log = cwd / f"serve-{port}-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*CAPFAAS, "serve", "--port", str(port), *extra], cwd=cwd, env=environment,
                                   stdout=out, stderr=subprocess.STDOUT)
    served = Served(process, port, cwd, environment, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"capfaas serve exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(served.url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return served
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    served.stop(signal.SIGKILL)
    raise AssertionError(f"capfaas serve did not become healthy: {log.read_text()}")


@contextlib.contextmanager
def served_gateway(cwd: Path, **options: Any) -> Iterator[Served]:
    served = start_served(cwd, **options)
    try:
        yield served
    finally:
        if served.process.poll() is None:
            served.stop(signal.SIGKILL, timeout=10)


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]
