"""CAP_Calls: one function calling another through the intravisor, cVM to cVM, without HTTP.

A call names its target by a sealed entry capability (``entry``), may hand its data over as a
capability to a shared buffer (``buffer``), and comes back the same way. A capability argument
must come from the caller's own authority; one to a shared object is granted to the callee
read-only, nothing copied; one into the caller's region is copied once (each cVM maps only its
own region).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from capfaas.core.capability import Capability
from capfaas.core.channels import Channel, ChannelRefused
from capfaas.core.faults import CapabilityFault
from capfaas.core.intravisor import MAX_CALL_DEPTH, Invocation, Result
from capfaas.core.runtime import INLINE_LIMIT
from capfaas.hookspecs import hookimpl


class CapCalls(Channel):
    name = "CAP_Calls"
    ops = frozenset({"call", "entry", "buffer"})

    async def serve(self, intravisor: Any, cvm: Any, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "entry":
            function = request.get("function")
            if not isinstance(function, str) or not function:
                raise ChannelRefused("ValueError", "an entry must name a function")
            entry = intravisor.entries.entry(function)
            cvm.entries.add(entry)
            return {"entry": entry}
        if op == "buffer":
            return {"grant": intravisor.broker.buffer(cvm, request.get("size"))}
        pipe = cvm.pipes.pop(request.get("stream"), None) if request.get("stream") is not None else None
        if request.get("stream") is not None and pipe is None:
            return _failed(400, "BadCall", "the call names a stream this invocation did not open")
        try:
            return await self._call(intravisor, cvm, request, pipe)
        finally:
            if pipe is not None:  # a caller still writing learns the callee is done (BrokenPipeError)
                intravisor.broker.stream_end(pipe, writer=False).close()
                intravisor.broker.area.free(pipe)

    async def _call(self, intravisor: Any, caller: Any, call: dict[str, Any], pipe: Any) -> dict[str, Any]:
        """Check the call, run it on an instance of the target, and answer the caller."""
        chain = [str(n) for n in call.get("chain") or []]
        if intravisor.router is None:
            return _failed(501, "CallUnavailable", "calls to other functions need the gateway (capfaas serve)")
        try:
            name = intravisor.entries.resolve(call.get("target"), caller.entries)
        except CapabilityFault as exc:  # a forged or altered entry: the caller cannot be trusted
            return _faulted(intravisor, caller, exc)
        if name in chain:
            return _failed(508, "CallCycle", "a call cycle: " + " -> ".join([*chain, name]))
        if len(chain) >= MAX_CALL_DEPTH:
            return _failed(508, "CallDepth", f"calls may nest {MAX_CALL_DEPTH} deep at most: "
                                             + " -> ".join([*chain, name]))
        body: Any = call.get("body", b"")
        if isinstance(body, Capability):
            length = call.get("length")
            try:
                intravisor.admit(caller, body, length)
            except CapabilityFault as exc:
                return _faulted(intravisor, caller, exc)
            if intravisor.broker.find(body, length) is None:
                body = intravisor.memory.view(body, body.address, length)
        elif not isinstance(body, bytes):
            return _failed(400, "BadCall", "a call's data must be bytes or a capability")
        remaining = float(call.get("deadline", 0.0)) - time.time()
        if remaining <= 0:
            return _failed(504, "TimeoutError", f"no time left to call {name!r}")
        headers = call.get("headers") if isinstance(call.get("headers"), dict) else {}
        try:
            invocation = Invocation(method="POST", headers=headers, body=body, length=call.get("length"),
                                    chain=chain, root=caller.root, stream=pipe)
            result = await intravisor.router(name, invocation, remaining)
        except LookupError as exc:
            return _failed(404, "FunctionNotFound", str(exc))
        reply = {"status": result.status, "headers": result.headers, **_handed_back(intravisor, caller, result)}
        if result.outcome != "ok":
            reply["error"] = {"type": (result.error or {}).get("type", result.outcome),
                              "message": (result.error or {}).get("message", result.outcome)}
        return reply


def _handed_back(intravisor: Any, caller: Any, result: Result) -> dict[str, Any]:
    """A callee's result as its caller receives it: a granted shared object, a copy into a new one
    when it is large, or bytes inside the reply."""
    broker = intravisor.broker
    if result.outcome == "ok" and broker.can_map(caller):
        if result.capability is not None:
            obj = broker.find(result.capability, len(result.body))
            if obj is not None:
                announced = broker.grant(caller, obj, writable=False, transient=True, within=result.capability)
                return {"body": result.capability, "length": len(result.body), "grant": announced}
        if len(result.body) > INLINE_LIMIT:
            cap, announced = broker.copy_into_buffer(caller, result.body)
            return {"body": cap, "length": len(result.body), "grant": announced}
    return {"body": bytes(result.body)}


def _failed(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": {"type": kind, "message": message}}


def _faulted(intravisor: Any, caller: Any, exc: CapabilityFault) -> dict[str, Any]:
    """A capability rule broken in a call: the caller is stopped, and told why if it still listens."""
    caller.fault = f"{type(exc).__name__}: {exc}"
    asyncio.ensure_future(intravisor.stop(caller, "fault"))
    return _failed(403, type(exc).__name__, str(exc))


@hookimpl
def capfaas_channels() -> list[Channel]:
    """CAP_Calls: calls between functions, their entry capabilities and shared buffers."""
    return [CapCalls()]
