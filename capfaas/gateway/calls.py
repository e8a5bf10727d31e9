"""An invocation as it came over HTTP, whichever front end read it (aiohttp or ``fastpath``), and
whether it is answered now or later (``async_calls``)."""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

from aiohttp import web

HIDDEN_HEADERS = frozenset({"authorization", "host", "connection"})
"""Request headers a function does not see: the gateway's credentials and the connection's."""

def _call_id_prefix() -> str:
    """The first 80 bits of every X-Call-Id this gateway makes: random, in a version 4 UUID's
    form (its version and RFC 4122 variant bits set)."""
    bits = random.getrandbits(128) & ~((0xF << 76) | (0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
    digits = "%032x" % bits
    return "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], ""))


_CALL_ID_PREFIX = _call_id_prefix()
_call_numbers = itertools.count(random.getrandbits(47))


@dataclass(slots=True)
class Call:
    """One invocation's request, as the function will see it."""

    name: str
    call_id: str
    method: str
    path: str
    """What follows ``/function/{name}``, with its leading slash."""
    query: dict[str, str]
    """Read only: the fast path shares one dict between requests to the same URL."""
    headers: dict[str, str]
    """The request's headers as the function sees them."""
    start_ns: int
    """When the gateway read it: nanoseconds since the epoch, as X-Start-Time gives it."""


def header_text(value: str) -> str:
    """A header value as text that can be sent on: bytes that are not UTF-8 (kept by aiohttp as
    surrogates, which neither the control channel nor a response can carry) read as Latin-1."""
    if value.isascii():
        return value
    try:
        value.encode()
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")


def new_call_id() -> str:
    """A version 4 UUID for X-Call-Id: the gateway's random prefix, then the next of its numbers,
    so ids never repeat within a gateway and differ between gateways. A call id correlates, it
    guards nothing (a client may choose its own), and counting costs a fifth of random digits."""
    return f"{_CALL_ID_PREFIX}{next(_call_numbers) & 0xFFFFFFFFFFFF:012x}"


def call_id_of(header: str | None) -> str:
    """The client's X-Call-Id, or a new one."""
    return (header_text(header) if header else "") or new_call_id()


def call_of(request: web.Request) -> Call:
    """The invocation an aiohttp request to ``/function/{name}[/{path}]`` asks for."""
    headers = {key: header_text(value) for key, value in request.headers.items() if key.lower() not in HIDDEN_HEADERS}
    return Call(request.match_info["name"], call_id_of(request.headers.get("X-Call-Id")), request.method,
                "/" + request.match_info.get("path", ""), dict(request.query) if request.query_string else {},
                headers, time.time_ns())
