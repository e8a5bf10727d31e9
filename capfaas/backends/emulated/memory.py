"""The emulated memory in use: the compiled hot path, or its pure-Python twin."""
from __future__ import annotations

from capfaas.core.hotpath import choose

from .layout import DEFAULT_SEGMENT_BASE, GRANULE

_module, IMPLEMENTATION = choose("capfaas.backends.emulated._memory", "capfaas.backends.emulated._memory_py")

TaggedMemory = _module.TaggedMemory

__all__ = ["DEFAULT_SEGMENT_BASE", "GRANULE", "IMPLEMENTATION", "TaggedMemory"]
