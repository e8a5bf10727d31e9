"""Output markers: how the agent's lines are told apart from Intravisor's and the kernel's on one stream.

Inside a cVM the library OS sends every console write to the monitor, which prints it on its own
stdout among its logs and LKL's kernel messages. So the agent frames what it writes: one line per
frame, ``\\x1fcapfaas:KIND:PAYLOAD``, where KIND is ``o``/``e`` (the function's stdout/stderr,
base64), ``s`` (an agent status: ``agent VERSION``, ``connected``, ``sync N``, ``exit N``) or
``x`` (an agent error, base64 text). Each frame is written with one ``write()`` of at most 512
bytes, which a pipe keeps whole (PIPE_BUF is 512 on FreeBSD), so a monitor log flushed at the same
moment can only come before or after it; the parser therefore looks for the marker anywhere in a
line and takes what precedes it as monitor output.

Intravisor reports most errors by printing a line and spinning (``while(1);``) or exiting;
:func:`fatal` recognises those lines so the supervisor can kill the monitor at once.

Standard library only: the agent imports this inside the cVM.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

PREFIX = b"\x1fcapfaas:"
FRAME_LIMIT = 512
CHUNK = 360
"""Raw bytes per output frame: base64 makes 480, plus the prefix and kind, under FRAME_LIMIT."""

STDOUT, STDERR, STATUS, ERROR = "o", "e", "s", "x"

FATAL_PATTERNS = (
    re.compile(r"Introvisor: unknown t5"),          # unknown hostcall: the monitor spins
    re.compile(r"wrong cap key"),                   # CAP_File probe of an unknown key: spins
    re.compile(r"need more cap streams/files"),     # an 11th CAP_File: spins
    re.compile(r"something is wrong"),              # parser or thread bookkeeping: spins
    re.compile(r"who called\?"),                    # forbidden memory hostcalls: spins
    re.compile(r"^deprecated \d+$"),                # removed hostcalls: spins
    re.compile(r"sysctlbyname\(security\.cheri\.sealcap\)"),  # no sealing capability: spins
    re.compile(r"(^|[ ,])die$"),                    # "…, die": the monitor gives up (exits or spins)
    re.compile(r"^Unexpected (key|scalar|event)"),  # YAML rejected
)
"""Lines after which Intravisor never serves the cVM again; taken from its sources."""
PROGRAM_EXIT = "EXIT IS CALLED"
"""What the monitor prints when the cVM's program exits; the monitor should exit soon after."""


@dataclass(frozen=True)
class Frame:
    kind: str
    payload: bytes


def encode(kind: str, payload: bytes) -> bytes:
    """One frame; the caller keeps ``payload`` small enough for FRAME_LIMIT."""
    body = base64.b64encode(payload) if kind in (STDOUT, STDERR, ERROR) else payload
    frame = PREFIX + kind.encode() + b":" + body + b"\n"
    if len(frame) > FRAME_LIMIT:
        raise ValueError(f"a {len(frame)}-byte frame would not be written atomically")
    return frame


def output_frames(kind: str, data: bytes) -> list[bytes]:
    """The frames carrying ``data`` written to stdout (``o``) or stderr (``e``)."""
    return [encode(kind, data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]


def status(text: str) -> bytes:
    return encode(STATUS, text.encode("ascii", "replace")[:FRAME_LIMIT - 32])


def error(text: str) -> bytes:
    return encode(ERROR, text.encode("utf-8", "replace")[:CHUNK])


def parse(line: bytes) -> tuple[bytes, Frame | None]:
    """Split one line into the monitor's text before a frame and the frame (None if there is none)."""
    at = line.find(PREFIX)
    if at < 0:
        return line.rstrip(b"\r\n"), None
    before, rest = line[:at], line[at + len(PREFIX):].rstrip(b"\r\n")
    kind, sep, payload = rest.partition(b":")
    text = kind.decode("ascii", "replace")
    if not sep or text not in (STDOUT, STDERR, STATUS, ERROR):
        return line.rstrip(b"\r\n"), None
    if text != STATUS:
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return line.rstrip(b"\r\n"), None
    return before, Frame(text, payload)


def fatal(text: str) -> bool:
    """Whether a monitor line says Intravisor has given up on the cVM."""
    line = text.strip()
    return any(pattern.search(line) for pattern in FATAL_PATTERNS)
