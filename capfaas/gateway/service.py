"""Deployed functions as the gateway serves them: registry rows, their bundles, their pools.

A deploy is validated in a real cVM before it is committed, committed in one transaction, and only
then made current; the previous version's pool keeps serving the invocations it already started.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pluggy

from capfaas.core.intravisor import Intravisor, Invocation, Result
from capfaas.core.outstream import collected
from capfaas.core.spec import FunctionSpec
from capfaas.gateway.capfiles import create_declared, declared_files, delete_owned
from capfaas.plugins.pooling import Scaling
from capfaas.registry import DeploymentRecord, InvalidInput, NotFound, Registry, VersionInfo, check_bundle

SCALE_MIN = "com.openfaas.scale.min"
SCALE_MAX = "com.openfaas.scale.max"
SCALE_ZERO = "com.openfaas.scale.zero"
SCALE_ZERO_DURATION = "com.openfaas.scale.zero-duration"
REAP_INTERVAL = 1.0
DEFAULT_MAX = 4
log = logging.getLogger("capfaas.gateway")


@dataclass
class Deployed:
    """One live version of a function and the pool of its cVMs."""

    info: VersionInfo
    spec: FunctionSpec
    pool: Any
    invocations: int = 0


def _seconds(text: str, key: str) -> float:
    """``300``, ``90s``, ``15m`` or ``1h`` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise InvalidInput(f"label {key} must be a duration such as 90s or 15m, got {text!r}") from None
    if value <= 0:
        raise InvalidInput(f"label {key} must be positive, got {text!r}")
    return value


def scaling_of(labels: Mapping[str, str], queue: int) -> Scaling:
    """The pool bounds the OpenFaaS scaling labels ask for, checked."""
    def number(key: str, default: int, least: int) -> int:
        raw = labels.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidInput(f"label {key} must be a whole number, got {raw!r}") from None
        if value < least:
            raise InvalidInput(f"label {key} must be at least {least}, got {value}")
        return value

    low = number(SCALE_MIN, 0, 0)
    high = number(SCALE_MAX, max(DEFAULT_MAX, low), 1)
    if low > high:
        raise InvalidInput(f"{SCALE_MIN} ({low}) is larger than {SCALE_MAX} ({high})")
    zero = labels.get(SCALE_ZERO, "true").lower()
    if zero not in ("true", "false"):
        raise InvalidInput(f"label {SCALE_ZERO} must be true or false, got {zero!r}")
    idle = _seconds(labels[SCALE_ZERO_DURATION], SCALE_ZERO_DURATION) if SCALE_ZERO_DURATION in labels else 300.0
    return Scaling(min=low, max=high, queue=queue, scale_to_zero=zero == "true", idle_timeout=idle)


class FunctionService:
    """The registry, the intravisor and the pools, kept consistent."""

    def __init__(self, registry: Registry, intravisor: Intravisor, pm: pluggy.PluginManager,
                 state_dir: Path, *, queue: int = 64) -> None:
        self.registry = registry
        self.intravisor = intravisor
        self.pm = pm
        self.state_dir = state_dir
        self.queue = queue
        self.live: dict[str, Deployed] = {}
        self._lock = asyncio.Lock()
        self._make_pool = pm.hook.capfaas_pool_factory()
        self._reaper: asyncio.Task[None] | None = None
        self._warming: dict[Any, asyncio.Task[None]] = {}
        """Per pool, the background start of its minimum of warm instances, while it runs."""
        self._warm_failures: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        """Per pool, why its last warm-up failed: the reaper retries each second, the log says it once."""
        self.on_output: Callable[[str, str, bytes], None] | None = None
        """Receives (function, invocation id, output) of invocations made by other functions."""
        intravisor.router = self.call

    def start_reaper(self) -> None:
        """Once a second, in the background: scale idle instances down (to zero), and start
        instances back up to each function's minimum (after a crash, a recycle, a failed start)."""
        self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for deployed in list(self.live.values()):
                await deployed.pool.reap_idle(now)
                if deployed.pool.replicas < deployed.pool.scaling.min:
                    self._keep_warm(deployed)

    def _keep_warm(self, deployed: Deployed) -> None:
        """Start ``deployed``'s minimum of instances in the background, unless that is under way."""
        pool = deployed.pool
        running = self._warming.get(pool)
        if running is not None and not running.done():
            return
        task = self._warming[pool] = asyncio.ensure_future(self._warm_up(deployed))

        def forget(_: asyncio.Task[None]) -> None:
            if self._warming.get(pool) is task:
                del self._warming[pool]
        task.add_done_callback(forget)

    async def restore(self) -> None:
        """Serve every function the registry holds, as it was before a restart or crash."""
        for info in self.registry.list():
            try:
                await self._activate(info)
            except Exception as exc:  # one function that cannot come back (a deleted secret) must not stop the rest
                log.error("function %s (version %d) is not served: %s", info.name, info.version, exc)

    def _spec(self, info: VersionInfo, bundle: Path) -> FunctionSpec:
        secrets = self.registry.secret_values(info.record.secrets)
        return info.to_spec(bundle, secrets=secrets)

    async def _activate(self, info: VersionInfo) -> Deployed:
        bundle = await asyncio.to_thread(self.registry.materialize, info.name, info.version)
        spec = self._spec(info, bundle)
        scaling = scaling_of(info.record.labels, self.queue)
        warm = self.registry.warm(info.name)
        if warm is not None:  # scale-function outlives restarts and new versions, until a delete
            scaling = replace(scaling, min=min(warm, scaling.max))
        broker = self.intravisor.broker
        try:
            if self.intravisor.backend.shares_objects:  # else the backend makes them for each cVM (Morello)
                create_declared(broker, info.name, spec.capfiles)
        except InvalidInput as exc:  # checked before the deploy was committed; a restart may still clash
            log.warning("function %s: its CAP_Files were not created: %s", info.name, exc)
        pool = self._make_pool(self.intravisor, spec, scaling)
        deployed = Deployed(info, spec, pool)
        previous = self.live.get(info.name)
        self.live[info.name] = deployed
        if previous is not None:
            await previous.pool.close()
        self._keep_warm(deployed)
        return deployed

    async def _warm_up(self, deployed: Deployed) -> None:
        """Start the template, then the minimum number of instances the scaling labels ask for."""
        try:
            await deployed.pool.prepare()
            await deployed.pool.scale_to(deployed.pool.scaling.min)
        except Exception as exc:  # the reaper tries again, and so does the next request
            why = f"{type(exc).__name__}: {exc}"
            if self._warm_failures.get(deployed.pool) != why:
                self._warm_failures[deployed.pool] = why
                log.warning("function %s: warming up %d instances failed: %s", deployed.spec.name,
                            deployed.pool.scaling.min, why)
        else:
            self._warm_failures.pop(deployed.pool, None)

    async def validate(self, record: DeploymentRecord, files: Mapping[str, bytes], max_bundle_bytes: int) -> None:
        """Load the code in a fresh cVM; a FunctionLoadError says what is wrong and where."""
        checked = check_bundle(files, record.module, max_bundle_bytes=max_bundle_bytes)  # paths first
        try:
            secrets = self.registry.secret_values(record.secrets)
        except NotFound as exc:
            raise InvalidInput(f"{exc}: create it with POST /system/secrets first") from None
        staging_root = self.state_dir / "staging"
        staging_root.mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            for bundle_file in checked:
                target = scratch / bundle_file.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(bundle_file.content)
            spec = record.spec(scratch, secrets)
            cvm = await self.intravisor.create(spec)
            await self.intravisor.stop(cvm, "validated")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def deploy(self, record: DeploymentRecord, files: Mapping[str, bytes], *, replace: bool,
                     max_bundle_bytes: int) -> VersionInfo:
        async with self._lock:
            current = self.registry.current(record.name)
            if replace and current is None:
                raise NotFound(f"function {record.name!r} does not exist; create it with POST")
            scaling_of(record.labels, self.queue)  # refused before anything is stored, not after
            for declared in declared_files(record.extra.get("capFiles"), self.intravisor.broker.max_file_size):
                existing = self.intravisor.broker.files.get(declared.name)
                if existing is not None and existing.owner != record.name:
                    raise InvalidInput(f"CAP_File {declared.name!r} is owned by function {existing.owner!r}")
            await self.validate(record, files, max_bundle_bytes)
            info = await asyncio.to_thread(self.registry.deploy, record, files, replace=replace,
                                           max_bundle_bytes=max_bundle_bytes)
            await self._activate(info)
            self.pm.hook.capfaas_deployed(spec=self.live[info.name].spec)
            return info

    async def delete(self, name: str) -> bool:
        async with self._lock:
            if not self.registry.delete(name):
                return False
            deployed = self.live.pop(name, None)
            if deployed is not None:
                await deployed.pool.close()
            delete_owned(self.intravisor.broker, name)
            return True

    async def call(self, name: str, invocation: Invocation, timeout: float) -> Result:
        """One function calling another (CAP_Calls): an instance of ``name``'s current version."""
        deployed = self.live.get(name)
        if deployed is None:
            raise LookupError(f"no function named {name!r} is deployed")
        cvm, _ = await deployed.pool.acquire()
        try:
            deployed.invocations += 1
            result = await collected(await self.intravisor.invoke(cvm, invocation, timeout))
            if self.on_output is not None and (result.stdout or result.stderr):
                self.on_output(name, invocation.id, result.stdout + result.stderr)
            if result.capability is not None:  # a shared object: it outlives the instance's invocation
                return result
            return replace(result, body=bytes(result.body))  # the instance's memory is reused once released
        finally:
            deployed.pool.release(cvm)

    def get(self, name: str) -> Deployed | None:
        return self.live.get(name)

    async def scale(self, name: str, replicas: int) -> None:
        """Set the warm count (OpenFaaS's scale-function), within the function's maximum."""
        deployed = self.live[name]
        await asyncio.to_thread(self.registry.set_warm, name, replicas)
        pool = deployed.pool
        pool.scaling = replace(pool.scaling, min=min(replicas, pool.scaling.max))
        await pool.scale_to(replicas)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in self._warming.values():
            task.cancel()
        for deployed in self.live.values():
            await deployed.pool.close()
        self.live.clear()
