"""The capability model in use: the compiled hot path, or its pure-Python twin."""
from __future__ import annotations

from .hotpath import choose

_module, IMPLEMENTATION = choose("capfaas.core._capability", "capfaas.core._capability_py")

Capability = _module.Capability
representable_length = _module.representable_length
representable_alignment_mask = _module.representable_alignment_mask

__all__ = ["Capability", "IMPLEMENTATION", "representable_alignment_mask", "representable_length"]
