"""Registers the emulated backend."""
from __future__ import annotations

from capfaas.hookspecs import hookimpl

from .backend import EmulatedBackend


@hookimpl
def capfaas_backends() -> list[type[EmulatedBackend]]:
    return [EmulatedBackend]
