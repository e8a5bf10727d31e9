"""Sequences (OpenWhisk-style pipelines): a function made of other functions, run in order.

A sequence is deployed as an ordinary function whose generated handler calls each stage through
the intravisor (``context.call``), handing each stage's result to the next; so it is versioned,
scaled, logged and invoked like any other function.
"""
from __future__ import annotations

from typing import Any

from capfaas.core.intravisor import MAX_CALL_DEPTH
from capfaas.core.spec import check_name
from capfaas.registry import InvalidInput

HANDLER = '''"""A sequence: each stage's result is the next stage's input."""
STAGES = {stages!r}


def _content_type(headers):
    return {{k: v for k, v in headers.items() if k.lower() == "content-type"}}


def handle(event, context):
    data = event.capability if event.capability is not None else event.body
    headers = _content_type(event.headers)
    for stage in STAGES:
        answer = context.call(stage, data, headers=headers)
        data = answer.capability if answer.capability is not None else answer.body
        if answer.status >= 400:
            break
        headers = _content_type(answer.headers)
    return {{"statusCode": answer.status, "headers": answer.headers, "body": data}}
'''


def stages_of(value: Any) -> list[str]:
    """The stage names of a ``sequence`` field, checked: 1 to MAX_CALL_DEPTH - 1 valid names."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidInput("'code.sequence' must be a non-empty list of function names")
    if len(value) >= MAX_CALL_DEPTH:
        raise InvalidInput(f"a sequence has at most {MAX_CALL_DEPTH - 1} stages, got {len(value)}")
    return [check_name(name) for name in value]


def sequence_handler(stages: list[str]) -> bytes:
    return HANDLER.format(stages=stages).encode()
