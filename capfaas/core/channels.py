"""The capability-passing channels, as the intravisor hands them what cVMs ask.

Mid-invocation a cVM sends requests (a call to another function, a shared buffer, a CAP_File, a
stream), each carrying a ``call`` id its answer comes back with. Each request's ``op`` is served
by one channel, a plugin behind the ``capfaas_channels`` hook: the built-ins are CAP_Calls,
CAP_Files and CAP_Streams (``capfaas.plugins.channels``). A channel registered later that serves
an op replaces the one before it, so a third-party package can swap one out or add its own ops.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar


class ChannelRefused(Exception):
    """A request a channel answers with an error: ``kind`` names the exception the function sees."""

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        self.kind = kind
        self.status = status
        super().__init__(message)


class Channel(abc.ABC):
    """One capability-passing channel."""

    name: ClassVar[str]
    ops: ClassVar[frozenset[str]]
    """The request ops it serves."""

    @abc.abstractmethod
    async def serve(self, intravisor: Any, cvm: Any, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request from ``cvm``: the fields of the reply (the intravisor adds its op and
        call id). Raise ChannelRefused, ValueError or MemoryError to answer with an error."""


def channel_table(answers: Iterable[Iterable[Channel]]) -> dict[str, Channel]:
    """Op -> channel from the hook's answers (pluggy lists the last registered plugin first, so
    they are applied in reverse: a later plugin's channel wins an op)."""
    table: dict[str, Channel] = {}
    for channels in reversed(list(answers)):
        for channel in channels:
            for op in channel.ops:
                table[op] = channel
    return table


def is_request(message: dict[str, Any]) -> bool:
    """Whether a cVM's message asks something (requests carry a call id; results do not)."""
    return "call" in message
