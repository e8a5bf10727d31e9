"""Every hook a capfaas plugin can implement, the pytest/datasette way.

Built-in behaviour (backends, the library OS, channels, pooling) is written as plugins against
these specs, so a third-party package can add or replace any of it through the ``capfaas``
entry-point group. Hooks are synchronous: one that starts async work returns an awaitable.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from .core.backend import Backend
    from .core.cvm import CVM
    from .core.spec import FunctionSpec

hookspec = pluggy.HookspecMarker("capfaas")
hookimpl = pluggy.HookimplMarker("capfaas")


@hookspec
def capfaas_backends() -> list[type[Backend]]:
    """Return the hardware backend classes this plugin provides.

    Each class names itself (``name``), ranks itself (``priority``: higher is more capable, used
    by ``--backend auto``) and reports whether it can run on this host (``availability()``).
    """


@hookspec(firstresult=True)
def capfaas_libos() -> Any:
    """Return the library OS that confines function code inside each cVM.

    The object must offer ``enter(policy, allow_fork=False)`` and ``seal(prepare=None)``
    (see ``capfaas.plugins.libos.LibraryOS``). The first plugin to answer wins, so a plugin
    registered later than the built-in one can replace it.
    """


@hookspec
def capfaas_channels() -> list[Any]:
    """Return the capability-passing channels this plugin adds (``capfaas.core.channels.Channel``).

    Each serves the request ops it names (``call``, ``file``, ``stream`` …) that cVMs send
    mid-invocation. The built-ins are CAP_Calls, CAP_Files and CAP_Streams; a channel from a
    plugin registered later that serves the same op replaces the earlier one.
    """


@hookspec(firstresult=True)
def capfaas_pool_factory() -> Any:
    """Return a factory that builds the pool keeping warm cVMs per function (the first answer wins).

    A pool's ``acquire()`` coroutine returns ``(cvm, cold)`` and ``release(cvm)`` gives it back.
    A pool may also offer ``take()``, which lets the gateway answer warm invocations without a
    task: an instance, a future of one, or None when one must be started (see the built-in
    ``capfaas.plugins.pooling.FunctionPool``)."""


@hookspec
def capfaas_gateway_routes() -> list[Any]:
    """Return extra ``aiohttp.web`` route definitions for the gateway."""


@hookspec
def capfaas_register_commands(verbs: argparse._SubParsersAction) -> None:
    """Add verbs to the ``capfaas`` command line (``verbs.add_parser(...)``)."""


@hookspec
def capfaas_deployed(spec: FunctionSpec) -> None:
    """Called after a function version is deployed and validated."""


@hookspec
def capfaas_before_invoke(spec: FunctionSpec, invocation_id: str) -> None:
    """Called before an invocation is handed to a cVM."""


@hookspec
def capfaas_after_invoke(spec: FunctionSpec, invocation_id: str, status: int, duration: float) -> None:
    """Called after an invocation finished (``status`` is the HTTP status it produced)."""


@hookspec
def capfaas_cvm_started(cvm: CVM) -> None:
    """Called when a cVM is ready to serve."""


@hookspec
def capfaas_cvm_stopped(cvm: CVM, reason: str) -> None:
    """Called when a cVM stopped, with why (``"stopped"``, ``"crashed: …"``, ``"timeout"`` …)."""
