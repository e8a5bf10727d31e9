"""The pieces between the intravisor and an agent: markers, staging memory, the control channel, CAP_Files."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from capfaas.backends.morello import markers
from capfaas.backends.morello.agent import AgentChannel
from capfaas.backends.morello.capfile import IOCTL_CF_PRB, open_capfile
from capfaas.backends.morello.channel import (ControlListener, HandshakeError, InliningWriter, hello_line,
                                              parse_hello)
from capfaas.backends.morello.staging import StagingMemory
from capfaas.core import wire
from capfaas.core.capability import Capability
from capfaas.core.faults import BoundsFault, PermissionFault, TagFault, UnmappedFault
from capfaas.core.perms import Perm

BASE = 0x1000_0000_0000
READ_ONLY = int(Perm.LOAD | Perm.GLOBAL)


# -- markers --------------------------------------------------------------------------------------

def test_output_survives_framing_whole() -> None:
    data = bytes(range(256)) * 10
    frames = markers.output_frames(markers.STDOUT, data)
    assert all(len(frame) <= markers.FRAME_LIMIT for frame in frames)
    decoded = b"".join(markers.parse(frame)[1].payload for frame in frames)  # type: ignore[union-attr]
    assert decoded == data


def test_a_frame_after_a_cut_monitor_line_is_found() -> None:
    before, frame = markers.parse(b"target SP = 43fffc000, sp_read = " + markers.status("agent 0.1.0"))
    assert before == b"target SP = 43fffc000, sp_read = " and frame == markers.Frame("s", b"agent 0.1.0")
    assert markers.parse(b"[    1.237547] Warning: unable to open an initial console.\n") == \
        (b"[    1.237547] Warning: unable to open an initial console.", None)
    assert markers.parse(b"\x1fcapfaas:o:not base64!\n")[1] is None
    assert markers.parse(b"\x1fcapfaas:z:abc\n")[1] is None


@pytest.mark.parametrize("line", [
    "Introvisor: unknown t5 1234", "wrong cap key test1 ", "need more cap streams/files, die",
    "something is wrong cVMs", "MEM_ALLOC, who called?", "deprecated 401",
    "CVM_MAX_SIZE = 40000000, requested = 10000000, die", "yaml is corrupted, die", "stuck in thread, die",
    "sysctlbyname(security.cheri.sealcap)", "Unexpected key: env",
])
def test_intravisors_last_words_are_recognised(line: str) -> None:
    assert markers.fatal(line)


@pytest.mark.parametrize("line", [
    "[    0.000000] Linux version 4.17.0", "requested cVM size matches CVM_MAX_SIZE (40000000)",
    "TODO: CREATE_CARRIE_TIMER", "EXIT IS CALLED", "Deploy 16 in 6.141000, SHA-256 Hash: 7152",
])
def test_ordinary_monitor_lines_are_not(line: str) -> None:
    assert not markers.fatal(line)


# -- the staging area -----------------------------------------------------------------------------

def test_staging_is_checked_like_memory() -> None:
    memory = StagingMemory(1 << 30, BASE)
    root = memory.root_capability()
    view = memory.writable_view(root, BASE + 64, 5)
    view[:] = b"hello"
    readable = root.set_address(BASE + 64).set_bounds(5).and_permissions(READ_ONLY)
    assert memory.view(readable, BASE + 64, 5) == b"hello"
    assert memory.load(root, BASE + 60, 12) == bytes(4) + b"hello" + bytes(3)
    with pytest.raises(PermissionFault):
        memory.store(readable, BASE + 64, b"x")
    with pytest.raises(BoundsFault):
        memory.view(readable, BASE + 64, 6)
    with pytest.raises(TagFault):
        memory.view(Capability.from_bytes(readable.to_bytes(), tag=False), BASE + 64, 1)
    memory.release(BASE, BASE + 1024)
    assert memory.load(root, BASE + 64, 5) == bytes(5)


def test_staging_outside_its_area_is_unmapped() -> None:
    memory = StagingMemory(1 << 20, BASE)
    wide = StagingMemory(1 << 30, BASE).root_capability()
    with pytest.raises(UnmappedFault):
        memory.view(wide, BASE + (1 << 20), 1)


def test_large_extents_are_lazy_and_zeroed() -> None:
    memory = StagingMemory(1 << 30, BASE)
    root = memory.root_capability()
    view = memory.writable_view(root, BASE, 64 << 20)
    view[-3:] = b"end"
    assert memory.load(root, BASE + (64 << 20) - 5, 5) == b"\0\0end"
    view.release()
    memory.release(BASE, BASE + (64 << 20))
    assert memory.load(root, BASE + (64 << 20) - 3, 3) == bytes(3)


def test_a_rewrite_replaces_what_was_there() -> None:
    memory = StagingMemory(1 << 30, BASE)
    root = memory.root_capability()
    memory.store(root, BASE, b"a" * 100)
    memory.store(root, BASE + 50, b"b" * 10)
    assert memory.load(root, BASE, 100) == bytes(50) + b"b" * 10 + bytes(40)


# -- the control channel --------------------------------------------------------------------------

class Collecting:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def test_staged_bodies_are_sent_inline_and_the_rest_untouched() -> None:
    memory = StagingMemory(1 << 30, BASE)
    root = memory.root_capability()
    memory.writable_view(root, BASE, 4)[:] = b"body"
    cap = root.set_address(BASE).set_bounds(4).and_permissions(READ_ONLY)
    sink = Collecting()
    writer = InliningWriter(sink, memory)  # type: ignore[arg-type]
    plain = wire.pack({"op": "invoke", "body": b"inline already"})
    writer.write(plain)
    writer.write(wire.pack({"op": "invoke", "id": "1", "body": cap, "length": 4}))
    assert sink.written[0] is plain
    unpacker = wire.unpacker()
    unpacker.feed(sink.written[1])
    assert next(unpacker) == {"op": "invoke", "id": "1", "body": b"body"}


def test_hello_lines() -> None:
    token = "0123456789abcdef" * 2
    assert parse_hello(hello_line(token, "0.1.0", 42))[0] == token
    for bad in (b"capfaas-agent short 0.1.0 1\n", b"hello " + token.encode() + b" 0.1.0 1\n",
                b"capfaas-agent " + token.encode() + b" 0.1.0 1", b"x" * 300 + b"\n"):
        with pytest.raises((HandshakeError, ValueError)):
            parse_hello(bad)


async def test_a_token_opens_the_door_once() -> None:
    listener = ControlListener()
    await listener.start()
    try:
        token, connected = listener.expect()
        for attempt in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(hello_line(token, "0.1.0", 7))
            if attempt == 0:
                connection = await asyncio.wait_for(connected, 5)
                assert connection.hello.pid == 7
            else:
                assert await asyncio.wait_for(reader.read(), 5) == b""
                assert listener.rejected == 1
            writer.close()
    finally:
        await listener.close()


class FakeCapture:
    def __init__(self, framed: bool) -> None:
        self.framed = framed
        self.console: list[bytes] = []

    def drain(self) -> bool:
        framed, self.framed = self.framed, False
        return framed

    def write_console(self, frame: bytes) -> None:
        self.console.append(frame)


def test_the_agent_waits_for_the_console_before_replying() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        capture = FakeCapture(framed=True)
        channel = AgentChannel(ours, capture)  # type: ignore[arg-type]
        after = wire.pack({"op": "invoke", "id": "next"})
        theirs.sendall(wire.pack({"op": "console-synced", "seq": 1}) + after)  # the host's answer, and more
        channel.sendall(wire.pack({"op": "result", "status": 200}))
        assert capture.console == [markers.status("sync 1")]
        assert theirs.recv(100) == wire.pack({"op": "result", "status": 200})
        assert channel.recv(1 << 16) == after  # kept for the runtime
        channel.sendall(b"no output, no sync")
        assert len(capture.console) == 1 and theirs.recv(100) == b"no output, no sync"


def test_output_capture_frames_every_write() -> None:
    """In a child process: capturing replaces fds 1 and 2."""
    script = textwrap.dedent("""
        import os, sys
        from capfaas.backends.morello.capture import OutputCapture
        console = os.dup(1)
        capture = OutputCapture(console)
        capture.start()
        print("printed")
        os.write(2, b"raw stderr\\n")
        sys.stdout.write("x" * 1000 + "\\n")
        assert capture.drain() and not capture.drain()
        capture.stop()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).stdout
    frames = [markers.parse(line)[1] for line in out.splitlines(keepends=True)]
    assert all(frame is not None for frame in frames)
    stdout = b"".join(f.payload for f in frames if f.kind == "o")  # type: ignore[union-attr]
    stderr = b"".join(f.payload for f in frames if f.kind == "e")  # type: ignore[union-attr]
    assert (stdout, stderr) == (b"printed\n" + b"x" * 1000 + b"\n", b"raw stderr\n")


# -- CAP_Files inside the cVM ----------------------------------------------------------------------

def test_a_capfile_is_opened_and_probed(tmp_path) -> None:
    calls = []
    backing = tmp_path / "cf1"
    backing.write_bytes(b"shared bytes")

    def opener(path: str, flags: int) -> int:
        calls.append(("open", path, flags))
        return os.open(backing, flags)

    def ioctl(fd: int, request: int, arg: bytes) -> int:
        calls.append(("ioctl", request, arg))
        return 0

    with open_capfile("inbox", "/cap/cf2", ioctl=ioctl, opener=opener) as capfile:
        assert capfile.read() == b"shared bytes"
    assert calls == [("open", "/cap/cf2", os.O_RDWR), ("ioctl", IOCTL_CF_PRB, b"inbox\0")]
    assert IOCTL_CF_PRB == 0x4004E203


def test_capfile_names_and_devices_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="1-9 of"):
        open_capfile("toolongname")
    with pytest.raises(ValueError, match="not a CAP_File device"):
        open_capfile("inbox", "/cap/ch1")
    fds = []

    def opener(path: str, flags: int) -> int:
        fds.append(os.open(os.devnull, flags))
        return fds[-1]

    def refuse(fd: int, request: int, arg: bytes) -> int:
        raise OSError(25, "Inappropriate ioctl for device")

    with pytest.raises(OSError):
        open_capfile("inbox", ioctl=refuse, opener=opener)
    with pytest.raises(OSError):
        os.fstat(fds[0])  # closed on failure


def test_bundles_are_unpacked_safely(tmp_path) -> None:
    import io
    import zipfile

    from capfaas.backends.morello.agent import unpack_bundle
    from capfaas.backends.morello.backend import pack_bundle

    bundle = tmp_path / "bundle"
    (bundle / "pkg").mkdir(parents=True)
    (bundle / "handler.py").write_text("def handle(event, context):\n    return 'ok'\n")
    (bundle / "pkg" / "data.txt").write_text("data")
    (bundle / "__pycache__").mkdir()
    (bundle / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"stale")
    target = unpack_bundle(pack_bundle(bundle), tmp_path / "bundles", "fn")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == \
        ["handler.py", "pkg/data.txt"]
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../escape.py", "x")
    with pytest.raises(ValueError, match="unsafe path '../escape.py'"):
        unpack_bundle(evil.getvalue(), tmp_path / "bundles", "evil")
    assert not (tmp_path / "escape.py").exists()


def test_function_code_opens_declared_capfiles_through_the_two_devices(tmp_path, monkeypatch) -> None:
    import builtins
    import io

    from capfaas.backends.morello.capfile import DeviceFiles
    from capfaas.core.capfiles import install_open

    monkeypatch.setattr(builtins, "open", builtins.open)  # put back after the test, as a cVM never needs
    monkeypatch.setattr(io, "open", io.open)

    backing = {"/cap/cf1": tmp_path / "cf1", "/cap/cf2": tmp_path / "cf2"}
    for path in backing.values():
        path.write_bytes(b"0123456789")
    probed = []

    def stand_in(name: str, device: str):  # the device and its probe ioctl, as open_capfile drives them
        return open_capfile(name, device, ioctl=lambda fd, request, arg: probed.append((device, arg)),
                            opener=lambda path, flags: os.open(backing[path], flags))

    files = DeviceFiles(stand_in, declared=("inbox", "outbox", "third"))
    install_open(lambda: files)
    with pytest.raises(FileNotFoundError, match=r"no CAP_File named 'other' is declared for this cVM \(declared: "
                                                r"inbox, outbox, third\)"):
        open("/cap/other", "rb")  # never probed: the monitor would spin on a name it does not hold
    assert probed == []
    first = open("/cap/inbox", "rb")
    second = open("/cap/outbox", "r+b")
    assert first.read(4) == b"0123" and probed == [("/cap/cf1", b"inbox\0"), ("/cap/cf2", b"outbox\0")]
    with pytest.raises(OSError, match="both CAP_File devices"):
        files.open("third")
    first.close()
    with files.open("third") as third:  # a device is free again
        assert third.read() == b"0123456789"
    second.close()
    for refused in (lambda: files.create("x", 16), lambda: files.grant("x", "f"), files.list):
        with pytest.raises(NotImplementedError, match="declared when the cVM starts"):
            refused()
