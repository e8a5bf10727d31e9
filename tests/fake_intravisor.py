"""A stand-in for Intravisor's monitor, for testing the Morello backend where there is no Morello.

It behaves as the monitor does from the outside (docs/morello.md, Intravisor's sources and logs):
``fake_intravisor.py -y cvm.yaml`` from the directory holding the runtime and disk, the YAML read
with the same event rules as ``intra_parser.c`` (unknown keys fail, isolation and capfile sizes
are ``strtol(…, 16)``, a key after a ``capfiles`` list spins), ``isolation.size`` checked against
CVM_MAX_SIZE, args split on spaces with 15 kept and argv[0] forced to ``/ld.so``, monitor and
kernel noise on stdout (some of it flushed mid-line), and the cVM's program run with the
console as its stdout and stderr. The program is the agent: ``/usr/bin/python3`` (or whatever the
image's interpreter is) becomes this Python, with the project on its path as the image has it.
Each capfile gets a buffer of its size holding its data as ``snprintf`` copies it (at most size - 1
bytes, then NUL), and the program runs under ``fake_lkl.py``, which stands in for musl-lkl's
``/cap/cf1`` and ``/cap/cf2`` over those buffers.

Misbehaviours, chosen with ``--mode``: ``hang`` (before the agent starts), ``spin`` (prints an
unknown-hostcall error and spins), ``die`` (exits before the agent), ``die-once`` (dies on the
first start only, counted in ``--state``), ``crash`` (the whole monitor dies mid-service, when the
file ``STATE.crash`` appears), ``spin-after-exit`` (spins silently once the program ends), ``no-connect`` (the
agent is given a port nobody listens on).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_LKL = Path(__file__).resolve().with_name("fake_lkl.py")
MAX_ARGS = 16  # kMaxArgs: 15 arguments and the terminating NULL


class YamlError(Exception):
    pass


# -- a libyaml-style event stream for the block YAML Intravisor's configurations use ---------------

def _scalar(text: str) -> str:
    text = text.strip()
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlError(f"unterminated quoted scalar {text!r}")
        body, out, i = text[1:-1], [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"'}.get(body[i + 1], body[i + 1]))
                i += 2
            else:
                out.append(body[i])
                i += 1
        return "".join(out)
    return text


def _lines(text: str) -> list[tuple[int, str]]:
    lines = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip()))
    return lines


def _block(lines: list[tuple[int, str]], i: int, indent: int, events: list[tuple[str, ...]]) -> int:
    """A block mapping or sequence starting at line ``i`` with indentation ``indent``."""
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        events.append(("SEQUENCE_START",))
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            item = lines[i][1][1:].lstrip()
            inner = indent + (len(lines[i][1]) - len(item))
            lines[i] = (inner, item)
            i = _block(lines, i, inner, events)
        events.append(("SEQUENCE_END",))
        return i
    events.append(("MAPPING_START",))
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, sep, value = lines[i][1].partition(":")
        if not sep:
            raise YamlError(f"expected 'key: value', got {lines[i][1]!r}")
        events.append(("SCALAR", key.strip()))
        i += 1
        if value.strip():
            events.append(("SCALAR", _scalar(value)))
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("-"))):
            i = _block(lines, i, lines[i][0], events)
        else:
            events.append(("SCALAR", ""))
    events.append(("MAPPING_END",))
    return i


def events(text: str) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [("STREAM_START",)]
    for document in re.split(r"^---\s*$", text, flags=re.M):
        lines = _lines(document)
        if not lines:
            continue
        out.append(("DOCUMENT_START",))
        i = _block(lines, 0, lines[0][0], out)
        if i != len(lines):
            raise YamlError(f"unexpected indentation at {lines[i][1]!r}")
        out.append(("DOCUMENT_END",))
    out.append(("STREAM_END",))
    return out


# -- intra_parser.c's consume_event, state for state ----------------------------------------------

def strtol(text: str, base: int) -> int:
    """C's strtol: leading blanks, a sign, ``0x`` for base 16, then digits up to the first non-digit."""
    s = text.strip()
    sign = -1 if s.startswith("-") else 1
    s = s.lstrip("+-")
    if base == 16 and s[:2].lower() == "0x":
        s = s[2:]
    digits = "0123456789abcdef"[:base]
    n = 0
    for ch in s.lower():
        if ch not in digits:
            break
        n = n * base + digits.index(ch)
    return sign * n


class Spin(Exception):
    """The monitor would print this and loop forever."""


CVM_KEYS = {"name": "name", "disk": "disk", "runtime": "runtime", "net": "net", "args": "args", "wait": "wait",
            "callback_in": "cb_in", "callback_out": "cb_out", "isolation": None}
ISOLATION_KEYS = ("base", "size", "begin", "end")
CAPFILE_KEYS = ("name", "data", "size", "addr")


def consume(stream: list[tuple[str, ...]]) -> tuple[list[dict], list[dict]]:
    """(cVMs, capfiles) as the monitor's parser builds them; YamlError or Spin as it fails."""
    state, cvms, capfiles = "START", [], []
    current: dict = {}
    pending_key = ""
    for event in stream:
        kind = event[0]
        value = event[1] if len(event) > 1 else ""

        def unexpected() -> YamlError:
            return YamlError(f"Unexpected event {kind} in state {state}.")

        if state == "START":
            state = "STREAM" if kind == "STREAM_START" else (_ for _ in ()).throw(unexpected())
        elif state == "STREAM":
            if kind == "DOCUMENT_START":
                state = "DOCUMENT"
            elif kind == "STREAM_END":
                return cvms, capfiles
            else:
                raise unexpected()
        elif state == "DOCUMENT":
            state = {"MAPPING_START": "SECTION", "DOCUMENT_END": "STREAM"}.get(kind) or (_ for _ in ()).throw(unexpected())
        elif state == "SECTION":
            if kind == "SCALAR":
                if value == "cVMs":
                    state = "FLIST"
                elif value == "capfiles":
                    state = "CLIST"
                else:
                    raise YamlError(f"Unexpected scalar: {value}")
            elif kind == "DOCUMENT_END":
                state = "STREAM"
            elif kind == "MAPPING_END":  # libyaml sends this before DOCUMENT_END; the C code fails on it
                raise unexpected()
            else:
                raise unexpected()
        elif state == "FLIST":
            state = {"SEQUENCE_START": "FVALUES", "MAPPING_END": "SECTION"}.get(kind) or (_ for _ in ()).throw(unexpected())
        elif state == "FVALUES":
            if kind == "MAPPING_START":
                state, current = "FKEY", {"isol": {}}
            elif kind == "SEQUENCE_END":
                state = "FLIST"
            else:
                raise unexpected()
        elif state == "FKEY":
            if kind == "SCALAR":
                if value not in CVM_KEYS:
                    raise YamlError(f"Unexpected key: {value}")
                state, pending_key = ("ILIST", "") if value == "isolation" else ("FVALUE", value)
            elif kind == "MAPPING_END":
                cvms.append(current)
                state = "FVALUES"
            else:
                raise unexpected()
        elif state == "FVALUE":
            if kind != "SCALAR":
                raise unexpected()
            current[CVM_KEYS[pending_key]] = strtol(value, 10) if pending_key == "wait" else value
            state = "FKEY"
        elif state == "ILIST":
            state = "IVALUES" if kind == "SEQUENCE_START" else (_ for _ in ()).throw(unexpected())
        elif state == "IVALUES":
            state = {"MAPPING_START": "IKEY", "SEQUENCE_END": "FKEY"}.get(kind) or (_ for _ in ()).throw(unexpected())
        elif state == "IKEY":
            if kind == "SCALAR":
                if value not in ISOLATION_KEYS:
                    raise YamlError(f"Unexpected key: {value}")
                state, pending_key = "IVALUE", value
            elif kind == "MAPPING_END":
                state = "IVALUES"
            else:
                raise unexpected()
        elif state == "IVALUE":
            if kind != "SCALAR":
                raise unexpected()
            current["isol"][pending_key] = strtol(value, 16)
            state = "IKEY"
        elif state == "CLIST":
            if kind == "SEQUENCE_START":
                state = "CVALUES"
            elif kind == "MAPPING_END":
                state = "SECTION"
            elif kind == "SCALAR":
                raise Spin(f"something is wrong {value}")
            else:
                raise unexpected()
        elif state == "CVALUES":
            if kind == "MAPPING_START":
                state, current = "CKEY", {}
            elif kind == "SEQUENCE_END":
                state = "CLIST"
            else:
                raise unexpected()
        elif state == "CKEY":
            if kind == "SCALAR":
                if value not in CAPFILE_KEYS:
                    raise YamlError(f"Unexpected key: {value}")
                state, pending_key = "CVALUE", value
            elif kind == "MAPPING_END":
                capfiles.append(current)
                state = "CVALUES"
            else:
                raise unexpected()
        elif state == "CVALUE":
            if kind != "SCALAR":
                raise unexpected()
            current[pending_key] = strtol(value, 16) if pending_key in ("size", "addr") else value
            state = "CKEY"
    raise YamlError("the stream ended early")


# -- the monitor --------------------------------------------------------------------------------

BOOT_NOISE = """\
[    0.000000] Linux version 4.17.0 (cheri@runner) (clang version 13.0.0) #1 Sun Feb 11 01:08:40 UTC 2024
[    0.000000] Kernel command line:
[    0.000000] Memory available: 951360k/1010284k RAM
[    0.000138] lkl: time and timers initialized (irq1)
[    0.310808] console [lkl_console0] enabled
CAP_FILE INIT 43 4004e201
CAP_STREAM_HOST INIT 45 4004e401
[    1.237547] Warning: unable to open an initial console.
------ LKL INIT DONE, starting mount  -------
ADD disk
[    1.451758] EXT4-fs (vda): mounted filesystem with ordered data mode. Opts:
------ CHROOT DONE -------
creating /cap/cf1 1
creating /cap/cf2 2
------ MOUNTS DONE -------
MOUNT DONE
NO NETWORK
"""


def say(text: str, end: str = "\n") -> None:
    os.write(1, (text + end).encode())


def fail(message: str, code: int = 1) -> None:
    say(message)
    sys.exit(code)


def spin(message: str) -> None:
    say(message)
    while True:  # what Intravisor does: while(1);
        pass


def run(args: argparse.Namespace) -> int:
    say(f"Using yaml.cfg = {args.yaml}")
    try:
        text = Path(args.yaml).read_text()
    except OSError:
        fail(f"cannot open {args.yaml}, die")
    try:
        cvms, capfiles = consume(events(text))
    except YamlError as exc:
        os.write(2, f"{exc}\nconsume_event error\n".encode())
        fail("yaml is corrupted, die")
    except Spin as exc:
        spin(str(exc))
    if len(capfiles) > 10:
        spin("need more cap streams/files, die")
    for index, capfile in enumerate(capfiles):
        if capfile.get("addr"):
            say("capfiles with pre-defined addresses are not supported")
        say(f"MON: CF[{index}] {capfile.get('name', '')[:9]} {capfile.get('size', 0)}")  # as with CF_DEBUG
    buffers = Path("capfiles")
    buffers.mkdir()
    for capfile in capfiles:
        with open(buffers / capfile.get("name", "")[:9], "wb") as buffer:
            buffer.write(capfile.get("data", "").encode()[:max(capfile.get("size", 0) - 1, 0)])
            buffer.truncate(capfile.get("size", 0))
    if len(cvms) != 1:
        fail(f"this stand-in runs one cVM per monitor, got {len(cvms)}, die")
    cvm, max_size = cvms[0], args.max_size
    isol = cvm["isol"]
    say(f"***************** [{isol.get('base', 0) // max_size}] Deploy '{cvm.get('name')}' ***************")
    say(f"BUILDING cvm: name={cvm.get('name')}, disk={cvm.get('disk')}, runtime={cvm.get('runtime')}, net=(null), "
        f"args='{cvm.get('args')}', base=0x{isol.get('base', 0):x}, size=0x{isol.get('size', 0):x}, "
        f"begin=0x{isol.get('begin', 0):x}, end=0x{isol.get('end', 0):x}, cb_in = '(null)', "
        f"cb_out = '{cvm.get('cb_out', 'monitor')}' wait = {cvm.get('wait', 0)}s clean_room = 0, libvirt = 0")
    if isol.get("size") != max_size:
        fail(f"CVM_MAX_SIZE = {max_size:x}, requested = {isol.get('size', 0):x}, die")
    say(f"requested cVM size matches CVM_MAX_SIZE ({max_size:x})")
    for key in ("runtime", "disk"):
        if not cvm.get(key) or not Path(cvm[key]).is_file():
            fail(f"cannot open {key} {cvm.get(key)}, die")
    argv = [arg[:128] for arg in (cvm.get("args") or "").split(" ") if arg][:MAX_ARGS - 1]
    if not argv:
        fail("no args, die")
    argv[0] = "/ld.so"
    say("***************** Link Inner<-->Outer ***************")
    say("***************** ALL cVMs loaded ***************")
    if args.mode == "spin":
        spin("Introvisor: unknown t5 1234")
    if args.mode in ("die", "die-once"):
        state = Path(args.state) if args.state else None
        starts = int(state.read_text()) if state and state.exists() else 0
        if state:
            state.write_text(str(starts + 1))
        if args.mode == "die" or starts == 0:
            say("Segmentation fault (core dumped)")
            return 139
    for line in BOOT_NOISE.splitlines():
        say(line)
    if args.mode == "hang":
        while True:
            time.sleep(60)
    program = argv[1:]
    if not program:
        fail("nothing to run, die")
    program[0:1] = [sys.executable, str(FAKE_LKL), str(buffers.resolve())]  # the image's interpreter, with the CAP_File devices
    if args.mode == "no-connect":
        program = [re.sub(r":\d+$", ":1", arg) if arg.startswith("127.0.0.1:") else arg for arg in program]
    say(f"LOAD: {argv[1]}")
    say("---------------------------------")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    say("target SP = 43fffc000, sp_read = ", end="")  # a monitor line cut by the agent's first frame
    agent = subprocess.Popen(program, stdin=subprocess.DEVNULL, stdout=1, stderr=1, env=env)
    time.sleep(0.05)
    say("0x440000000")
    if args.mode == "crash":  # once the test creates STATE.crash: deterministic, whatever the load
        trigger = Path(f"{args.state}.crash")
        while not trigger.exists() and agent.poll() is None:
            time.sleep(0.02)
        agent.kill()
        agent.wait()
        os.kill(os.getpid(), signal.SIGSEGV)
    agent.wait()
    say("EXIT IS CALLED")
    if args.mode == "spin-after-exit":
        while True:
            pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-y", dest="yaml", required=True)
    parser.add_argument("--mode", default="ok", choices=("ok", "hang", "spin", "die", "die-once", "crash",
                                                         "spin-after-exit", "no-connect"))
    parser.add_argument("--max-size", type=lambda s: int(s, 16), default=0x40000000)
    parser.add_argument("--state")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
