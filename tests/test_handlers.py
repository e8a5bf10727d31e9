"""Handler conventions and result normalisation (pure functions: no cVM needed)."""
from __future__ import annotations

import base64
import logging

import pytest

from capfaas.core.capability import Capability
from capfaas.core.handlers import (
    Context,
    Event,
    HandlerResultError,
    adapt,
    lambda_event,
    normalise,
)
from capfaas.core.spec import FunctionSpec, Limits, SpecError


def event(body: bytes = b"hi") -> Event:
    return Event("POST", "/things/1", {"q": "x"}, {"Content-Type": "text/plain"}, body)


def context() -> Context:
    return Context("fn", "call-1", 0.0, logging.getLogger("t"))


def run(handler, signature: str, ev: Event | None = None):
    call, convert = adapt(handler, signature)
    return convert(call(ev or event(), context()), Capability)


@pytest.mark.parametrize(
    ("value", "status", "body", "content_type"),
    [
        ("text", 200, b"text", "text/plain; charset=utf-8"),
        (b"\x00\x01", 200, b"\x00\x01", "application/octet-stream"),
        (None, 200, b"", None),
        ({"statusCode": 201, "body": {"a": 1}}, 201, b'{"a": 1}', "application/json"),
        ({"statusCode": 404, "body": "nope", "headers": {"X-A": 1}}, 404, b"nope", "text/plain; charset=utf-8"),
        ([1, 2], 200, b"[1, 2]", "application/json"),
    ],
)
def test_native_results(value, status, body, content_type) -> None:
    response = normalise(value, Capability)
    assert (response.status, bytes(response.body)) == (status, body)
    assert response.headers.get("Content-Type") == content_type


def test_buffers_and_capabilities_pass_through_uncopied() -> None:
    data = bytearray(b"zero-copy")
    assert normalise(memoryview(data), Capability).body.obj is data
    cap = Capability.root()
    assert normalise(cap, Capability).body is cap


def test_bad_results_are_reported() -> None:
    with pytest.raises(HandlerResultError, match="cannot send a set"):
        normalise({1, 2}, Capability)
    with pytest.raises(HandlerResultError, match="statusCode"):
        normalise({"statusCode": 99, "body": ""}, Capability)


def test_functions_framework_style() -> None:
    def handler(request):
        return f"{request.method} {request.path} {request.args['q']} {request.get_data(as_text=True)}", 202, {"X-B": "2"}

    response = run(handler, "functions-framework")
    assert (response.status, response.body, response.headers["X-B"]) == (202, b"POST /things/1 x hi", "2")
    assert run(lambda r: r.get_json(), "functions-framework", event(b'{"k": 3}')).body == b'{"k": 3}'


def test_lambda_style() -> None:
    def handler(ev, ctx):
        assert ctx.aws_request_id == "call-1" and ctx.get_remaining_time_in_millis() == 0
        return {"statusCode": 200, "body": base64.b64encode(ev["body"].encode()).decode(), "isBase64Encoded": True}

    assert run(handler, "lambda").body == b"hi"
    payload = lambda_event(event(b"\xff\xfe"))
    assert payload["isBase64Encoded"] and base64.b64decode(payload["body"]) == b"\xff\xfe"
    assert payload["httpMethod"] == "POST" and payload["queryStringParameters"] == {"q": "x"}


def test_event_helpers() -> None:
    assert event(b'{"a": [1]}').json() == {"a": [1]}


def test_spec_validation(tmp_path) -> None:
    FunctionSpec(name="ok.fn-1_2", bundle=tmp_path, module="fn.py")
    for bad in ("", "..", "a/b", "a b", "x" * 64):
        with pytest.raises(SpecError, match="function name"):
            FunctionSpec(name=bad, bundle=tmp_path, module="fn.py")
    with pytest.raises(SpecError, match="signature"):
        FunctionSpec(name="f", bundle=tmp_path, module="fn.py", signature="wsgi")
    with pytest.raises(SpecError, match="module"):
        FunctionSpec(name="f", bundle=tmp_path, module="../fn.py")
    with pytest.raises(SpecError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(SpecError, match="memory"):
        Limits(memory=-1)
