"""The in-cVM runtime's control channel, driven over a real socketpair in this process."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from capfaas.core import runtime as runtime_module
from capfaas.core import wire
from capfaas.core.runtime import Region, Runtime
from capfaas.core.spec import FunctionSpec


def channel(tmp_path: Path) -> tuple[Runtime, socket.socket]:
    spec = FunctionSpec(name="fn", bundle=tmp_path, module="fn.py")
    ours, theirs = socket.socketpair()
    return Runtime(theirs, spec, Region(None, None, 0)), ours


def test_a_message_that_follows_quickly_is_awaited_busily_and_a_slow_one_after_blocking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, intravisor = channel(tmp_path)
    monkeypatch.setattr(runtime_module, "QUICK_GAP", 10.0)  # wide: "quick" must not depend on this machine
    runtime.send({"op": "ready"})
    intravisor.sendall(wire.pack({"op": "invoke", "id": "1"}))
    assert runtime.receive() == {"op": "invoke", "id": "1"}
    assert runtime._quick  # the next receive busy-waits

    runtime.send({"op": "result", "id": "1"})
    later = threading.Timer(0.05, lambda: intravisor.sendall(wire.pack({"op": "invoke", "id": "2"})))
    later.start()
    started = time.monotonic()
    assert runtime.receive() == {"op": "invoke", "id": "2"}  # found by polling, then read whole
    assert time.monotonic() - started < 5
    later.join()

    monkeypatch.setattr(runtime_module, "QUICK_GAP", 0.0)
    runtime.send({"op": "result", "id": "2"})
    intravisor.sendall(wire.pack({"op": "stop"}))
    assert runtime.receive() == {"op": "stop"}
    assert not runtime._quick  # slower than the gap: the next receive blocks at once
    intravisor.recv(1 << 16)  # what the runtime sent, read: closing then is an end of stream, not a reset
    intravisor.close()
    assert runtime.receive() is None
