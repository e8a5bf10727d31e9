"""Where the emulated segment sits in the one address space, and how its tags are laid out."""
from __future__ import annotations

GRANULE = 16
"""Bytes per tag bit, as on Morello."""
PAGE = 4096
DEFAULT_SEGMENT_BASE = 0x1000_0000_0000
"""Far from NULL and well below 2**55, so addresses never need the top byte or bit 55."""


def tag_bytes_for(size: int) -> int:
    """Bytes of tag bitmap after a ``size``-byte segment, padded to a whole page."""
    bits = size // GRANULE
    return -(-bits // 8 // PAGE) * PAGE


def check_segment(size: object, base: object) -> None:
    """Refuse a segment the emulator cannot place: clear errors instead of odd faults later."""
    for name, value in (("size", size), ("base", base)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"segment {name} must be an int, not {type(value).__name__}")
    assert isinstance(size, int) and isinstance(base, int)
    if size <= 0 or size % PAGE:
        raise ValueError(f"segment size must be a positive multiple of {PAGE}, got {size}")
    if base < 0 or base % PAGE:
        raise ValueError(f"segment base must be a non-negative multiple of {PAGE}, got {base:#x}")
    if base + size > 1 << 55:
        raise ValueError(f"segment [{base:#x}, {base + size:#x}) must end at or below 2**55")
