"""The agent inside a cVM on Morello: connect back, authenticate, receive the function, run the runtime.

Intravisor starts it from the cVM's YAML as
``/ld.so /usr/bin/python3 -m capfaas.backends.morello.agent --connect HOST:PORT --token T --bundles DIR``.
The environment inside a cVM is fixed, so everything else arrives over the connection: the
function's spec and its bundle (a zip, unpacked under ``--bundles``), and the bookkeeping DDC of
its region. From then on it is :class:`capfaas.core.runtime.Runtime`, the same code every backend
runs, behind a socket wrapper that does the two things only Morello needs: large results go
inline (the host cannot map this cVM's memory) and output is synced with the console first.

Console output is framed (:mod:`.markers`); the agent also reports where it got to (``agent``,
``connected``, ``exit N``) and, when it cannot go on, why, so the host can say which step failed.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from capfaas import __version__
from capfaas.core import wire
from capfaas.core.runtime import Region, Runtime, error_report, load_handler
from capfaas.core.spec import FunctionSpec, Limits

from . import capfile, markers
from .capture import OutputCapture
from .channel import CAPABILITY_MARK, hello_line, inline_capabilities
from .staging import StagingMemory

CONNECT_TIMEOUT = 30.0


class AgentChannel:
    """The socket the runtime uses: syncs console output before each message, inlines capabilities."""

    def __init__(self, sock: socket.socket, capture: OutputCapture) -> None:
        self.sock = sock
        self.capture = capture
        self.memory: Any = None
        self._stash = b""
        self._syncs = 0

    def recv(self, size: int) -> bytes:
        if self._stash:
            data, self._stash = self._stash, b""
            return data
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        if self.capture.drain():
            self._console_sync()
        if CAPABILITY_MARK in data and self.memory is not None:
            data = inline_capabilities(data, self.memory)
        self.sock.sendall(data)

    def receive_one(self) -> dict[str, Any]:
        """One whole message (the spec), keeping any bytes after it for the runtime."""
        unpacker = wire.unpacker(max_buffer_size=1 << 31)
        buffer = bytearray()
        while True:
            chunk = self.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the host closed the control channel")
            buffer += chunk
            unpacker.feed(chunk)
            for message in unpacker:
                self._stash = bytes(buffer[unpacker.tell():]) + self._stash
                return message

    def _console_sync(self) -> None:
        """Wait until the host has read every frame written so far (it answers ``console-synced``)."""
        self._syncs += 1
        self.capture.write_console(markers.status(f"sync {self._syncs}"))
        unpacker = wire.unpacker(max_buffer_size=1 << 31)
        buffer = bytearray()
        kept = bytearray()
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the host closed the control channel during a console sync")
            buffer += chunk
            unpacker.feed(chunk)
            for message in unpacker:
                if isinstance(message, dict) and message.get("op") == "console-synced" \
                        and message.get("seq") == self._syncs:
                    self._stash += bytes(kept) + bytes(buffer[unpacker.tell():])
                    return
                kept += wire.pack(message)


def spec_from_wire(data: dict[str, Any], bundle: Path) -> FunctionSpec:
    return FunctionSpec(name=data["name"], bundle=bundle, module=data["module"], handler=data["handler"],
                        signature=data["signature"], env=data["env"], secrets=data["secrets"],
                        network=data["network"], limits=Limits(**data["limits"]))


def unpack_bundle(archive: bytes, root: Path, name: str) -> Path:
    """The bundle's files in a fresh directory under ``root``; names that leave it are refused."""
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=os.path.realpath(root)))
    target.chmod(0o755)
    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        for member in bundle.infolist():
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts or not path.parts:
                raise ValueError(f"the bundle holds an unsafe path {member.filename!r}")
            destination = target.joinpath(*path.parts)
            if member.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(bundle.read(member))
    return target


def _address_space() -> int:
    """Bytes of address space already in use, so the memory limit counts only the function's own."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def enter_libos(spec: FunctionSpec) -> Any:
    """The library OS plugin's confinement, the same rules as on every backend."""
    from capfaas.plugin_manager import make_plugin_manager
    from capfaas.plugins.libos.policy import LibOSPolicy

    limits = spec.limits
    policy = LibOSPolicy(bundle_dir=str(spec.bundle), tmp_quota=limits.tmp, env=dict(spec.env),
                         secrets=dict(spec.secrets), allow_network=spec.network,
                         memory_limit=_address_space() + limits.memory, cpu_seconds=limits.cpu_seconds,
                         open_files=limits.open_files, extra_devices=capfile.DEVICES)
    libos = make_plugin_manager(autoload=False).hook.capfaas_libos()
    return libos.enter(policy)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capfaas.backends.morello.agent")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--bundles", default="/var/lib/capfaas/bundles")
    return parser.parse_args(argv)


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT)
    sock.settimeout(None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # the library OS may not pass it through; only latency suffers
        pass
    return sock


def serve(args: argparse.Namespace, capture: OutputCapture) -> int:
    try:
        sock = connect(args.connect)
    except (OSError, ValueError) as exc:
        capture.write_console(markers.error(f"cannot connect to {args.connect}: {exc}"))
        return 75
    sock.sendall(hello_line(args.token, __version__, os.getpid()))
    capture.write_console(markers.status("connected"))
    channel = AgentChannel(sock, capture)
    message = channel.receive_one()
    if message.get("op") != "spec":
        capture.write_console(markers.error(f"expected the function's spec, got {message.get('op')!r}"))
        return 76
    region_info = message["region"]
    memory = StagingMemory(region_info["size"], region_info["base"])
    channel.memory = memory
    region = Region(memory, message["ddc"], region_info["base"] + region_info["size"] // 2)
    wire_spec = message["spec"]
    try:
        bundle = unpack_bundle(message["bundle"], Path(args.bundles), wire_spec["name"])
        spec = spec_from_wire(wire_spec, bundle)
    except Exception as exc:  # noqa: BLE001  (reported to the intravisor, which raises it)
        channel.sendall(wire.pack({"op": "failed", "error": {"stage": "agent", "type": type(exc).__name__,
                                                             "message": f"cannot unpack the function: {exc}"}}))
        return 72
    runtime = Runtime(channel, spec, region)  # type: ignore[arg-type]  # a socket that syncs and inlines
    runtime.files = capfile.DeviceFiles(declared=message["capfiles"])  # type: ignore[assignment]
    try:
        enter_libos(spec)
    except Exception as exc:  # a libOS that cannot confine the cVM must not run the function
        runtime.send({"op": "failed", "error": error_report("libos", exc, spec)})
        return 71
    capture.start()
    if runtime.start(load_handler) is None:
        return 3
    runtime.serve()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console_fd = os.dup(1)
    capture = OutputCapture(console_fd)
    capture.write_console(markers.status(f"agent {__version__}"))
    code = 70
    try:
        code = serve(args, capture)
    except BaseException as exc:  # the agent's own failure: say it on the console, then exit
        capture.write_console(markers.error(f"{type(exc).__name__}: {exc}"))
        code = 70
    finally:
        try:
            capture.stop()
            capture.write_console(markers.status(f"exit {code}"))
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
