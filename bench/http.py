"""The HTTP gateway against a bare aiohttp server (the ceiling) and functions-framework, in one run.

Run: ``python bench/http.py`` (``--quick`` for 2-second runs; ``--duration S`` to choose). Needs
``wrk`` (Debian: ``apt-get install wrk``) and the ``bench`` extra (``pip install -e .[bench]``:
functions-framework and gunicorn).

Three servers on 127.0.0.1, each answering the same no-op handler (functions-framework style,
``handle(request) -> ""``) with keep-alive:

- capfaas: ``capfaas serve`` (aiohttp on uvloop) invoking the handler in a warm cVM;
- ceiling: one aiohttp + uvloop process calling the same handler inline;
- functions-framework: Google's server under gunicorn, with as many workers as capfaas uses cores
  (the gateway process and its cVM processes share every core of the machine).

wrk loads each in turn at concurrency 1 and 32 (one wrk thread, --latency), in rounds (five by
default) so that the three servers see the same drift of a shared machine. wrk runs on the last
CPU (``--wrk-cpu``; ``any`` lets the scheduler place it): left free on a small machine, it is often
woken onto the CPU of the server it loads and takes turns with it, which no client on its own
machine does, and which moves one round's figures by half. The script prints
requests/s, p50 and p99 (medians over the rounds), the ratios the issue sets as targets (each the
median of its per-round ratios), and whether each is met. Then it
POSTs 64 MiB to the word-count function and reads the gateway's peak memory from
/proc/PID/status: VmHWM before and after, and RssAnon (private memory, where any copy of the body
in Python would live) sampled every millisecond during the request, with RssShmem (the cVM's shared
segment, into which the body is written once, straight from the socket). The ceiling server reading
the same body with ``await request.read()`` is shown beside it.
"""
from __future__ import annotations

import sys

if sys.path and sys.path[0] == __import__("os").path.dirname(__import__("os").path.abspath(__file__)):
    del sys.path[0]  # this file is called http.py: keep it from shadowing the standard library's http

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
NOOP = "def handle(request):\n    return \"\"\n"
PASSWORD = "bench-password"
MiB = 1 << 20


# -- the ceiling: a bare aiohttp + uvloop server running the handler inline -------------------------

def ceiling_server(port: int, handler_file: str) -> None:
    import importlib.util

    import uvloop
    from aiohttp import web

    spec = importlib.util.spec_from_file_location("noop_handler", handler_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handle = module.handle

    async def function(request: web.Request) -> web.Response:
        return web.Response(text=handle(request))

    async def wordcount(request: web.Request) -> web.Response:
        body = await request.read()  # what a server does without zero-copy: the body as one bytes object
        view = memoryview(body)
        lines = sum(bytes(view[start:start + MiB]).count(b"\n") for start in range(0, len(body), MiB))
        return web.json_response({"bytes": len(body), "lines": lines})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/function/noop", function)
    app.router.add_post("/function/wordcount", wordcount)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


# -- servers -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a server exited early ({process.args}): code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up in {timeout:g} s")


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every server still running (each drains), then wait; kill one that takes 40 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()


def system_request(base: str, method: str, path: str, payload: object) -> bytes:
    token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(base + path, data=json.dumps(payload).encode(), method=method,
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def deploy(base: str, name: str, source: str, module: str, signature: str, labels: dict[str, str] | None = None) -> None:
    system_request(base, "POST", "/system/functions", {
        "service": name, "labels": labels or {},
        "code": {"files": {module: base64.b64encode(source.encode()).decode()}, "module": module, "signature": signature}})


# -- load ------------------------------------------------------------------------------------------------

@dataclass
class Figures:
    rps: float
    p50_us: float
    p99_us: float


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _micros(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"cannot read wrk's latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def wrk(url: str, connections: int, seconds: float, cpu: int | None = None) -> Figures:
    """wrk's figures for ``url``; run on ``cpu`` when given, else wherever the scheduler puts it."""
    pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
    out = subprocess.run([*pinned, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"    (wrk reported {errors[0]} for {url})")
    return Figures(rps, _micros(percentiles["50"]), _micros(percentiles["99"]))


# -- memory ------------------------------------------------------------------------------------------------

def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


def post_file(port: int, path: str, body_file: Path, pid: int) -> tuple[bytes, dict[str, int], int]:
    """POST the file (streamed from disk by http.client) while sampling the server's private memory."""
    before = status_kib(pid)
    peak_anon = before["RssAnon"]
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, status_kib(pid)["RssAnon"])
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        with open(body_file, "rb") as body:
            connection.request("POST", path, body=body, headers={"Content-Length": str(body_file.stat().st_size)})
        reply = connection.getresponse().read()
        connection.close()
    finally:
        done.set()
        sampler.join()
    return reply, before, peak_anon


def memory_figures(label: str, port: int, pid: int, body_file: Path, rounds: int) -> None:
    for attempt in range(1, rounds + 1):
        reply, before, peak_anon = post_file(port, "/function/wordcount", body_file, pid)
        after = status_kib(pid)
        print(f"  {label} POST {attempt}: {reply.decode()[:80]}")
        print(f"    VmHWM {before['VmHWM'] / 1024:7.1f} -> {after['VmHWM'] / 1024:7.1f} MiB "
              f"(+{(after['VmHWM'] - before['VmHWM']) / 1024:.1f});  RssAnon {before['RssAnon'] / 1024:.1f} MiB, "
              f"peak while serving {peak_anon / 1024:.1f} (+{(peak_anon - before['RssAnon']) / 1024:.1f});  "
              f"RssShmem {before.get('RssShmem', 0) / 1024:.1f} -> {after.get('RssShmem', 0) / 1024:.1f} MiB")


# -- the run ---------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--quick", action="store_true", help="2-second runs")
    parser.add_argument("--rounds", type=int, default=5, help="wrk runs per server and concurrency, interleaved "
                                                               "(default 5)")
    parser.add_argument("--wrk-cpu", default="last",
                        help="the CPU wrk runs on: a number, last (the default) or any (the scheduler's choice)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="gunicorn workers for functions-framework (default: the cores capfaas uses, all of them)")
    parser.add_argument("--instances", type=int, default=0,
                        help="most cVMs for the no-op function (com.openfaas.scale.max; default: the gateway's)")
    parser.add_argument("--ceiling-server", nargs=2, metavar=("PORT", "HANDLER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_server:
        ceiling_server(int(args.ceiling_server[0]), args.ceiling_server[1])
        return 0
    if shutil.which("wrk") is None:
        print("bench/http.py needs wrk, the HTTP load generator: install it with `apt-get install wrk` (Debian)",
              file=sys.stderr)
        return 2
    framework = shutil.which("functions-framework", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if framework is None:
        print("bench/http.py needs functions-framework and gunicorn: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else args.duration
    cpus = sorted(os.sched_getaffinity(0))
    wrk_cpu = None
    if args.wrk_cpu == "last":
        wrk_cpu = cpus[-1] if len(cpus) > 1 and shutil.which("taskset") else None
    elif args.wrk_cpu != "any":
        wrk_cpu = int(args.wrk_cpu)

    work = Path(tempfile.mkdtemp(prefix="capfaas-bench-http-"))
    handler = work / "noop.py"
    handler.write_text(NOOP)
    ports = {"capfaas": free_port(), "ceiling": free_port(), "functions-framework": free_port()}
    env = {**os.environ, "CAPFAAS_ADMIN_PASSWORD": PASSWORD, "CAPFAAS_STATE_DIR": str(work / "state"),
           "CAPFAAS_BACKEND": os.environ.get("CAPFAAS_BACKEND", "emulated")}
    processes: list[subprocess.Popen[bytes]] = []
    logs = open(work / "servers.log", "wb")
    try:
        gateway = subprocess.Popen([sys.executable, "-m", "capfaas", "serve", "--port", str(ports["capfaas"])],
                                   cwd=work, env=env, stdout=logs, stderr=subprocess.STDOUT)
        processes.append(gateway)
        ceiling = subprocess.Popen([sys.executable, __file__, "--ceiling-server", str(ports["ceiling"]), str(handler)],
                                   cwd=work, stdout=logs, stderr=subprocess.STDOUT)
        processes.append(ceiling)
        ff = subprocess.Popen([framework, "--target", "handle", "--source", str(handler), "--host", "127.0.0.1",
                               "--port", str(ports["functions-framework"])], cwd=work,
                              env={**os.environ, "WORKERS": str(args.workers)}, stdout=logs, stderr=subprocess.STDOUT)
        processes.append(ff)
        base = f"http://127.0.0.1:{ports['capfaas']}"
        wait_until_up(base + "/healthz", gateway)
        wait_until_up(f"http://127.0.0.1:{ports['ceiling']}/function/noop", ceiling)
        wait_until_up(f"http://127.0.0.1:{ports['functions-framework']}/", ff)
        scaling = {"com.openfaas.scale.max": str(args.instances)} if args.instances else {}
        deploy(base, "noop", NOOP, "noop.py", "functions-framework", scaling)
        deploy(base, "wordcount", (ROOT / "functions" / "wordcount.py").read_text(), "wordcount.py", "native")
        urls = {"capfaas": f"{base}/function/noop", "ceiling": f"http://127.0.0.1:{ports['ceiling']}/function/noop",
                "functions-framework": f"http://127.0.0.1:{ports['functions-framework']}/"}

        print(f"no-op handler, keep-alive, wrk 1 thread on {'any CPU' if wrk_cpu is None else f'CPU {wrk_cpu}'}, "
              f"{seconds:g} s per run, {args.rounds} rounds; {os.cpu_count()} cores; "
              f"capfaas with {args.instances or 'the default maximum of'} cVMs; "
              f"functions-framework under gunicorn with {args.workers} workers")
        rounds: dict[int, list[dict[str, Figures]]] = {}
        for connections in (1, 32):
            for url in urls.values():
                wrk(url, connections, 1.0, wrk_cpu)  # warm: instances started, caches hot
            rounds[connections] = [{name: wrk(url, connections, seconds, wrk_cpu) for name, url in urls.items()}
                                   for _ in range(args.rounds)]
            for name in urls:
                runs = [run[name] for run in rounds[connections]]
                rates = [f.rps for f in runs]
                print(f"  c={connections:<2} {name:<20} {median(rates):9.0f} req/s   "
                      f"p50 {median(f.p50_us for f in runs):8.0f} us   p99 {median(f.p99_us for f in runs):8.0f} us"
                      f"   (req/s {min(rates):.0f} to {max(rates):.0f})")

        def across(connections: int, figure: Callable[[dict[str, Figures]], float]) -> float:
            """A comparison made within each round, then its median."""
            return median(figure(run) for run in rounds[connections])

        print("targets:")
        verdicts = []
        for connections in (1, 32):
            to_ceiling = across(connections, lambda run: run["capfaas"].rps / run["ceiling"].rps)
            to_ff = across(connections, lambda run: run["capfaas"].rps / run["functions-framework"].rps)
            verdicts.append((f"c={connections} throughput vs ceiling  {to_ceiling:5.2f}x (target >= 0.5x)",
                             to_ceiling >= 0.5))
            verdicts.append((f"c={connections} throughput vs functions-framework  {to_ff:5.2f}x (target >= 2x)",
                             to_ff >= 2))
        over = across(1, lambda run: run["capfaas"].p50_us - run["ceiling"].p50_us)
        verdicts.append((f"c=1 p50 over the ceiling's {over:.0f} us (target <= 150 us)", over <= 150))
        tail = across(32, lambda run: run["capfaas"].p99_us / run["ceiling"].p99_us)
        verdicts.append((f"c=32 p99 {tail:.2f}x the ceiling's (target <= 2x)", tail <= 2))
        for text, met in verdicts:
            print(f"  {'met    ' if met else 'NOT MET'}  {text}")

        body_file = work / "words.txt"
        line = b"the quick brown fox jumps over the lazy dog\n"
        with open(body_file, "wb") as out:
            out.write(line * (64 * MiB // len(line)) + b"x" * (64 * MiB % len(line)))
        print("64 MiB POST to the word-count function (the gateway's memory, from /proc/PID/status):")
        memory_figures("capfaas", ports["capfaas"], gateway.pid, body_file, 3)
        print("the same body to the ceiling server, which reads it with `await request.read()`:")
        memory_figures("ceiling", ports["ceiling"], ceiling.pid, body_file, 1)
        return 0
    finally:
        stop_all(processes)
        logs.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
