"""Run the gateway: open the state, start the intravisor, restore functions, serve, drain."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from capfaas.core.backend import select_backend
from capfaas.core.intravisor import Intravisor, Invocation
from capfaas.core.outstream import collected
from capfaas.credentials import admin_password, ensure_state_dir
from capfaas.plugin_manager import make_plugin_manager
from capfaas.registry import Registry

from .app import Gateway, Settings, _acquire, _error_body, retire, create_app
from .async_calls import AsyncCalls, Queued
from .fastpath import GatewayRunner
from .logs import LogStore
from .metrics import gateway_metrics
from .placement import Placement
from .service import FunctionService

log = logging.getLogger("capfaas.gateway")
DRAIN_SECONDS = 30.0
ASYNC_BUSY_RETRIES = 8


async def open_gateway(settings: Settings, backend: str = "auto") -> Gateway:
    """Everything behind the routes, started; ``close_gateway`` undoes it."""
    pm = make_plugin_manager()
    backend_class = select_backend([cls for group in pm.hook.capfaas_backends() for cls in group], backend)
    intravisor = Intravisor(backend_class(), pm)
    await intravisor.start()
    registry = Registry(settings.state_dir)
    service = FunctionService(registry, intravisor, pm, settings.state_dir, queue=settings.queue)
    gateway = Gateway(settings, service, intravisor, pm, gateway_metrics(), LogStore())
    service.on_output = gateway.logs.add  # what called functions print is logged like any invocation's
    gateway.async_calls = AsyncCalls(lambda queued: _invoke_queued(gateway, queued),
                                     settings.async_queue, settings.async_workers, max_body=settings.max_body,
                                     max_bytes=settings.async_queue_bytes)
    await service.restore()
    service.start_reaper()
    return gateway


async def _invoke_queued(gateway: Gateway, queued: Queued) -> tuple[int, dict[str, str], bytes, float]:
    """One asynchronous call, as its callback reports it; waits out a busy function (as OpenFaaS's
    queue-worker retries) and answers failures with the status and JSON body a synchronous call gets."""
    call = queued.call
    delay = 0.1
    for _ in range(ASYNC_BUSY_RETRIES):
        acquired = await _acquire(gateway, call.name)
        if not (isinstance(acquired, web.Response) and acquired.status == 429):
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
    if isinstance(acquired, web.Response):
        return acquired.status, {"Content-Type": "text/plain; charset=utf-8"}, bytes(acquired.body or b""), 0.0
    deployed, cvm, _ = acquired
    gateway.metrics.inc("gateway_function_invocation_started", function_name=call.name)
    try:
        result = await collected(await gateway.intravisor.invoke(cvm, Invocation(
            method=call.method, path=call.path, query=call.query, headers=call.headers,
            body=queued.body, id=call.call_id)))  # a callback gets the whole body at once
    except asyncio.CancelledError:  # cancelled at shutdown: the instance is mid-call and cannot be reused
        retire(gateway, deployed.pool, cvm, "asynchronous invocation abandoned")
        raise
    except Exception as exc:
        retire(gateway, deployed.pool, cvm, "asynchronous invocation failed")
        failure = {"error": "the function's instance failed", "type": type(exc).__name__,
                   "message": f"function {call.name!r} could not be invoked: {exc}", "call_id": call.call_id}
        return 502, {"Content-Type": "application/json"}, json.dumps(failure).encode(), 0.0
    try:
        gateway.logs.add(call.name, call.call_id, result.stdout + result.stderr)
        gateway.metrics.inc("gateway_function_invocation_total", function_name=call.name, code=str(result.status))
        if result.outcome != "ok":
            return result.status, {"Content-Type": "application/json"}, _error_body(result, call.call_id), result.duration
        return result.status, result.headers, bytes(result.body), result.duration
    finally:
        deployed.pool.release(cvm)


async def close_gateway(gateway: Gateway) -> None:
    if gateway.async_calls is not None:
        await gateway.async_calls.close(DRAIN_SECONDS)
    await gateway.service.close()
    await gateway.intravisor.close()
    gateway.service.registry.close()


async def deploy_directory(gateway: Gateway, directory: Path) -> list[str]:
    """Deploy (or update) every ``*.py`` in ``directory`` as a function named after its file."""
    from capfaas.registry import DeploymentRecord

    deployed = []
    for path in sorted(directory.glob("*.py")):
        record = DeploymentRecord(name=path.stem, module=path.name)
        replace = gateway.service.registry.current(path.stem) is not None
        files = {path.name: path.read_bytes()}
        current = gateway.service.get(path.stem)
        if current is not None and gateway.service.registry.files(path.stem, current.info.version) == files:
            continue  # unchanged since the last start: keep the version it has
        await gateway.service.deploy(record, files, replace=replace, max_bundle_bytes=gateway.settings.max_bundle)
        deployed.append(path.stem)
    return deployed


async def serve(settings: Settings, host: str, port: int, backend: str, deploy: Iterable[Path] = ()) -> None:
    gateway = await open_gateway(settings, backend)
    placement: Placement | None = None
    try:
        placement = Placement(gateway.intravisor.backend, settings.cpu_placement)
        placement.start()
        gateway.metrics.gauge("capfaas_gateway_dedicated_cpu", lambda placed=placement: {(): float(placed.dedicated)})
        for directory in deploy:
            names = await deploy_directory(gateway, directory)
            if names:
                log.warning("deployed from %s: %s", directory, ", ".join(names))
        app = create_app(gateway)
        runner = GatewayRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=DRAIN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
        print(f"capfaas gateway on http://{host}:{port} ({gateway.intravisor.backend.name} backend, "
              f"state in {settings.state_dir}); functions: {', '.join(sorted(gateway.service.live)) or 'none'}",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.warning("shutting down: draining in-flight invocations")
        await runner.cleanup()  # stops accepting, waits for in-flight requests up to the drain time
    finally:
        if placement is not None:
            placement.close()
        await close_gateway(gateway)


def run_server(state_dir: Path, host: str, port: int, backend: str, deploy: Iterable[Path], **options: Any) -> None:
    state_dir = ensure_state_dir(state_dir)
    password = admin_password(state_dir, create=True)
    assert password is not None
    settings = Settings(state_dir=state_dir, admin_password=password, **options)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, host, port, backend, list(deploy)))
