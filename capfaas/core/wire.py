"""The control channel's wire format: msgpack maps, with capabilities as an ext type.

A capability travels as its tag byte plus its 16-byte memory form, so what arrives is exactly
what was sent: a receiver must validate it (the intravisor does) before trusting any of it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from .capability import Capability

CAPABILITY_EXT = 1


def _default(obj: Any) -> Any:
    if isinstance(obj, Capability):
        return msgpack.ExtType(CAPABILITY_EXT, bytes((obj.tag,)) + obj.to_bytes())
    if isinstance(obj, memoryview):
        return obj.tobytes()
    raise TypeError(f"cannot send {type(obj).__name__} over the control channel")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == CAPABILITY_EXT:
        if len(data) != 17 or data[0] > 1:
            raise ValueError("malformed capability on the control channel")
        return Capability.from_bytes(data[1:], tag=bool(data[0]))
    return msgpack.ExtType(code, data)


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def packer() -> Callable[[dict[str, Any]], bytes]:
    """``pack`` for one thread that sends often: a reused encoder costs a third of a fresh one per
    small message. Not for sharing between threads: a ``default`` call may switch them."""
    return msgpack.Packer(default=_default, use_bin_type=True).pack


def unpack_one(data: bytes) -> Any:
    """The one whole message ``data`` holds, decoded as ``unpacker`` decodes; ValueError when it
    holds less or more (a reply usually comes in one read: decoding it whole skips the streaming
    decoder's buffer and the StopIteration that ends each read)."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def unpacker(max_buffer_size: int = 64 << 20) -> msgpack.Unpacker:
    """A streaming decoder; ``max_buffer_size`` bounds what one peer can make us hold."""
    return msgpack.Unpacker(ext_hook=_ext_hook, raw=False, strict_map_key=False,
                            max_buffer_size=max_buffer_size)
