"""Cold starts, warm hits, instance density and bursts, against what naive platforms pay.

Run: ``python bench/coldstart.py`` (``--quick`` for a short run). Prints

1. cold start through HTTP (function scaled to zero, its template ready) p50/p90, 50 ms after the
   scale-down and back to back, against spawning a fresh Python process that imports the function
   and calls it once, measured in this run;
2. a warm hit through HTTP, against the same request to a bare aiohttp+uvloop server that runs the
   handler inline (the ceiling), both from a load generator in its own process (wrk at
   concurrency 1, as bench/http.py uses, when it is installed), alternating in three rounds;
3. N warm instances of a no-op function at once: incremental PSS per instance
   (``/proc/PID/smaps_rollup``), against a fresh interpreter's PSS;
4. a burst of 200 concurrent requests at a cold function with ``max`` 4: instances started and
   answers by status.

Figures, never pass/fail.
"""
from __future__ import annotations

import os
import sys

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/http.py must not shadow the standard library's http (aiohttp imports it)

import argparse
import asyncio
import base64
import importlib.util
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

NOOP = "def handle(event, context):\n    return 'ok'\n"
PASSWORD = "bench-password"
WARM_ROUNDS = 3
"""Warm hits are measured against the ceiling this many times, alternating."""
CEILING = """
import sys, uvloop, asyncio
from aiohttp import web
def handle(event, context):
    return 'ok'
async def route(request):
    await request.read()
    return web.Response(text=handle(None, None))
app = web.Application()
app.router.add_route('*', '/function/noop', route)
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


class Gateway:
    """A real ``capfaas serve`` process on a free port with its own state directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, CAPFAAS_ADMIN_PASSWORD=PASSWORD, CAPFAAS_STATE_DIR=str(workdir / "state"))
        self.process = subprocess.Popen([sys.executable, "-m", "capfaas", "serve", "--port", str(self.port)],
                                        env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}

    async def deploy(self, session: aiohttp.ClientSession, name: str, code: str, labels: dict[str, str]) -> None:
        body = {"service": name, "labels": labels,
                "code": {"files": {"handler.py": base64.b64encode(code.encode()).decode()}}}
        async with session.post(f"{self.url}/system/functions", json=body, headers=self.auth) as response:
            if response.status != 202:
                raise RuntimeError(f"deploy failed: {response.status} {await response.text()}")

    async def scale(self, session: aiohttp.ClientSession, name: str, replicas: int) -> None:
        async with session.post(f"{self.url}/system/scale-function/{name}", headers=self.auth,
                                json={"serviceName": name, "replicas": replicas}) as response:
            assert response.status == 202
        while True:  # scaling is asynchronous: wait until it took effect
            async with session.get(f"{self.url}/system/function/{name}", headers=self.auth) as response:
                if (await response.json())["replicas"] == replicas:
                    return
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def cold_starts(gateway: Gateway, name: str, rounds: int, settle: float) -> list[float]:
    """Cold starts, each ``settle`` seconds after the function scaled to zero (0: back to back, as
    fast as the previous one ends, before the template has forked its next spare clone)."""
    samples = []
    async with aiohttp.ClientSession() as session:
        await gateway.deploy(session, name, NOOP, {})
        async with session.post(f"{gateway.url}/function/{name}", data=b"") as response:
            await response.read()  # the template is ready once one instance has started
        for _ in range(rounds):
            await gateway.scale(session, name, 0)
            await asyncio.sleep(settle)
            start = time.perf_counter()
            async with session.post(f"{gateway.url}/function/{name}", data=b"") as response:
                await response.read()
                assert response.headers["X-Cold-Start"] == "1", "the instance was not cold"
            samples.append(time.perf_counter() - start)
    return samples


def fresh_process_starts(directory: Path, rounds: int) -> list[float]:
    """What a platform without templates pays: a new interpreter imports the function and calls it."""
    (directory / "fresh_fn.py").write_text(NOOP)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fresh_fn; fresh_fn.handle(None, None)"],
                       cwd=directory, check=True)
        samples.append(time.perf_counter() - start)
    return samples


LOADGEN = """
import asyncio, sys, time, aiohttp, uvloop
async def main(url, n):
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.post(url, data=b'') as r: await r.read()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(url, data=b'') as r: await r.read()
            out.append(time.perf_counter() - t)
    print(' '.join(f'{x:.9f}' for x in out))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _http_bench() -> Any:
    """bench/http.py as a module, for its wrk runner."""
    spec = importlib.util.spec_from_file_location("bench_http", Path(__file__).with_name("http.py"))
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warm_p50(url: str, rounds: int, seconds: float) -> float:
    """p50 seconds of sequential keep-alive requests, from a load generator in its own process:
    wrk at concurrency 1, as the HTTP bench measures its ceiling, when it is installed (it costs the
    2-core machine far less CPU than a Python client), else an aiohttp client."""
    if shutil.which("wrk"):
        run = _http_bench().wrk
        run(url, 1, 1.0)  # warm: caches hot
        return run(url, 1, seconds).p50_us / 1e6
    out = subprocess.run([sys.executable, "-c", LOADGEN, url, str(rounds)], capture_output=True, text=True, check=True)
    return percentile([float(x) for x in out.stdout.split()], .5)


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


async def density(count: int) -> tuple[float, float, int]:
    """Incremental PSS per warm no-op instance, and a fresh interpreter's PSS, in KiB."""
    from capfaas.core.spec import FunctionSpec
    from capfaas.gateway.server import Settings, close_gateway, open_gateway
    from capfaas.plugins.pooling import Scaling

    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        root = Path(scratch)
        (root / "fn.py").write_text(NOOP)
        gateway = await open_gateway(Settings(state_dir=root, admin_password=PASSWORD), "emulated")
        try:
            from capfaas.core.intravisor import Invocation
            from capfaas.plugins.pooling import make_pool

            spec = FunctionSpec(name="dense", bundle=root, module="fn.py")
            pool = make_pool(gateway.intravisor, spec, Scaling(max=count))
            await pool.scale_to(count)
            cvms = list(pool.instances)
            for cvm in cvms:  # each serves once, so its pages are as a warm instance's are
                await gateway.intravisor.invoke(cvm, Invocation())
            per_instance = statistics.mean(pss_kib(cvm.process.pid) for cvm in cvms)
            started = len(cvms)
            await pool.close()
        finally:
            await close_gateway(gateway)
    fresh = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.5)
    fresh_pss = pss_kib(fresh.pid)
    fresh.kill()
    fresh.wait()
    return per_instance, fresh_pss, started


async def burst(gateway: Gateway, requests: int) -> tuple[int, dict[int, int], int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=requests)) as session:
        await gateway.deploy(session, "bursty", "import time\ndef handle(event, context):\n    time.sleep(0.05)\n    return 'ok'\n",
                             {"com.openfaas.scale.max": "4"})
        await gateway.scale(session, "bursty", 0)

        async def one() -> tuple[int, str | None]:
            async with session.post(f"{gateway.url}/function/bursty", data=b"") as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(requests)))
        async with session.get(f"{gateway.url}/system/function/bursty", headers=gateway.auth) as response:
            status = await response.json()
    by_status: dict[int, int] = {}
    for code, _ in results:
        by_status[code] = by_status.get(code, 0) + 1
    retry_after = sum(1 for code, hint in results if code == 429 and hint)
    return status["capfaas"]["coldStarts"], by_status, retry_after


async def run(quick: bool, instances: int) -> None:
    rounds = 20 if quick else 100
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        workdir = Path(scratch)
        gateway = Gateway(workdir)
        ceiling_port = free_port()
        ceiling = subprocess.Popen([sys.executable, "-c", CEILING, str(ceiling_port)])
        try:
            await wait_http(f"{gateway.url}/healthz")
            await wait_http(f"http://127.0.0.1:{ceiling_port}/function/noop")
            cold = await cold_starts(gateway, "cold", rounds, settle=0.05)
            back_to_back = await cold_starts(gateway, "cold-again", rounds, settle=0.0)
            fresh = fresh_process_starts(workdir, max(5, rounds // 4))
            async with aiohttp.ClientSession() as session:
                await gateway.deploy(session, "noop", NOOP, {"com.openfaas.scale.min": "1"})
            seconds = 2.0 if quick else 5.0
            pairs = [(warm_p50(f"{gateway.url}/function/noop", rounds * 20, seconds),
                      warm_p50(f"http://127.0.0.1:{ceiling_port}/function/noop", rounds * 20, seconds))
                     for _ in range(WARM_ROUNDS)]  # interleaved: both see the same drift of the machine
            started, by_status, retry_after = await burst(gateway, 200)
        finally:
            gateway.stop()
            ceiling.kill()
    print(f"cold start through HTTP ({rounds} rounds, 50 ms after scaling to zero): p50 "
          f"{percentile(cold, .5) * 1e3:.2f} ms, p90 {percentile(cold, .9) * 1e3:.2f} ms")
    print(f"  back to back (before the template forked its next spare clone): p50 "
          f"{percentile(back_to_back, .5) * 1e3:.2f} ms, p90 {percentile(back_to_back, .9) * 1e3:.2f} ms")
    print(f"fresh Python process importing the function: p50 {percentile(fresh, .5) * 1e3:.2f} ms")
    print(f"  cold start is {percentile(fresh, .5) / percentile(cold, .5):.1f}x faster "
          f"(back to back: {percentile(fresh, .5) / percentile(back_to_back, .5):.1f}x)")
    generator = "wrk, c=1" if shutil.which("wrk") else "an aiohttp client; install wrk to measure as bench/http.py does"
    warm, bare = statistics.median(w for w, _ in pairs), statistics.median(b for _, b in pairs)
    added = statistics.median(w - b for w, b in pairs)
    print(f"warm hit through the gateway ({generator}, median of {WARM_ROUNDS} interleaved rounds): p50 "
          f"{warm * 1e6:.0f} us; bare aiohttp ceiling: p50 {bare * 1e6:.0f} us; added {added * 1e6:.0f} us "
          f"(per round: {', '.join(f'{(w - b) * 1e6:.0f}' for w, b in pairs)})")
    print(f"burst of 200 at a cold function with max 4: {started} instances started; answers {by_status}"
          f" ({retry_after} of the 429s carry Retry-After)")
    per_instance, fresh_pss, count = await density(instances)
    print(f"{count} warm no-op instances: PSS {per_instance / 1024:.2f} MiB each; "
          f"a fresh interpreter: {fresh_pss / 1024:.2f} MiB ({fresh_pss / per_instance:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke run)")
    parser.add_argument("--instances", type=int, default=500, help="warm instances for the density figure")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.quick, args.instances))


if __name__ == "__main__":
    main()
