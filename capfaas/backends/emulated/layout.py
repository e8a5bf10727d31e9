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


WINDOW_ALIGN = GRANULE * 8 * PAGE
"""A window's data offset and size are multiples of this (512 KiB), so its tags fill whole pages
and no process mapping one window can reach the tag bits of another."""


def check_segment(size: object, base: object, offset: object = 0, segment_size: object = None) -> None:
    """Refuse a segment (or a window of one) the emulator cannot place, with a clear error."""
    segment_size = size if segment_size is None else segment_size
    for name, value in (("size", size), ("base", base), ("offset", offset), ("segment_size", segment_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"segment {name} must be an int, not {type(value).__name__}")
    assert isinstance(size, int) and isinstance(base, int) and isinstance(offset, int)
    assert isinstance(segment_size, int)
    if size <= 0 or size % PAGE:
        raise ValueError(f"segment size must be a positive multiple of {PAGE}, got {size}")
    if base < 0 or base % PAGE:
        raise ValueError(f"segment base must be a non-negative multiple of {PAGE}, got {base:#x}")
    if base + size > 1 << 55:
        raise ValueError(f"segment [{base:#x}, {base + size:#x}) must end at or below 2**55")
    if (offset, segment_size) != (0, size):
        if offset < 0 or offset % WINDOW_ALIGN or size % WINDOW_ALIGN:
            raise ValueError(f"a window's offset and size must be multiples of {WINDOW_ALIGN}, "
                             f"got offset {offset:#x} and size {size:#x}")
        if offset + size > segment_size:
            raise ValueError(f"window [{offset:#x}, {offset + size:#x}) lies outside the {segment_size:#x}-byte segment")
