"""The ``capfaas`` command line.

Each verb is one function taking the parsed arguments and returning the exit code; ``build_parser``
registers it with ``add_verb`` and declares its arguments. Verbs import what they need when they
run, so ``capfaas --help`` stays fast and one broken module does not take down every verb.
A failing verb prints one sentence to stderr and exits non-zero; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from . import __version__
from .core.spec import SIGNATURES

Verb = Callable[[argparse.Namespace], int]

MiB = 1 << 20


def info(args: argparse.Namespace) -> int:
    """Show the version, the capability hot path in use, and the emulator at work."""
    from .backends.emulated import memory
    from .core import capability
    from .core.faults import MemoryFault
    from .core.perms import Perm

    print(f"capfaas {__version__}")
    print(f"capability hot path: {capability.IMPLEMENTATION}")
    print(f"emulated memory hot path: {memory.IMPLEMENTATION}")

    mem = memory.TaggedMemory(MiB)
    try:
        root = mem.root_capability()
        print(f"emulated segment: {mem.size // MiB} MiB at {mem.base:#x}")
        print(f"root capability: bounds [{root.base:#x}, {root.top:#x}), length {root.length:#x}")
        print(f"  permissions {root.perms:#x}: {Perm(root.perms).name or 'none'}")
        outside = root.top
        try:
            mem.load(root, outside, 1)
        except MemoryFault as fault:
            print(f"load of 1 byte at {outside:#x}, just past the top, faults:")
            print(f"  {fault}")
        else:
            raise RuntimeError(f"the emulator allowed a load at {outside:#x}, outside the root capability")
    finally:
        mem.close()
    return 0


def plugins(args: argparse.Namespace) -> int:
    """List every plugin with the distribution that ships it and the hooks it implements."""
    from .plugin_manager import make_plugin_manager, plugin_infos

    infos = plugin_infos(make_plugin_manager())
    if args.json:
        print(json.dumps([vars(info) | {"hooks": list(info.hooks)} for info in infos], indent=2))
        return 0
    width = max(len(info.name) for info in infos)
    for info in infos:
        print(f"{info.name:<{width}}  {info.distribution} {info.version}  ({', '.join(info.hooks)})")
    return 0


def backends(args: argparse.Namespace) -> int:
    """List the hardware backends, whether each can run here, and why (not)."""
    from .plugin_manager import make_plugin_manager

    classes = [cls for group in make_plugin_manager().hook.capfaas_backends() for cls in group]
    rows = []
    for cls in sorted(classes, key=lambda c: -c.priority):
        availability = cls.availability()
        rows.append({"name": cls.name, "available": availability.available, "reason": availability.reason,
                     "priority": cls.priority, "description": cls.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "available  " if row["available"] else "unavailable"
        print(f"{row['name']:<10} {mark}  {row['reason']}")
    return 0


def read_data(data: str | None) -> bytes:
    if data is None:
        return b""
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        with open(data[1:], "rb") as f:
            return f.read()
    return data.encode()


def run(args: argparse.Namespace) -> int:
    """Run a function file (or a directory with handler.py) once in a fresh cVM and print its result."""
    import asyncio
    import base64
    from pathlib import Path

    from .core.intravisor import Invocation
    from .core.spec import FunctionSpec, Limits
    from .local import bundle_of, run_once, spec_name

    body = read_data(args.data)
    path = Path(args.path)
    with bundle_of(path) as (bundle, module):
        spec = FunctionSpec(name=spec_name(path), bundle=bundle, module=module, handler=args.handler,
                            signature=args.signature, limits=Limits(timeout=args.timeout))
        invocation = Invocation(method=args.method, path="/", headers={"Content-Type": args.content_type},
                                body=body)
        result = asyncio.run(run_once(spec, invocation, args.backend))
    if args.json:
        try:
            text, encoding = result.body.decode(), "text"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(result.body).decode(), "base64"
        print(json.dumps({"status": result.status, "headers": result.headers, "body": text,
                          "body_encoding": encoding, "outcome": result.outcome, "error": result.error,
                          "stdout": result.stdout.decode(errors="replace"),
                          "stderr": result.stderr.decode(errors="replace"),
                          "duration": round(result.duration, 6)}, indent=2))
        return 0 if result.status < 400 else 1
    sys.stderr.buffer.write(result.stdout + result.stderr)
    sys.stdout.buffer.write(result.body)
    if result.body and not result.body.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    if result.status >= 400:
        print(f"capfaas run: the function answered {result.status}" + ("" if result.outcome == "ok" else f" ({result.outcome})"), file=sys.stderr)
        return 1
    return 0


# Options every verb accepts after its name too; SUPPRESS keeps them from resetting the main
# parser's value when they are not given there.
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_verb(verbs: argparse._SubParsersAction, verb: Verb,
             parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register ``verb`` under its function name; its docstring's first line is the help."""
    doc = verb.__doc__ or ""
    parser = verbs.add_parser(verb.__name__, help=doc.partition("\n")[0],
                              description=doc, parents=[_COMMON, *parents])
    parser.set_defaults(verb=verb)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capfaas",
        description="A serverless function platform on capability VMs.",
    )
    parser.add_argument("--version", action="version", version=f"capfaas {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback when a command fails")

    verbs = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_verb(verbs, info)
    add_verb(verbs, plugins).add_argument("--json", action="store_true", help="print JSON")
    add_verb(verbs, backends).add_argument("--json", action="store_true", help="print JSON")
    verb = add_verb(verbs, run)
    verb.add_argument("path", metavar="FILE", help="a function file, or a directory with handler.py")
    verb.add_argument("--data", "-d", help="the request body: TEXT, @FILE, or - for stdin (default: empty)")
    verb.add_argument("--handler", default="handle", help="the handler's name (default: handle)")
    verb.add_argument("--signature", default="native", choices=SIGNATURES,
                      help="the handler's style (default: native handle(event, context))")
    verb.add_argument("--method", default="POST", help="the HTTP method the function sees (default: POST)")
    verb.add_argument("--content-type", default="text/plain", help="the request's Content-Type")
    verb.add_argument("--timeout", type=float, default=30.0, help="wall-clock seconds before the cVM is killed")
    verb.add_argument("--backend", default=os.environ.get("CAPFAAS_BACKEND", "auto"),
                      help="hardware backend: auto (default), emulated, morello; env CAPFAAS_BACKEND")
    verb.add_argument("--json", action="store_true", help="print the whole result as JSON")

    from .cli_gateway import add_global_options, register
    from .plugin_manager import make_plugin_manager

    add_global_options(parser)
    register(verbs, add_verb)
    make_plugin_manager().hook.capfaas_register_commands(verbs=verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one capfaas command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse already reported
        return int(stop.code or 0)
    try:
        return args.verb(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left early (`capfaas info | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        hint = "" if args.debug else " (rerun with --debug for the traceback)"
        name = getattr(args.verb, "__name__", "command")
        print(f"capfaas {name}: {message}{hint}", file=sys.stderr)
        return 1
