"""The HTTP gateway: OpenFaaS's API over capfaas's cVMs (aiohttp on uvloop)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from capfaas import __version__
from capfaas.core.broker import FileError
from capfaas.core.capability import Capability
from capfaas.core.intravisor import DEFAULT_REGION_SIZE, CVMStartError, FunctionLoadError, Intravisor, Invocation, Result
from capfaas.core.outstream import StreamFailed
from capfaas.core.runtime import INLINE_LIMIT
from capfaas.core.spec import SpecError, check_name
from capfaas.credentials import check_basic_auth
from capfaas.plugins.pooling import PoolBusy
from capfaas.registry import (AlreadyExists, BundleTooLarge, DeploymentRecord, InvalidInput, NotFound, Registry,
                              RegistryError, parse_limits)

from .async_calls import AsyncCalls
from .calls import Call, call_of
from .capfiles import declared_files
from .streaming import invoke_streaming
from .logs import LogStore
from .metrics import FunctionMeter, Metrics
from .openapi import openapi_document
from .sequences import sequence_handler, stages_of
from .service import FunctionService

MiB = 1 << 20
MAX_LIMIT = (1 << 63) - 1
MAX_CAP_FILE = DEFAULT_REGION_SIZE // 2
"""A CAP_File must fit the grant space of a cVM that maps it."""


@dataclass
class Settings:
    """What ``capfaas serve`` configures."""

    state_dir: Path
    admin_password: str
    max_body: int = 256 * MiB
    max_bundle: int = 16 * MiB
    body_timeout: float = 60.0
    """Seconds a client may take to send a request body before the gateway gives up (408), and to
    read each 4 MiB of a response before the gateway drops the connection."""
    keepalive_timeout: float = 15.0
    """Seconds an idle keep-alive connection stays open, and that a new connection has to send its
    first request's headers (aiohttp's own default is an hour: a slow-headers client's delight)."""
    queue: int = 64
    async_queue: int = 1024
    async_queue_bytes: int = 1 << 30
    async_workers: int = 8
    cpu_placement: str = "auto"
    """Whether the event loop takes a CPU of its own: ``auto`` (while busy), ``dedicated``, ``shared``."""
    extra: dict[str, Any] = field(default_factory=dict)


STATE = web.AppKey("state", Any)


@dataclass
class Gateway:
    settings: Settings
    service: FunctionService
    intravisor: Intravisor
    pm: pluggy.PluginManager
    metrics: Metrics
    logs: LogStore
    async_calls: AsyncCalls | None = None
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


def _gateway(request: web.Request) -> Gateway:
    return request.app[STATE]


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message.rstrip() + "\n", headers=headers)


# -- middleware ---------------------------------------------------------------------------------

@web.middleware
async def require_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/system/*`` needs HTTP basic auth as ``admin``; invocations and health are open."""
    if request.path.startswith("/system/"):
        password = _gateway(request).settings.admin_password
        if not check_basic_auth(request.headers.get("Authorization"), password):
            return _text(401, "authentication required: use basic auth as admin",
                         **{"WWW-Authenticate": 'Basic realm="capfaas"'})
    return await handler(request)


# -- system routes ------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return _text(200, "OK")


async def system_info(request: web.Request) -> web.Response:
    backend = _gateway(request).intravisor.backend
    return web.json_response({
        "provider": {"provider": "capfaas", "orchestration": f"cVM ({backend.name} backend)",
                     "version": {"sha": "", "release": __version__}},
        "version": {"sha": "", "release": __version__, "commit_message": ""},
        "arch": "x86_64" if backend.name == "emulated" else "arm64",
    })


def _status(gateway: Gateway, name: str) -> dict[str, Any]:
    deployed = gateway.service.live[name]
    record = deployed.info.record
    extra = record.extra
    return {
        "name": name,
        "image": extra.get("image", f"capfaas:{name}:{deployed.info.version}"),
        "namespace": extra.get("namespace", "capfaas"),
        "envProcess": extra.get("envProcess", f"{record.module}:{record.handler}"),
        "envVars": dict(record.env),
        "constraints": extra.get("constraints", []),
        "secrets": list(record.secrets),
        "labels": dict(record.labels),
        "annotations": dict(record.annotations),
        "limits": {k: str(v) for k, v in record.limits.items()} or None,
        "requests": extra.get("requests"),
        "readOnlyRootFilesystem": True,
        "invocationCount": deployed.invocations,
        "replicas": deployed.pool.replicas,
        "availableReplicas": deployed.pool.available,
        "createdAt": deployed.info.function_created_at,
        "usage": {"cpu": 0, "totalMemoryBytes": 0},
        "capfaas": {"version": deployed.info.version, "deployedAt": deployed.info.created_at,
                    "signature": record.signature, "handler": record.handler, "module": record.module,
                    "coldStarts": deployed.pool.cold_starts,
                    "maxReplicas": deployed.pool.scaling.max, "minReplicas": deployed.pool.scaling.min},
    }


async def list_functions(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    return web.json_response([_status(gateway, name) for name in sorted(gateway.service.live)])


async def get_function(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    name = request.match_info["name"]
    if name not in gateway.service.live:
        return _text(404, f"function {name!r} not found")
    return web.json_response(_status(gateway, name))


async def _json_body(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():  # read(n) returns what has arrived, not n bytes
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size,
                                                text=f"request body larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid JSON: {exc}\n") from None


def parse_deployment(body: Any) -> tuple[DeploymentRecord, dict[str, bytes]]:
    """An OpenFaaS FunctionDeployment plus capfaas's ``code`` field, as a record and its files.

    ``code`` is ``{"files": {path: base64}, "module": "handler.py", "handler": "handle",
    "signature": "native", "network": false}``, or ``{"sequence": [stage, ...]}`` for a pipeline
    of deployed functions; ``image`` has no meaning here and is only kept.
    """
    if not isinstance(body, dict):
        raise InvalidInput("a deployment must be a JSON object")
    service = body.get("service")
    if not isinstance(service, str):
        raise InvalidInput("'service' (the function name) is required")
    check_name(service)
    code = body.get("code")
    sequence: list[str] = []
    if isinstance(code, dict) and "sequence" in code:  # a pipeline of deployed functions
        sequence = stages_of(code["sequence"])
        code = {**code, "files": {"handler.py": base64.b64encode(sequence_handler(stages_of(code["sequence"]))).decode()},
                "module": "handler.py", "handler": "handle", "signature": "native"}
    if not isinstance(code, dict) or not isinstance(code.get("files"), dict) or not code["files"]:
        raise InvalidInput("'code.files' must map file paths to base64 contents")
    files: dict[str, bytes] = {}
    for path, content in code["files"].items():
        if not isinstance(content, str):
            raise InvalidInput(f"the content of {path!r} must be a base64 string")
        try:
            files[path] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"the content of {path!r} is not valid base64") from None
    declared_files(body.get("capFiles"), MAX_CAP_FILE)  # checked now; kept with the other extra fields
    known = {"service", "code", "envVars", "secrets", "labels", "annotations", "limits"}
    extra = {k: v for k, v in body.items() if k not in known}
    if sequence:
        extra["sequence"] = sequence  # its bodies go into shared objects, handed from stage to stage
    if not isinstance(body.get("limits") or {}, dict):
        raise InvalidInput("'limits' must be an object such as {\"memory\": \"128Mi\"}")
    if not isinstance(body.get("secrets") or [], list):
        raise InvalidInput("'secrets' must be a list of secret names")
    limits = dict(body.get("limits") or {})
    for key in ("timeout", "cpu_seconds", "open_files", "output", "tmp", "concurrency"):
        if key in code:
            limits[key] = code[key]
    _check_limit_range(limits)
    record = DeploymentRecord(
        name=service, module=code.get("module", "handler.py"), handler=code.get("handler", "handle"),
        signature=code.get("signature", "native"), env=body.get("envVars") or {},
        secrets=tuple(body.get("secrets") or ()), labels=body.get("labels") or {},
        annotations=body.get("annotations") or {}, limits=limits,
        network=code.get("network", False), extra=extra)
    return record, files


def _check_limit_range(limits: dict[str, Any]) -> None:
    """Refuse limits too large for the control channel and rlimits (64-bit) before a cVM sees them."""
    try:
        parsed = dataclasses.asdict(parse_limits(limits))
    except (SpecError, TypeError, ValueError, ArithmeticError) as exc:
        raise InvalidInput(str(exc)) from None
    for key, value in parsed.items():
        if not math.isfinite(value) or value > MAX_LIMIT:
            raise InvalidInput(f"limit {key} {limits.get(key, value)!r} is too large (at most {MAX_LIMIT})")


def _load_error(exc: FunctionLoadError) -> dict[str, Any]:
    """The 400 body for code that does not load: what (type, message) and where (file, line)."""
    error = dict(exc.error)
    kind = str(error.get("type", "Error"))
    message = str(error.get("message", ""))
    where = f" ({error['file']}, line {error.get('line')})" if "file" in error else ""
    if where.strip() in message:  # SyntaxError's own text already says where
        where = ""
    return {"error": "the function cannot be loaded", **error,
            "message": f"{message if message.startswith(kind + ':') else f'{kind}: {message}'}{where}"}


async def deploy_function(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    replace = request.method == "PUT"
    try:
        body = await _json_body(request, 2 * gateway.settings.max_bundle)
        record, files = parse_deployment(body)
        stages = body["code"].get("sequence") or [] if isinstance(body.get("code"), dict) else []
        missing = [stage for stage in stages if gateway.service.get(stage) is None]
        if missing:
            return _text(400, f"the sequence's stages must be deployed first; missing: {', '.join(missing)}")
        info = await gateway.service.deploy(record, files, replace=replace,
                                            max_bundle_bytes=gateway.settings.max_bundle)
    except FunctionLoadError as exc:
        return web.json_response(_load_error(exc), status=400)
    except CVMStartError as exc:
        return _text(400, f"the function's first instance could not start: {exc}")
    except NotFound as exc:
        return _text(404, str(exc))
    except AlreadyExists as exc:
        return _text(409, str(exc))
    except BundleTooLarge as exc:
        return _text(413, str(exc))
    except (RegistryError, SpecError) as exc:
        return _text(400, str(exc))
    return web.json_response({"name": info.name, "version": info.version}, status=200 if replace else 202)


async def delete_function(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    body = await _json_body(request, 64 << 10)
    name = body.get("functionName") if isinstance(body, dict) else None
    if not isinstance(name, str):
        return _text(400, "the body must be {\"functionName\": NAME}")
    if not await gateway.service.delete(name):
        return _text(404, f"function {name!r} not found")
    gateway.logs.lines.pop(name, None)
    return _text(200, f"function {name!r} deleted")


async def list_cap_files(request: web.Request) -> web.Response:
    broker = _gateway(request).intravisor.broker
    return web.json_response([info.as_dict() for info in broker.list_files()])


async def delete_cap_file(request: web.Request) -> web.Response:
    broker = _gateway(request).intravisor.broker
    name = request.match_info["name"]
    try:
        broker.delete_file(name)
    except FileError as exc:
        return _text(404 if exc.kind == "FileNotFoundError" else 400, str(exc))
    return _text(200, f"CAP_File {name!r} deleted; every holder's access to it now faults")


async def scale_function(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    name = request.match_info["name"]
    if name not in gateway.service.live:
        return _text(404, f"function {name!r} not found")
    body = await _json_body(request, 64 << 10)
    replicas = body.get("replicas") if isinstance(body, dict) else None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        return _text(400, "the body must be {\"serviceName\": NAME, \"replicas\": N} with N >= 0")
    task = asyncio.ensure_future(_scale(gateway, name, replicas))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return _text(202, f"scaling {name!r} to {replicas} warm replicas")


async def _scale(gateway: Gateway, name: str, replicas: int) -> None:
    try:
        await gateway.service.scale(name, replicas)
    except Exception as exc:  # the request was answered 202 already: log it, as OpenFaaS does
        gateway.logs.add(name, "gateway", f"scaling to {replicas} replicas failed: {exc}".encode())


async def secrets(request: web.Request) -> web.Response:
    registry: Registry = _gateway(request).service.registry
    if request.method == "GET":
        return web.json_response([{"name": name} for name in registry.secret_names()])
    body = await _json_body(request, 1 << 20)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return _text(400, "the body must name the secret: {\"name\": NAME, ...}")
    name = body["name"]
    try:
        if request.method == "DELETE":
            return web.Response(status=204) if registry.delete_secret(name) else _text(404, f"secret {name!r} not found")
        if isinstance(body.get("rawValue"), str):
            value = base64.b64decode(body["rawValue"], validate=True)
        elif isinstance(body.get("value"), str):
            value = body["value"].encode()
        else:
            return _text(400, "give the secret's 'value' (text) or 'rawValue' (base64)")
        registry.set_secret(name, value, create=request.method == "POST")
    except AlreadyExists as exc:
        return _text(409, str(exc))
    except NotFound as exc:
        return _text(404, str(exc))
    except (RegistryError, SpecError, binascii.Error, ValueError) as exc:
        return _text(400, str(exc))
    return _text(201 if request.method == "POST" else 200, f"secret {name!r} stored")


async def system_logs(request: web.Request) -> web.StreamResponse:
    gateway = _gateway(request)
    name = request.query.get("name", "")
    if not name:
        return _text(400, "name a function: /system/logs?name=NAME")
    try:
        tail = int(request.query["tail"]) if request.query.get("tail") else None
        since = _parse_since(request.query.get("since"))
    except ValueError as exc:
        return _text(400, str(exc))
    follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    queue = gateway.logs.follow(name) if follow else None
    try:
        for line in gateway.logs.tail(name, tail if tail is None or tail >= 0 else None, since):
            await response.write((json.dumps(line.as_openfaas()) + "\n").encode())
        while queue is not None:
            line = await queue.get()
            if line is None:  # the gateway is shutting down
                break
            await response.write((json.dumps(line.as_openfaas()) + "\n").encode())
    finally:
        if queue is not None:
            gateway.logs.unfollow(name, queue)
    await response.write_eof()
    return response


def _parse_since(value: str | None) -> float | None:
    if not value:
        return None
    try:
        from datetime import datetime
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"since must be an RFC 3339 time such as 2026-01-02T03:04:05Z, got {value!r}") from None


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=_gateway(request).metrics.render(), content_type="text/plain")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# -- invocations --------------------------------------------------------------------------------

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "content-length"})
"""Headers a function may not set: they describe the connection, which is the gateway's."""
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SLICE = 4 * MiB
"""A response is written in slices of this size, each of which must drain within ``body_timeout``."""
_background: set[asyncio.Future[Any]] = set()
_scopes = itertools.count(1)
"""Numbers that make each invocation's buffer scope unique."""
def _function_headers(headers: dict[str, str]) -> dict[str, str] | None:
    """The function's response headers without hop-by-hop ones; None when one cannot be sent."""
    out = {}
    for item in headers.items():
        verdict = _header_verdicts.get(item) or _judge_header(*item)
        if verdict == "invalid":
            return None
        if verdict == "send":
            out[item[0]] = item[1]
    return out


_header_verdicts: dict[tuple[str, str], str] = {}
"""Verdicts on header lines functions sent (most send the same few again and again)."""


def _judge_header(key: str, value: str) -> str:
    """``send``, ``drop`` (hop-by-hop: the connection is the gateway's) or ``invalid`` HTTP."""
    if not _TOKEN.fullmatch(key) or _CONTROL.search(value):
        verdict = "invalid"
    else:
        verdict = "drop" if key.lower() in _HOP_BY_HOP else "send"
    if len(_header_verdicts) < 4096 and len(value) <= 256:  # bounded: values may differ every time
        _header_verdicts[key, value] = verdict
    return verdict


def _json_error(status: int, title: str, kind: str, message: str, call_id: str) -> web.Response:
    return web.json_response({"error": title, "type": kind, "message": message, "call_id": call_id},
                             status=status, headers={"X-Call-Id": call_id, "X-Served-By": "capfaas"})


async def _read_prefix(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """Up to about ``limit`` bytes of the body, and whether that is all of it.

    Read before an instance is taken, so a client slow to send a small body holds no instance.
    """
    length = request.content_length
    if length is not None:
        if length <= limit:
            return (await request.content.readexactly(length) if length else b""), True
        return b"", False  # large: straight into the cVM's memory once it has one
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


async def _read_rest(request: web.Request, gateway: Gateway, cvm: Any, prefix: bytes,
                     shared_as: str | None = None) -> tuple[Capability | bytes, int | None]:
    """A large body, written once into shared memory as it arrives (after ``prefix``): into the
    cVM's receive area, or, with ``shared_as`` (the invocation's buffer scope), into a shared object the
    function can hand on to others without a copy (a sequence's stages).

    An instance serving several invocations at once has no receive area to spare for each: its
    bodies are read into the gateway and travel inside the control message."""
    if cvm.spec.limits.concurrency > 1:
        chunks, size = [prefix], len(prefix)
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > gateway.settings.max_body:
                raise web.HTTPRequestEntityTooLarge(max_size=gateway.settings.max_body, actual_size=size,
                                                    text=f"request body larger than {gateway.settings.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks), None
    length = request.content_length
    area = cvm.receive_area[1]
    capacity = min(gateway.settings.max_body, area) if length is None else length
    if capacity > area:
        raise web.HTTPRequestEntityTooLarge(max_size=area, actual_size=capacity,
                                            text=f"request body larger than the {area}-byte receive area")
    broker = gateway.intravisor.broker
    if shared_as is not None and broker.can_map(cvm):
        cap, view = broker.payload(shared_as, cvm.spec.name, max(capacity, 1))
    else:
        cap, view = gateway.intravisor.receive_buffer(cvm, capacity)
    try:
        filled = len(prefix)
        if filled > capacity:
            raise web.HTTPRequestEntityTooLarge(max_size=capacity, actual_size=filled,
                                                text=f"request body larger than {capacity} bytes")
        view[:filled] = prefix
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            if filled + len(chunk) > capacity:
                raise web.HTTPRequestEntityTooLarge(max_size=capacity, actual_size=filled + len(chunk),
                                                    text=f"request body larger than {capacity} bytes")
            view[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
    finally:
        view.release()
    if filled != capacity:
        cap = cap.set_bounds(filled)
    return cap, filled


def invocation_failed(gateway: Gateway, pool: Any, cvm: Any, call: Call, exc: Exception) -> web.Response:
    """The response when invoking raised (the gateway's or the backend's failure, not the
    function's); the instance is retired."""
    retire(gateway, pool, cvm, "the invocation failed")
    return _json_error(502, "the function's instance failed", type(exc).__name__,
                       f"function {call.name!r} could not be invoked: {exc}", call.call_id)


def retire(gateway: Gateway, pool: Any, cvm: Any, reason: str) -> None:
    """Stop an instance whose invocation was abandoned half-way (its reply would come to the next
    caller), then give it back to its pool, which replaces it on demand."""
    task = asyncio.ensure_future(gateway.intravisor.stop(cvm, reason))
    _background.add(task)

    def done(finished: asyncio.Future[Any]) -> None:
        _background.discard(finished)
        pool.release(cvm)

    task.add_done_callback(done)


async def invoke_function(request: web.Request) -> web.StreamResponse:
    gateway = _gateway(request)
    call = call_of(request)
    name = call.name
    if gateway.service.get(name) is None:
        return _text(404, f"function {name!r} not found")
    if request.content_length is not None and request.content_length > gateway.settings.max_body:
        return _text(413, f"request body of {request.content_length} bytes is larger than the "
                          f"{gateway.settings.max_body}-byte maximum")
    try:
        if not request.body_exists:  # a GET, or no body announced: nothing to read
            prefix, complete = b"", True
        elif request.content.is_eof() and (request.content_length or 0) <= INLINE_LIMIT:
            prefix, complete = await _read_prefix(request, INLINE_LIMIT)  # all here already: no wait
        else:
            async with asyncio.timeout(gateway.settings.body_timeout):
                prefix, complete = await _read_prefix(request, INLINE_LIMIT)
    except TimeoutError:
        return _text(408, f"the request body did not arrive within {gateway.settings.body_timeout:g} s")
    except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError):
        return _text(400, "the client closed the connection before sending the whole body")
    outcome = await run_call(gateway, call, prefix, complete, request)
    if type(outcome) is not tuple:  # a response ends the call (isinstance on aiohttp's ABC costs a microsecond)
        return outcome
    deployed, result, cold, cvm = outcome
    response = None
    try:
        response = await _respond(request, gateway, call, answer(gateway, deployed, call, result, cold), result)
        return response
    finally:
        finished = (deployed.pool.release, cvm, gateway.metrics.meter(name), result.duration,
                    None if response is None else response.status, response and response.content_length)
        if type(response) is web.Response:  # its own copy of the body, sent once we return: count after
            asyncio.get_running_loop().call_soon(finished_call, *finished)
        else:  # a view of the cVM's memory, already written, or nothing sent
            finished_call(*finished)


def finished_call(release: Callable[[Any], None], cvm: Any, meter: FunctionMeter, seconds: float,
                  status: int | None, length: int | None) -> None:
    """The bookkeeping of an answered invocation: its instance given back, its figures counted
    (``status`` None: nothing was sent)."""
    release(cvm)
    if status is not None:
        meter.finished(str(status), seconds, length or 0)


def acquire_failed(name: str, exc: BaseException) -> web.Response:
    """The response when no instance of ``name`` could be had."""
    if isinstance(exc, PoolBusy):
        return _text(429, str(exc), **{"Retry-After": str(exc.retry_after)})
    if isinstance(exc, FunctionLoadError):
        return _text(502, f"function {name!r} failed to start: {exc}")
    return _text(502, f"function {name!r} could not start an instance: {exc}")


def not_found(name: str) -> web.Response:
    return _text(404, f"function {name!r} not found")


async def _acquire(gateway: Gateway, name: str) -> tuple[Any, Any, bool] | web.Response:
    """The current version of ``name`` and an instance of it; a response when there is none."""
    while True:
        deployed = gateway.service.get(name)
        if deployed is None:
            return not_found(name)
        pool = deployed.pool
        try:
            cvm, cold = await pool.acquire()
            return deployed, cvm, cold
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pool.closed and task is not None and not task.cancelling():
                continue  # a new version replaced the one this request queued for: queue there
            raise
        except Exception as exc:
            return acquire_failed(name, exc)


def new_scope(call_id: str) -> str:
    """The scope of an invocation's shared buffers: the client chooses X-Call-Id, this is ours alone."""
    return f"{call_id}#{next(_scopes)}"


def begin_invocation(gateway: Gateway, deployed: Any, call: Call, body: Any, length: int | None,
                     scope: str) -> Invocation:
    """Count an invocation as started (in the gateway's in-flight count too, which shutdown
    drains: pair it with ``end_invocation``), and make it."""
    meter = gateway.metrics.meter(call.name)
    meter.started[0] += 1
    meter.bytes_in[0] += length or len(body)
    deployed.invocations += 1
    gateway.in_flight += 1
    # positionally (then inline, chain, root): see Result
    return Invocation(call.method, call.path, call.query, call.headers, body, length, call.call_id, False, (), scope)


def end_invocation(gateway: Gateway) -> None:
    gateway.in_flight -= 1
    if gateway.in_flight == 0:
        gateway.drained.set()


async def run_call(gateway: Gateway, call: Call, prefix: bytes, complete: bool,
                   request: web.Request | None) -> tuple[Any, Result, bool, Any] | web.StreamResponse:
    """Acquire an instance, read the rest of the body (from ``request``, unless ``complete``) and
    invoke; the outcome, or the error response that ends the call."""
    name, call_id = call.name, call.call_id
    started = time.monotonic()
    scope = new_scope(call_id)
    acquired = await _acquire(gateway, name)
    if type(acquired) is not tuple:
        return acquired
    deployed, cvm, cold = acquired
    pool = deployed.pool
    if cold:
        gateway.metrics.inc("capfaas_cold_starts_total", function_name=name)
        gateway.metrics.observe("capfaas_start_seconds", time.monotonic() - started, function_name=name)
    body: Any = prefix
    length: int | None = None
    streamed = not complete and request is not None and request.content_length is None \
        and gateway.intravisor.broker.can_map(cvm)
    try:
        if not complete and not streamed:
            assert request is not None
            async with asyncio.timeout(gateway.settings.body_timeout):
                shared_as = scope if "sequence" in deployed.info.record.extra else None
                body, length = await _read_rest(request, gateway, cvm, prefix, shared_as)
    except TimeoutError:
        gateway.intravisor.broker.release(scope)
        pool.release(cvm)
        return _text(408, f"the request body did not arrive within {gateway.settings.body_timeout:g} s")
    except web.HTTPException as exc:
        gateway.intravisor.broker.release(scope)
        pool.release(cvm)
        return _text(exc.status, exc.text or exc.reason)
    except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError):
        gateway.intravisor.broker.release(scope)
        pool.release(cvm)
        return _text(400, "the client closed the connection before sending the whole body")
    except BaseException:
        pool.release(cvm)
        raise
    invocation = begin_invocation(gateway, deployed, call, body, length, scope)
    try:
        if streamed:
            assert request is not None
            result = await invoke_streaming(gateway, cvm, invocation, request, prefix)
            if isinstance(result, web.StreamResponse):
                pool.release(cvm)
                return result
        else:
            result = await gateway.intravisor.invoke(cvm, invocation)
    except asyncio.CancelledError:
        retire(gateway, pool, cvm, "the client went away during the invocation")
        raise
    except Exception as exc:
        return invocation_failed(gateway, pool, cvm, call, exc)
    finally:
        end_invocation(gateway)
    return deployed, result, cold, cvm


def _error_body(result: Result, call_id: str) -> bytes:
    error = result.error or {}
    return json.dumps({"error": _ERROR_TITLES.get(result.outcome, "function failed"),
                       "type": error.get("type", "Error"), "message": error.get("message", ""),
                       "call_id": call_id, **({"file": error["file"], "line": error.get("line")}
                                              if "file" in error else {})}).encode()


_ERROR_TITLES = {"error": "the handler raised an exception", "timeout": "the function timed out",
                 "crashed": "the function's instance crashed", "fault": "the function broke a capability rule"}


@dataclass(slots=True)
class Answer:
    """What an invocation's response is to be: its body is bytes (the gateway's own copy), a view
    of the cVM's memory, or ``stream`` when the function streams it; ``headers`` are the function's
    (or the error's), and the invocation's own follow them."""

    status: int
    headers: dict[str, str]
    body: Any
    streamed: bool
    call_id: str
    start_ns: int
    duration: float
    cold: bool

    def all_headers(self) -> dict[str, str]:
        """The response's headers, the invocation's included (as ``invocation_lines`` has them)."""
        return {**self.headers, "X-Call-Id": self.call_id, "X-Start-Time": str(self.start_ns),
                "X-Duration-Seconds": f"{self.duration:.6f}", "X-Served-By": "capfaas",
                "X-Cold-Start": "1" if self.cold else "0"}

    def invocation_lines(self) -> str:
        """The invocation's headers as lines of a response head (one string: quicker than a dict
        joined per request)."""
        return (f"X-Call-Id: {self.call_id}\r\nX-Start-Time: {self.start_ns}\r\n"
                f"X-Duration-Seconds: {self.duration:.6f}\r\nX-Served-By: capfaas\r\n"
                f"X-Cold-Start: {'1' if self.cold else '0'}\r\n")


def answer(gateway: Gateway, deployed: Any, call: Call, result: Result, cold: bool) -> Answer:
    """The response to an invocation's result (its output logged, its fault counted)."""
    call_id = call.call_id
    if result.stdout or result.stderr:
        gateway.logs.add(deployed.spec.name, call_id, result.stdout + result.stderr)
    status = result.status
    body: Any = result.body
    if result.outcome == "ok":
        headers = _function_headers(result.headers)
        if headers is None or status < 200:
            problem = ("InvalidHeader", f"returned a header that is not valid HTTP: {sorted(result.headers)!r}") \
                if headers is None else ("InvalidStatus", f"returned the informational status {status} as its answer")
            status = 502
            body = json.dumps({"error": "the function's response cannot be sent", "type": problem[0],
                               "message": f"function {deployed.spec.name!r} {problem[1]}", "call_id": call_id}).encode()
            headers = {"Content-Type": "application/json"}
        streamed = result.stream is not None and status == result.status
    else:
        if result.outcome == "fault":
            gateway.metrics.inc("capfaas_capability_faults_total", function_name=deployed.spec.name)
        body = _error_body(result, call_id)
        headers = {"Content-Type": "application/json"}
        streamed = False
    return Answer(status, headers, body, streamed, call_id, call.start_ns, result.duration, cold)


async def _respond(request: web.Request, gateway: Gateway, call: Call, reply: Answer,
                   result: Result) -> web.StreamResponse:
    status, headers, body = reply.status, reply.all_headers(), reply.body
    if reply.streamed:
        response = web.StreamResponse(status=status, headers=headers)
        response.enable_chunked_encoding()
        sent = await relay_stream(gateway, call, result.stream, response.write, start=response.prepare(request))
        if not (sent and await _within(gateway, response.write_eof())) and request.transport is not None:
            request.transport.abort()
        return response
    if isinstance(body, bytes):  # the gateway's own copy (small results come inline): aiohttp sends it
        return web.Response(status=status, headers=headers, body=body)
    # a view of the cVM's memory: written before the instance is given back (the caller's finally)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    if request.method == "HEAD" or status in (204, 304):  # no body may follow these
        await response.write_eof()
        return response
    sent = await relay_view(gateway, body, response.write)
    if not (sent and await _within(gateway, response.write_eof())) and request.transport is not None:
        request.transport.abort()
    return response


async def _within(gateway: Gateway, step: Awaitable[Any]) -> bool:
    """Whether ``step`` (a write the client must read) finished within ``body_timeout``."""
    try:
        async with asyncio.timeout(gateway.settings.body_timeout):
            await step
        return True
    except TimeoutError:
        return False


async def relay_view(gateway: Gateway, body: Any, write: Callable[[Any], Awaitable[None]]) -> bool:
    """Send a view of a cVM's memory with ``write``, straight from it; False when the client
    stalled past ``body_timeout`` (the caller drops the connection: the instance must not wait)."""
    if len(body) <= 1 << 16:  # fits the transport's buffer: the write cannot stall
        await write(body)
        return True
    view = memoryview(body)
    try:
        for offset in range(0, len(view), _SLICE):
            async with asyncio.timeout(gateway.settings.body_timeout):
                await write(view[offset:offset + _SLICE])
        return True
    except TimeoutError:
        return False
    finally:
        view.release()


async def relay_stream(gateway: Gateway, call: Call, stream: Any, write: Callable[[bytes], Awaitable[None]],
                       start: Awaitable[Any] | None = None) -> bool:
    """Send a streamed body chunk by chunk as the function writes it (after ``start``, the head,
    where that is awaited); False when it broke off (the generator raised, the time ran out, a
    stalled reader, a client gone): the caller drops the connection, so the client sees the body
    incomplete."""
    try:
        if start is not None:
            await start
        async for chunk in stream.chunks():
            async with asyncio.timeout(gateway.settings.body_timeout):  # a stalled reader frees the instance
                await write(chunk)
        error = await stream.finish()
    except (StreamFailed, TimeoutError, ConnectionError) as exc:
        await stream.abandon(f"its streamed response broke off: {exc}")
        error = {"message": str(exc)}
    except asyncio.CancelledError:  # the client went away: its instance is stopped before it is given back
        await asyncio.shield(stream.abandon("the client went away during its streamed response"))
        raise
    if error:
        gateway.logs.add(call.name, call.call_id, f"the streamed response broke off: {error.get('message')}".encode())
        return False
    return True


async def invoke_async(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    name = request.match_info["name"]
    if gateway.service.get(name) is None:
        return _text(404, f"function {name!r} not found")
    assert gateway.async_calls is not None
    return await gateway.async_calls.accept(request)


# -- the application ----------------------------------------------------------------------------

def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[require_auth], client_max_size=2 * gateway.settings.max_bundle,
                          handler_args={"max_field_size": 16 << 10, "max_line_size": 16 << 10,
                                        "keepalive_timeout": gateway.settings.keepalive_timeout})
    app[STATE] = gateway

    async def end_log_followers(app: web.Application) -> None:
        gateway.logs.close()

    app.on_shutdown.append(end_log_followers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/system/info", system_info)
    app.router.add_get("/system/functions", list_functions)
    app.router.add_post("/system/functions", deploy_function)
    app.router.add_put("/system/functions", deploy_function)
    app.router.add_delete("/system/functions", delete_function)
    app.router.add_get("/system/function/{name}", get_function)
    app.router.add_post("/system/scale-function/{name}", scale_function)
    for method in ("GET", "POST", "PUT", "DELETE"):
        app.router.add_route(method, "/system/secrets", secrets)
    app.router.add_get("/system/logs", system_logs)
    app.router.add_get("/system/files", list_cap_files)
    app.router.add_delete("/system/files/{name}", delete_cap_file)
    app.router.add_route("*", "/function/{name}", invoke_function)
    app.router.add_route("*", "/function/{name}/{path:.*}", invoke_function)
    app.router.add_post("/async-function/{name}", invoke_async)
    app.router.add_post("/async-function/{name}/{path:.*}", invoke_async)
    for routes in gateway.pm.hook.capfaas_gateway_routes():
        app.router.add_routes(routes)
    gateway.metrics.gauge("gateway_service_count", lambda: {
        (("function_name", n),): float(d.pool.replicas) for n, d in gateway.service.live.items()})
    gateway.metrics.gauge("capfaas_instances", lambda: {
        key: value for n, d in gateway.service.live.items() for key, value in (
            ((("function_name", n), ("state", "idle")), float(d.pool.available)),
            ((("function_name", n), ("state", "busy")), float(d.pool.replicas - d.pool.available)))})
    return app
