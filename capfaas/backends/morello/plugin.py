"""Registers the Morello backend."""
from __future__ import annotations

from capfaas.hookspecs import hookimpl

from .backend import MorelloBackend


@hookimpl
def capfaas_backends() -> list[type[MorelloBackend]]:
    return [MorelloBackend]
