"""The seam between the intravisor and the hardware: what a backend must provide.

The intravisor (core) owns every cVM's authority, validates every capability crossing a cVM
boundary and enforces limits; a backend supplies the memory that capabilities point into and
starts the processes that run the in-cVM runtime. On ``emulated`` that is a shared memfd and a
template process forking cVMs; on ``morello`` it is Intravisor's monitor running cVMs under
CheriBSD, with the same runtime talking the same protocol over a socket.
"""
from __future__ import annotations

import abc
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .console import Console
from .control import ControlChannel
from .spec import FunctionSpec


class BackendError(RuntimeError):
    """A backend cannot be selected or cannot start, with the reason in one sentence."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


@dataclass(frozen=True)
class Region:
    """A cVM's slice of the shared address space: ``[base, base + size)``, at ``offset`` in the segment."""

    base: int
    size: int
    offset: int


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a backend needs to start one cVM running the in-cVM runtime."""

    cvm_id: int
    spec: FunctionSpec
    region: Region
    ddc: Any
    pcc: Any
    settings: dict[str, Any] = field(default_factory=dict)


class CVMProcess(abc.ABC):
    """A started cVM as the intravisor sees it: a control channel, its console, a way to stop it."""

    channel: ControlChannel
    """The control channel: a ``ControlChannel`` (the protocol of the backend's transport), or a
    ``StreamControlChannel`` over a stream pair."""
    pid: int | None
    console: Console
    grant_channel: socket.socket | None = None
    """Where descriptors of shared objects granted to the cVM go; None where the backend cannot
    pass them (each payload is then copied into the cVM's region)."""

    def read_reply(self, seconds: float) -> bytes | memoryview | None:
        """Busy-wait up to ``seconds`` for the cVM's next bytes without yielding to the event loop,
        and read them straight from the channel: a reply that comes within microseconds then costs
        the intravisor neither a sleep and a wake-up nor a trip through the event loop. None when
        nothing came in time (or the backend cannot tell): wait on ``channel`` then. ``b""`` at end
        of stream. A view is valid until the next call.
        """
        return None

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the cVM at once (timeouts, crashes, shutdown)."""

    @abc.abstractmethod
    async def wait(self) -> str:
        """Wait for the cVM to end and describe how: ``"exited with status 0"``, ``"killed by SIGKILL"`` …"""


class TemplateFailed(Exception):
    """A function template could not load the function; ``error`` says what and where."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        super().__init__(error.get("message", "the function template failed"))


class TemplateProcess(abc.ABC):
    """A function's template: its code imported and initialised once; instances are cloned from it."""

    pid: int | None

    @abc.abstractmethod
    async def fork(self, request: LaunchRequest) -> CVMProcess:
        """Clone one instance into ``request.region``."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the template (instances already cloned keep running)."""


class Backend(abc.ABC):
    """A source of cVMs. Subclasses are returned by the ``capfaas_backends`` hook."""

    name: ClassVar[str]
    priority: ClassVar[int]
    """Higher is more capable; ``auto`` picks the available backend with the highest."""
    description: ClassVar[str]
    shares_objects: ClassVar[bool] = False
    """Whether its cVMs map the intravisor's shared objects (buffers, CAP_Files made by the gateway
    or at run time); a backend that cannot gets payloads copied, and provides CAP_Files its own way."""
    ready_timeout: float = 30.0
    """Seconds from ``launch()`` returning until the cVM reports ``ready`` (it has imported the
    function and run ``init()``). A backend whose cVMs import slowly sets its own."""

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this host can run the backend, and if not, exactly which check failed."""

    @abc.abstractmethod
    async def start(self, segment_size: int) -> Any:
        """Prepare the shared memory and any helper processes; return the memory (a ``TaggedMemory``)."""

    @abc.abstractmethod
    async def launch(self, request: LaunchRequest) -> CVMProcess:
        """Start one cVM."""

    async def launch_template(self, spec: FunctionSpec, region_size: int) -> TemplateProcess | None:
        """Start a template for ``spec``, or None when this backend cannot clone cVMs (each start is fresh)."""
        return None

    def confine(self, cpus: frozenset[int]) -> bool:
        """Run every cVM, and every cVM cloned from now on, on ``cpus`` only; False when this
        backend cannot place its cVMs (the gateway then leaves its own CPUs alone too)."""
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every cVM and helper and release the memory."""


def select_backend(classes: Iterable[type[Backend]], choice: str = "auto") -> type[Backend]:
    """Pick a backend by name, or the most capable available one for ``auto``."""
    by_name = {cls.name: cls for cls in classes}
    names = ", ".join(["auto", *sorted(by_name)])
    if choice == "auto":
        usable = [cls for cls in by_name.values() if cls.availability().available]
        if not usable:
            raise BackendError(f"no backend is available on this host (choices: {names})")
        return max(usable, key=lambda cls: cls.priority)
    if choice not in by_name:
        raise BackendError(f"unknown backend {choice!r}; choose one of: {names}")
    availability = by_name[choice].availability()
    if not availability.available:
        raise BackendError(f"backend {choice!r} is not available here: {availability.reason}")
    return by_name[choice]
