"""The record of what ``LibraryOS.enter()`` applied, and what this kernel could not give and why."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One protection: its name and what it does here (or, when unavailable, why not)."""

    name: str
    detail: str


@dataclass(frozen=True)
class Enforcement:
    applied: tuple[Layer, ...]
    unavailable: tuple[Layer, ...]

    @property
    def applied_names(self) -> frozenset[str]:
        return frozenset(layer.name for layer in self.applied)

    @property
    def unavailable_names(self) -> frozenset[str]:
        return frozenset(layer.name for layer in self.unavailable)

    def describe(self) -> str:
        """Lines for logs and ``capfaas describe``: every layer, applied or not."""
        lines = [f"applied {layer.name}: {layer.detail}" for layer in self.applied]
        lines += [f"unavailable {layer.name}: {layer.detail}" for layer in self.unavailable]
        return "\n".join(lines)
