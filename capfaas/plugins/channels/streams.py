"""CAP_Streams: rings in shared memory between two cVMs, or a cVM and the gateway.

A ``stream`` request with ``to`` opens one into a function the cVM is about to call (it writes,
the callee reads ``event.stream``); without, it streams the cVM's own response to whoever invoked
it (the gateway sends it on, chunked).
"""
from __future__ import annotations

from typing import Any

from capfaas.core.channels import Channel, ChannelRefused
from capfaas.core.outstream import STREAM_CAPACITY
from capfaas.hookspecs import hookimpl


class CapStreams(Channel):
    name = "CAP_Streams"
    ops = frozenset({"stream"})

    async def serve(self, intravisor: Any, cvm: Any, request: dict[str, Any]) -> dict[str, Any]:
        broker = intravisor.broker
        into_call = "to" in request  # into a function it is about to call, or its own response
        if not into_call and cvm.output is not None:
            raise ChannelRefused("ValueError", "this invocation already streams its response")
        obj = broker.stream(cvm.spec.name, STREAM_CAPACITY)
        try:
            announced = broker.grant_stream(cvm, obj)
        except BaseException:
            broker.area.free(obj)
            raise
        if into_call:
            cvm.pipes[obj.id] = obj
        else:
            cvm.output = (obj, broker.stream_end(obj, writer=False))
        return {"grant": announced}


@hookimpl
def capfaas_channels() -> list[Channel]:
    """CAP_Streams: producer-to-consumer rings with backpressure and end of stream."""
    return [CapStreams()]
