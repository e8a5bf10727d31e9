"""Handler conventions: what a function receives and what its return value becomes.

The native style is OpenFaaS's python3-http ``handle(event, context)``; adapters accept the
functions-framework style ``handler(request)`` and AWS Lambda's ``handler(event, context)`` with an
API Gateway proxy payload, so code written for those platforms runs unchanged.
"""
from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Body = bytes | memoryview


@dataclass
class Event:
    """One HTTP request as a function sees it. A large ``body`` is a read-only view of shared memory."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Body
    capability: Any = None
    """The read-only capability the body was handed over with, when it came through shared memory."""
    stream: Any = None
    """A chunked request's body as it arrives (a CAP_Stream, file-like), or None."""

    @property
    def text(self) -> str:
        return bytes(self.body).decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class StreamedEvent(Event):
    """A request whose body is still arriving: read ``stream`` as it comes, in bounded memory, or
    touch ``body`` and wait for all of it (so handlers written for whole bodies work unchanged)."""

    @property  # type: ignore[override]
    def body(self) -> Body:
        if self._body is None:
            self._body = self.stream.read()
        return self._body

    @body.setter
    def body(self, value: Body | None) -> None:
        self._body = value


@dataclass
class Context:
    """Who is running, until when, and where to log."""

    function_name: str
    invocation_id: str
    deadline: float
    """Absolute time (``time.time()``) at which the invocation is killed."""
    logger: logging.Logger
    share: Callable[[Any], Any] = field(repr=False, default=lambda data: None)
    """``share(data)`` places bytes in this cVM's memory and returns a read-only capability to them."""
    caller: Any = field(repr=False, default=None)
    """What carries ``call``/``acall`` to the intravisor (the runtime)."""
    files: Any = field(repr=False, default=None)
    """CAP_Files: ``create``, ``open``, ``grant``, ``delete``, ``list`` (also ``open('/cap/NAME')``)."""
    chain: tuple[str, ...] = ()
    """The functions that called their way to this invocation, outermost first (empty over HTTP)."""

    def buffer(self, size: int) -> SharedBuffer:
        """A writable buffer of ``size`` bytes in shared memory, for this invocation: fill
        ``.view`` in place, then pass it to ``call`` or return it, and no byte is copied again."""
        if self.caller is None:
            raise RuntimeError("this context has no shared memory")
        return self.caller.buffer(size)

    def entry(self, function: str) -> Any:
        """The sealed entry capability for ``function``: what ``call`` really calls. Only the
        intravisor can unseal it; this cVM can keep it and call through it, but not alter it."""
        if self.caller is None:
            raise RuntimeError("this context cannot call other functions")
        return self.caller.entry(function)

    def call(self, function: Any, data: Any = b"", headers: dict[str, str] | None = None) -> CallResult:
        """Invoke another deployed function, cVM to cVM through the intravisor (no HTTP).

        ``function`` is a name or an entry capability from ``entry``. ``data`` is bytes, a buffer,
        text (sent as UTF-8), or a capability from ``share``. The callee gets at most this
        invocation's remaining time. A callee that raised, crashed or timed out raises
        ``FunctionCallError`` naming it; any status it chose itself comes back in the result."""
        if self.caller is None:
            raise RuntimeError("this context cannot call other functions")
        return self.caller.call_function(self, function, data, headers or {})

    async def acall(self, function: Any, data: Any = b"", headers: dict[str, str] | None = None) -> CallResult:
        """``call`` for ``async def`` handlers."""
        if self.caller is None:
            raise RuntimeError("this context cannot call other functions")
        return await self.caller.acall_function(self, function, data, headers or {})

    def stream_call(self, function: Any, headers: dict[str, str] | None = None) -> StreamCall:
        """Call another function with a stream as its body (CAP_Streams): it runs and reads
        ``event.stream`` while this function writes; use as ``with context.stream_call(name) as s:
        s.write(...)``, then ``s.result`` is its ``CallResult``. A full stream blocks the writer."""
        if self.caller is None:
            raise RuntimeError("this context cannot call other functions")
        return self.caller.stream_call(self, function, headers or {})

    def remaining_time(self) -> float:
        return max(0.0, self.deadline - time.time())

    # AWS Lambda's names, so Lambda-style code finds what it expects.
    @property
    def aws_request_id(self) -> str:
        return self.invocation_id

    def get_remaining_time_in_millis(self) -> int:
        return int(self.remaining_time() * 1000)


@dataclass(frozen=True)
class SharedBuffer:
    """Bytes in shared memory: a read-write capability and the writable view it was checked into."""

    capability: Any
    view: memoryview


@dataclass(frozen=True)
class CallResult:
    """What a called function answered. A large ``body`` is a read-only view of shared memory,
    and ``capability`` the capability to it, to hand on to the next function without a copy."""

    status: int
    headers: dict[str, str]
    body: Body
    capability: Any = None

    @property
    def text(self) -> str:
        return bytes(self.body).decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class StreamCall(io.RawIOBase):
    """The writing end of a call's CAP_Stream (``Context.stream_call``)."""

    def __init__(self, function: str, writer: Any, finish: Callable[[], CallResult]) -> None:
        super().__init__()
        self.function = function
        self._writer = writer
        self._finish = finish
        self._result: CallResult | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Copy ``data`` into the stream, waiting while it is full; BrokenPipeError once the callee
        has finished (``result`` then says how)."""
        return self._writer.write(data)

    def close(self) -> None:
        """End the stream and wait for the callee's answer (a failed callee raises here)."""
        if self.closed:
            return
        self._writer.close()
        super().close()
        self._result = self._finish()

    @property
    def result(self) -> CallResult:
        if self._result is None:
            raise RuntimeError(f"the stream to {self.function!r} is still open: close it first")
        return self._result


class FunctionCallError(Exception):
    """A called function failed: it raised, crashed, timed out, or could not be called at all."""

    def __init__(self, function: str, kind: str, message: str, status: int) -> None:
        self.function = function
        self.kind = kind
        self.status = status
        super().__init__(f"calling {function!r} failed ({kind}): {message}")


@dataclass
class Response:
    """A normalised result: status, headers, and a body that is bytes or a capability."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = b""


class HandlerResultError(TypeError):
    """A handler returned something capfaas cannot turn into a response."""


def _body_and_type(body: Any, capability_type: type) -> tuple[Any, str | None]:
    if body is None:
        return b"", None
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    if isinstance(body, (bytes, bytearray, memoryview)):
        return body, "application/octet-stream"
    if isinstance(body, (capability_type, SharedBuffer)):
        return body, "application/octet-stream"
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode(), "application/json"
    raise HandlerResultError(f"cannot send a {type(body).__name__} as a response body; "
                             "return str, bytes, a buffer, a capability, a dict or None")


def normalise(result: Any, capability_type: type) -> Response:
    """Turn a native handler's return value into a ``Response``."""
    if result is None:
        return Response(200, {}, b"")
    if isinstance(result, Mapping) and ("statusCode" in result or "body" in result):
        body, content_type = _body_and_type(result.get("body"), capability_type)
        headers = {str(k): str(v) for k, v in (result.get("headers") or {}).items()}
        if content_type and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = content_type
        status = result.get("statusCode", 200)
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise HandlerResultError(f"statusCode must be an HTTP status (100-599), got {status!r}")
        return Response(status, headers, body)
    body, content_type = _body_and_type(result, capability_type)
    return Response(200, {"Content-Type": content_type} if content_type else {}, body)


def streamed_response(result: Any) -> Response | None:
    """A ``Response`` whose body is the generator (or async generator) a handler returned, bare or
    as a dict's ``body``; None for any other result."""
    body = result.get("body") if isinstance(result, Mapping) else result
    if not (inspect.isgenerator(body) or inspect.isasyncgen(body)):
        return None
    response = normalise({**result, "body": None} if isinstance(result, Mapping) else None, type(None))
    if not any(k.lower() == "content-type" for k in response.headers):
        response.headers["Content-Type"] = "application/octet-stream"
    response.body = body
    return response


class FrameworkRequest:
    """The slice of a Flask request that functions-framework handlers use."""

    def __init__(self, event: Event) -> None:
        self.method = event.method
        self.path = event.path
        self.headers = event.headers
        self.args = event.query
        self._event = event

    @property
    def data(self) -> bytes:
        return bytes(self._event.body)

    def get_data(self, as_text: bool = False) -> bytes | str:
        return self._event.text if as_text else self.data

    def get_json(self, silent: bool = False) -> Any:
        try:
            return self._event.json()
        except ValueError:
            if silent:
                return None
            raise


def _framework_result(result: Any, capability_type: type) -> Response:
    """Flask's return conventions: body, (body, status) or (body, status, headers)."""
    status, headers = 200, {}
    if isinstance(result, tuple):
        if not 2 <= len(result) <= 3:
            raise HandlerResultError("a tuple result must be (body, status) or (body, status, headers)")
        result, status, *rest = result
        headers = dict(rest[0]) if rest else {}
    response = normalise(result, capability_type)
    response.status = status
    response.headers.update({str(k): str(v) for k, v in headers.items()})
    return response


def lambda_event(event: Event) -> dict[str, Any]:
    """An API Gateway (REST, payload 1.0) proxy event."""
    raw = bytes(event.body)
    try:
        body, encoded = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        body, encoded = base64.b64encode(raw).decode(), True
    return {
        "httpMethod": event.method,
        "path": event.path,
        "queryStringParameters": event.query or None,
        "headers": event.headers,
        "body": body if raw else None,
        "isBase64Encoded": encoded,
        "requestContext": {"httpMethod": event.method, "path": event.path},
    }


def _lambda_result(result: Any, capability_type: type) -> Response:
    if isinstance(result, Mapping) and result.get("isBase64Encoded"):
        result = dict(result, body=base64.b64decode(result.get("body") or b""))
    return normalise(result, capability_type)


def adapt(handler: Callable[..., Any], signature: str) -> tuple[Callable[[Event, Context], Any], Callable[[Any, type], Response]]:
    """The call and the result conversion for a handler written in ``signature`` style."""
    if signature == "native":
        return handler, normalise
    if signature == "functions-framework":
        return (lambda event, context: handler(FrameworkRequest(event))), _framework_result
    if signature == "lambda":
        return (lambda event, context: handler(lambda_event(event), context)), _lambda_result
    raise ValueError(f"unknown handler signature {signature!r}")
