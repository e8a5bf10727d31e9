"""A small client of the gateway's HTTP API, for the CLI (stdlib only: it starts fast)."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .credentials import admin_password, default_state_dir

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class GatewayError(Exception):
    """The gateway refused or could not be reached; the message is one sentence for the user."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class GatewayClient:
    def __init__(self, gateway: str | None = None, state_dir: Path | None = None) -> None:
        self.base = (gateway or os.environ.get("CAPFAAS_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
        self.state_dir = state_dir or default_state_dir()

    def _auth(self) -> str:
        password = admin_password(self.state_dir, create=False)
        if password is None:
            raise GatewayError(f"no admin password: set CAPFAAS_ADMIN_PASSWORD or run from the directory whose "
                               f"state ({self.state_dir}) the gateway uses")
        return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()

    def request(self, method: str, path: str, body: bytes | None = None, *, system: bool = True,
                headers: dict[str, str] | None = None, timeout: float = 300.0, ok: tuple[int, ...] = ()) -> Reply:
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=dict(headers or {}))
        if system:
            request.add_header("Authorization", self._auth())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            reply = Reply(error.code, dict(error.headers), error.read())
            if error.code in ok:
                return reply
            raise GatewayError(_explain(reply)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise GatewayError(f"cannot reach the gateway at {self.base}: {reason} (is `capfaas serve` running?)") from None

    def json(self, method: str, path: str, payload: Any = None, **options: Any) -> Reply:
        body = None if payload is None else json.dumps(payload).encode()
        return self.request(method, path, body, headers={"Content-Type": "application/json"}, **options)

    def stream(self, path: str) -> Iterator[bytes]:
        request = urllib.request.Request(self.base + path, headers={"Authorization": self._auth()})
        try:
            with urllib.request.urlopen(request) as response:
                yield from response
        except urllib.error.HTTPError as error:
            raise GatewayError(_explain(Reply(error.code, dict(error.headers), error.read()))) from None
        except (urllib.error.URLError, ConnectionError) as error:
            raise GatewayError(f"cannot reach the gateway at {self.base}: {getattr(error, 'reason', error)}") from None


def _explain(reply: Reply) -> str:
    text = reply.body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and "message" in data:
        where = f" ({data['file']}, line {data['line']})" if data.get("file") and f"line {data.get('line')}" not in data["message"] else ""
        text = f"{data.get('error', 'error')}: {data['message']}{where}"
    return f"the gateway answered {reply.status}: {text or 'no details'}"
