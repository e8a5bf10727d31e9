"""The CLI verbs that talk to a gateway, with faas-cli's names and habits."""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from .client import GatewayClient, GatewayError
from .core.spec import SIGNATURES, check_name

MAX_BUNDLE_FILES = 1000
SKIPPED = ("__pycache__", ".git", ".venv", ".capfaas")


CPU_PLACEMENTS = ("auto", "dedicated", "shared")


def cpu_placement(value: str) -> str:
    """Checked here rather than by ``choices``, which argparse does not apply to a default taken
    from the environment."""
    if value not in CPU_PLACEMENTS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a CPU placement (from --cpu-placement or "
                                         f"CAPFAAS_CPU_PLACEMENT): choose {', '.join(CPU_PLACEMENTS)}")
    return value


def _client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(args.gateway, Path(args.state_dir) if args.state_dir else None)


def serve(args: argparse.Namespace) -> int:
    """Run the gateway (and deploy the functions in each --deploy directory)."""
    from .credentials import default_state_dir
    from .gateway.server import run_server

    run_server(Path(args.state_dir) if args.state_dir else default_state_dir(), args.host, args.port,
               args.backend, [Path(d) for d in args.deploy], max_body=args.max_body, cpu_placement=args.cpu_placement)
    return 0


def bundle_files(path: Path) -> tuple[dict[str, bytes], str]:
    """The files to upload and the entry module: one .py file, or a directory with handler.py."""
    if path.is_file():
        if path.suffix != ".py":
            raise GatewayError(f"{path} is not a Python file (.py)")
        return {path.name: path.read_bytes()}, path.name
    if not path.is_dir():
        raise GatewayError(f"{path} does not exist")
    if not (path / "handler.py").is_file():
        raise GatewayError(f"{path} is a directory without handler.py")
    files = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.is_file() and not any(part in SKIPPED for part in relative.parts) and file.suffix != ".pyc":
            files[relative.as_posix()] = file.read_bytes()
        if len(files) > MAX_BUNDLE_FILES:
            raise GatewayError(f"{path} holds more than {MAX_BUNDLE_FILES} files")
    return files, "handler.py"


def _pairs(values: list[str], what: str) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GatewayError(f"{what} must look like KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def deploy(args: argparse.Namespace) -> int:
    """Deploy a function file (or a directory with handler.py), or update it if it exists;
    with --sequence NAME, PATH lists deployed functions (f1,f2,f3) to run as a pipeline."""
    if args.sequence:
        name = check_name(args.sequence)
        files, module = {}, "handler.py"
    else:
        path = Path(args.path)
        files, module = bundle_files(path)
        name = args.name or (path.resolve().name if path.is_dir() else path.stem)
        check_name(name)
    labels = _pairs(args.label, "--label")
    for key, value in (("min", args.min), ("max", args.max)):
        if value is not None:
            labels[f"com.openfaas.scale.{key}"] = str(value)
    limits: dict[str, Any] = {}
    if args.memory:
        limits["memory"] = args.memory
    code: dict[str, Any] = {"files": {p: base64.b64encode(c).decode() for p, c in files.items()},
                            "module": module, "handler": args.handler, "signature": args.signature}
    if args.sequence:
        code = {"sequence": [stage.strip() for stage in args.path.split(",") if stage.strip()]}
    if args.timeout is not None:
        code["timeout"] = args.timeout
    if args.concurrency is not None:
        code["concurrency"] = args.concurrency
    deployment = {"service": name, "image": f"capfaas/{name}", "envVars": _pairs(args.env, "--env"),
                  "secrets": args.secret, "labels": labels, "limits": limits or None, "code": code}
    client = _client(args)
    reply = client.json("PUT", "/system/functions", deployment, ok=(404,))
    verb = "updated"
    if reply.status == 404:
        reply = client.json("POST", "/system/functions", deployment)
        verb = "deployed"
    version = reply.json().get("version")
    print(f"{verb} {name} (version {version}): {client.base}/function/{name}")
    return 0


def ls(args: argparse.Namespace) -> int:
    """List deployed functions with their invocations and replicas."""
    functions = _client(args).json("GET", "/system/functions").json()
    if args.json:
        print(json.dumps(functions, indent=2))
        return 0
    print(f"{'Function':<30} {'Invocations':>12} {'Replicas':>9}")
    for fn in functions:
        print(f"{fn['name']:<30} {fn['invocationCount']:>12} {fn['replicas']:>9}")
    return 0


def describe(args: argparse.Namespace) -> int:
    """Show one function's status and deployment."""
    client = _client(args)
    status = client.json("GET", f"/system/function/{urllib.parse.quote(args.name)}").json()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    extra = status.get("capfaas", {})
    rows = [("Name", status["name"]), ("Version", extra.get("version")), ("Status", "Ready" if status["availableReplicas"] or extra.get("minReplicas") == 0 else "Not Ready"),
            ("Replicas", status["replicas"]), ("Available replicas", status["availableReplicas"]),
            ("Invocations", status["invocationCount"]), ("Cold starts", extra.get("coldStarts")),
            ("Handler", f"{extra.get('module')}:{extra.get('handler')} ({extra.get('signature')})"),
            ("Created", status.get("createdAt")), ("URL", f"{client.base}/function/{status['name']}"),
            ("Async URL", f"{client.base}/async-function/{status['name']}"),
            ("Labels", ", ".join(f"{k}={v}" for k, v in status.get("labels", {}).items()) or "-"),
            ("Secrets", ", ".join(status.get("secrets") or []) or "-")]
    for key, value in rows:
        print(f"{key + ':':<20} {value}")
    return 0


def invoke(args: argparse.Namespace) -> int:
    """Invoke a function with --data or standard input as the body."""
    from .cli import read_data

    body = read_data(args.data) if args.data is not None else (b"" if sys.stdin.isatty() else sys.stdin.buffer.read())
    client = _client(args)
    headers = {"Content-Type": args.content_type}
    name = urllib.parse.quote(args.name)
    query = ("?" + urllib.parse.urlencode(_pairs(args.query, "--query"))) if args.query else ""
    if args.asynchronous:
        if args.callback_url:
            headers["X-Callback-Url"] = args.callback_url
        reply = client.request("POST", f"/async-function/{name}{query}", body, system=False, headers=headers)
        print(f"accepted: call id {reply.headers.get('X-Call-Id')}", file=sys.stderr)
        return 0
    reply = client.request(args.method, f"/function/{name}{query}", body, system=False, headers=headers)
    sys.stdout.buffer.write(reply.body)
    sys.stdout.flush()
    return 0


def logs(args: argparse.Namespace) -> int:
    """Print a function's logs (NDJSON from the gateway, shown as text)."""
    query = {"name": args.name, "follow": "true" if args.follow else "false"}
    if args.lines is not None:
        query["tail"] = str(args.lines)
    if args.since:
        query["since"] = args.since
    for line in _client(args).stream("/system/logs?" + urllib.parse.urlencode(query)):
        entry = json.loads(line)
        print(f"{entry['timestamp']} {entry['name']} ({entry['instance'][:8]}) {entry['text']}", flush=True)
    return 0


def rm(args: argparse.Namespace) -> int:
    """Remove a deployed function."""
    _client(args).json("DELETE", "/system/functions", {"functionName": args.name})
    print(f"removed {args.name}")
    return 0


def secrets(args: argparse.Namespace) -> int:
    """Manage secrets: list, create NAME, update NAME, remove NAME (value from --from-literal, --from-file or stdin)."""
    client = _client(args)
    if args.action == "list":
        for item in client.json("GET", "/system/secrets").json():
            print(item["name"])
        return 0
    if not args.name:
        raise GatewayError(f"secret {args.action} needs a NAME")
    if args.action == "remove":
        client.json("DELETE", "/system/secrets", {"name": args.name})
        print(f"removed secret {args.name}")
        return 0
    if args.from_literal is not None:
        value = args.from_literal.encode()
    elif args.from_file:
        value = Path(args.from_file).read_bytes()
    else:
        value = sys.stdin.buffer.read()
    method = "POST" if args.action == "create" else "PUT"
    client.json(method, "/system/secrets", {"name": args.name, "rawValue": base64.b64encode(value).decode()})
    print(f"{args.action}d secret {args.name}")
    return 0


def files(args: argparse.Namespace) -> int:
    """CAP_Files: list them (name, size, owner, grants), or remove NAME (revoking it for every holder)."""
    client = _client(args)
    if args.action == "remove":
        if not args.name:
            raise GatewayError("files remove needs a NAME")
        client.request("DELETE", f"/system/files/{urllib.parse.quote(args.name, safe='')}")
        print(f"removed CAP_File {args.name}")
        return 0
    listed = client.json("GET", "/system/files").json()
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [("NAME", "SIZE", "OWNER", "READERS", "WRITERS")]
    rows += [(f["name"], str(f["size"]), f["owner"], ",".join(f["readers"]) or "-", ",".join(f["writers"]) or "-")
             for f in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--gateway`` and ``--state-dir`` before the verb, as well as after it."""
    parser.add_argument("--gateway", "-g", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", default=os.environ.get("CAPFAAS_STATE_DIR"), help=argparse.SUPPRESS)


def register(verbs: argparse._SubParsersAction, add_verb: Any) -> None:
    """Declare the gateway verbs and their options."""
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: given before the verb, it still counts
    common.add_argument("--gateway", "-g", default=argparse.SUPPRESS,
                        help="the gateway's URL (default: $CAPFAAS_GATEWAY or http://127.0.0.1:8080)")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="where the gateway keeps its state (default: $CAPFAAS_STATE_DIR or ./.capfaas)")

    verb = add_verb(verbs, serve, parents=[common])
    verb.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    verb.add_argument("--port", "-p", type=int, default=8080, help="port to listen on (default: 8080)")
    verb.add_argument("--backend", default=os.environ.get("CAPFAAS_BACKEND", "auto"),
                      help="hardware backend: auto (default), emulated, morello; env CAPFAAS_BACKEND")
    verb.add_argument("--deploy", action="append", default=[], metavar="DIR",
                      help="deploy every *.py in DIR at start (repeatable)")
    verb.add_argument("--max-body", type=int, default=256 << 20, help="largest request body in bytes (default: 256 MiB)")
    verb.add_argument("--cpu-placement", choices=CPU_PLACEMENTS, type=cpu_placement,
                      default=os.environ.get("CAPFAAS_CPU_PLACEMENT", "auto"),
                      help="auto (default): while the gateway is busy, it runs on one CPU and the cVMs on the "
                           "others; dedicated: always so; shared: all on every CPU. Env CAPFAAS_CPU_PLACEMENT")

    verb = add_verb(verbs, deploy, parents=[common])
    verb.add_argument("path", metavar="PATH", help="a function file, or a directory with handler.py "
                                                   "(with --sequence: the stages, f1,f2,f3)")
    verb.add_argument("--name", help="the function's name (default: the file's or directory's name)")
    verb.add_argument("--sequence", metavar="NAME", help="deploy NAME as a pipeline of the functions PATH lists")
    verb.add_argument("--handler", default="handle", help="the handler's name (default: handle)")
    verb.add_argument("--signature", default="native", choices=SIGNATURES, help="the handler's style")
    verb.add_argument("--memory", help="memory limit, e.g. 128Mi")
    verb.add_argument("--timeout", help="wall-clock timeout per invocation, e.g. 30s")
    verb.add_argument("--env", "-e", action="append", default=[], metavar="K=V", help="an environment variable")
    verb.add_argument("--secret", action="append", default=[], metavar="NAME", help="a secret the function may read")
    verb.add_argument("--label", "-l", action="append", default=[], metavar="K=V", help="a label")
    verb.add_argument("--concurrency", type=int,
                      help="invocations one instance serves at once (above 1 needs an async def handler)")
    verb.add_argument("--min", type=int, help="warm instances kept (com.openfaas.scale.min)")
    verb.add_argument("--max", type=int, help="most instances (com.openfaas.scale.max)")

    add_verb(verbs, ls, parents=[common]).add_argument("--json", action="store_true", help="print JSON")
    verb = add_verb(verbs, describe, parents=[common])
    verb.add_argument("name", metavar="NAME")
    verb.add_argument("--json", action="store_true", help="print JSON")

    verb = add_verb(verbs, invoke, parents=[common])
    verb.add_argument("name", metavar="NAME")
    verb.add_argument("--data", "-d", help="the body: TEXT, @FILE or - (default: standard input)")
    verb.add_argument("--content-type", default="text/plain", help="the request's Content-Type")
    verb.add_argument("--method", "-m", default="POST", help="the HTTP method (default: POST)")
    verb.add_argument("--query", "-q", action="append", default=[], metavar="K=V", help="a query parameter")
    verb.add_argument("--async", dest="asynchronous", action="store_true", help="invoke asynchronously (202)")
    verb.add_argument("--callback-url", help="with --async: where the gateway POSTs the result")

    verb = add_verb(verbs, logs, parents=[common])
    verb.add_argument("name", metavar="NAME")
    verb.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    verb.add_argument("--since", help="only lines since this RFC 3339 time")
    verb.add_argument("--lines", "-n", type=int, help="only the last N lines")

    add_verb(verbs, rm, parents=[common]).add_argument("name", metavar="NAME")

    verb = add_verb(verbs, files, parents=[common])
    verb.add_argument("action", nargs="?", default="list", choices=("list", "remove"))
    verb.add_argument("name", nargs="?", metavar="NAME")
    verb.add_argument("--json", action="store_true", help="print JSON")

    verb = add_verb(verbs, secrets, parents=[common])
    verb.add_argument("action", choices=("list", "create", "update", "remove"))
    verb.add_argument("name", nargs="?", metavar="NAME")
    verb.add_argument("--from-literal", help="the secret's value")
    verb.add_argument("--from-file", help="read the secret's value from a file")
