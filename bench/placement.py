"""CPU placement (``capfaas serve --cpu-placement``): a flood of no-op invocations, and CPU-bound functions.

Run: ``python bench/placement.py`` (``--quick`` for 2-second runs). Needs ``wrk`` and two CPUs or more.

One gateway per placement (shared, auto, dedicated), each serving the same functions; wrk loads one
at a time, in rounds, so that all see the same drift of a shared machine, and from the last CPU
(as bench/http.py does). Prints, per placement, medians over the rounds:

1. a no-op function at concurrency 32: requests/s, p50 and p99, with the bare aiohttp+uvloop server
   of bench/http.py (the ceiling) in the same rounds, and each figure's ratio to the ceiling's;
2. a function that burns 5 ms of CPU per call, at concurrency 4 with 4 instances: requests/s, and
   the ratio to shared placement, where the cVMs have every core.

Figures, never pass/fail.
"""
from __future__ import annotations

import os
import sys

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/http.py must not shadow the standard library's http (aiohttp imports it)

import argparse
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path
from statistics import median
from types import ModuleType

PLACEMENTS = ("shared", "auto", "dedicated")
BURN = """import time


def handle(event, context):
    end = time.process_time() + 0.005
    while time.process_time() < end:
        pass
    return "burnt"
"""


def bench_http() -> ModuleType:
    """bench/http.py's servers, deploys and wrk runner."""
    spec = importlib.util.spec_from_file_location("bench_http", Path(__file__).with_name("http.py"))
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--quick", action="store_true", help="2-second runs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of runs, interleaved (default 5)")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("bench/placement.py needs wrk and taskset (Debian: apt-get install wrk util-linux)", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("bench/placement.py needs two CPUs or more: with one there is nothing to place", file=sys.stderr)
        return 2
    http = bench_http()
    seconds = 2.0 if args.quick else args.duration
    work = Path(tempfile.mkdtemp(prefix="capfaas-bench-placement-"))
    (work / "noop.py").write_text(http.NOOP)
    processes: list[subprocess.Popen[bytes]] = []
    logs = open(work / "servers.log", "wb")
    try:
        bases = {}
        for placement in PLACEMENTS:
            port = http.free_port()
            (work / placement).mkdir()
            env = {**os.environ, "CAPFAAS_ADMIN_PASSWORD": http.PASSWORD, "CAPFAAS_BACKEND": "emulated",
                   "CAPFAAS_STATE_DIR": str(work / placement / "state"), "CAPFAAS_CPU_PLACEMENT": placement}
            gateway = subprocess.Popen([sys.executable, "-m", "capfaas", "serve", "--port", str(port)],
                                       cwd=work / placement, env=env, stdout=logs, stderr=subprocess.STDOUT)
            processes.append(gateway)
            bases[placement] = f"http://127.0.0.1:{port}"
            http.wait_until_up(bases[placement] + "/healthz", gateway)
            http.deploy(bases[placement], "noop", http.NOOP, "noop.py", "functions-framework")
            http.deploy(bases[placement], "burn", BURN, "burn.py", "native", {"com.openfaas.scale.max": "4"})
        ceiling_port = http.free_port()
        ceiling = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http.py")), "--ceiling-server",
                                    str(ceiling_port), str(work / "noop.py")], stdout=logs, stderr=subprocess.STDOUT)
        processes.append(ceiling)
        ceiling_url = f"http://127.0.0.1:{ceiling_port}/function/noop"
        http.wait_until_up(ceiling_url, ceiling)
        print(f"{len(cpus)} CPUs; wrk 1 thread on CPU {cpus[-1]}, {seconds:g} s per run, {args.rounds} rounds")

        noop = {placement: f"{base}/function/noop" for placement, base in bases.items()} | {"ceiling": ceiling_url}
        for url in noop.values():
            http.wrk(url, 32, 1.0, cpus[-1])
        flood = [{name: http.wrk(url, 32, seconds, cpus[-1]) for name, url in noop.items()}
                 for _ in range(args.rounds)]
        print("no-op function, concurrency 32 (ratios: each round's, to the ceiling's, then their median)")
        for name in noop:
            runs = [run[name] for run in flood]
            line = (f"  {name:<10} {median(f.rps for f in runs):8.0f} req/s   p50 {median(f.p50_us for f in runs):6.0f} us"
                    f"   p99 {median(f.p99_us for f in runs):6.0f} us")
            if name != "ceiling":
                line += (f"   req/s {median(r[name].rps / r['ceiling'].rps for r in flood):.2f}x,"
                         f" p99 {median(r[name].p99_us / r['ceiling'].p99_us for r in flood):.2f}x the ceiling's")
            print(line)

        burn = {placement: f"{base}/function/burn" for placement, base in bases.items()}
        for url in burn.values():
            http.wrk(url, 4, 1.0, cpus[-1])
        heavy = [{name: http.wrk(url, 4, seconds, cpus[-1]) for name, url in burn.items()} for _ in range(args.rounds)]
        print("5 ms of CPU per call, concurrency 4, 4 instances (ratio: to shared placement, median of rounds)")
        for name in burn:
            print(f"  {name:<10} {median(r[name].rps for r in heavy):8.0f} req/s   "
                  f"{median(r[name].rps / r['shared'].rps for r in heavy):.2f}x shared")
        return 0
    finally:
        http.stop_all(processes)
        logs.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
