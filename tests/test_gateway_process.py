"""`capfaas serve` as a process: restarts, crashes, graceful shutdown, the password file, and the CLI."""
from __future__ import annotations

import json
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

from .gateway_support import CAPFAAS, FUNCTIONS, PASSWORD, deployment, served_gateway, start_served

ENV = {"CAPFAAS_ADMIN_PASSWORD": PASSWORD}
SLEEPY = (FUNCTIONS / "sleepy.py").read_text()


def _deploy(served, name: str, source: str, method: str = "POST", **fields) -> int:  # type: ignore[no-untyped-def]
    status, _, body = served.request(method, "/system/functions", json.dumps(deployment(name, source, **fields)).encode(),
                                     headers={"Content-Type": "application/json"})
    assert status in (200, 202), body
    return json.loads(body)["version"]


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]]
        time.sleep(0.05)
    return alive


def test_functions_are_served_again_after_a_restart_and_a_crash(tmp_path: Path) -> None:
    served = start_served(tmp_path, env=ENV)
    try:
        assert _deploy(served, "hello", "def handle(e, c):\n    return 'hello v1'\n") == 1
        assert _deploy(served, "hello", "def handle(e, c):\n    return 'hello v2'\n", method="PUT") == 2
        assert served.request("POST", "/system/secrets", json.dumps({"name": "k", "value": "v"}).encode())[0] == 201
        assert served.request("GET", "/function/hello", auth=False)[2] == b"hello v2"
        # a function whose secret is deleted cannot come back after a restart; the others must
        assert served.request("POST", "/system/secrets", json.dumps({"name": "gone", "value": "v"}).encode())[0] == 201
        _deploy(served, "needs-secret", "def handle(e, c):\n    return 'x'\n", secrets=["gone"])
        assert served.request("DELETE", "/system/secrets", json.dumps({"name": "gone"}).encode())[0] == 204
        assert served.stop(signal.SIGTERM, timeout=20) == 0
    finally:
        served.stop(signal.SIGKILL)

    port = served.port
    served = start_served(tmp_path, env=ENV, port=port)  # a restart: nothing redeployed
    try:
        status, _, body = served.request("GET", "/function/hello", auth=False)
        assert (status, body) == (200, b"hello v2")
        _, _, listing = served.request("GET", "/system/functions")
        assert [(f["name"], f["capfaas"]["version"]) for f in json.loads(listing)] == [("hello", 2)]
        assert "needs-secret" in served.log.read_text() and "gone" in served.log.read_text()
        assert json.loads(served.request("GET", "/system/secrets")[2]) == [{"name": "k"}]
        children = served.children()
        assert children, "the gateway runs its cVMs as child processes"
        served.process.send_signal(signal.SIGKILL)  # a crash: no shutdown of any kind
        served.process.wait(10)
        leftovers = _gone(children, 10)
        assert not leftovers, f"cVM processes outlived the gateway's crash: {leftovers}"
    finally:
        served.stop(signal.SIGKILL)

    served = start_served(tmp_path, env=ENV)
    try:
        status, _, body = served.request("GET", "/function/hello", auth=False)
        assert (status, body) == (200, b"hello v2")
        assert _deploy(served, "hello", "def handle(e, c):\n    return 'hello v3'\n", method="PUT") == 3
    finally:
        served.stop(signal.SIGKILL)


def test_graceful_shutdown_drains_in_flight_invocations(tmp_path: Path) -> None:
    with served_gateway(tmp_path, env=ENV) as served:
        _deploy(served, "sleepy", SLEEPY)
        assert served.request("GET", "/function/sleepy?seconds=0", auth=False)[0] == 200  # warm
        results: list[tuple[int, bytes]] = []

        def call() -> None:
            status, _, body = served.request("GET", "/function/sleepy?seconds=1.5", auth=False)
            results.append((status, body))

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        follower = threading.Thread(target=lambda: served.request("GET", "/system/logs?name=sleepy&follow=true"))
        follower.start()
        time.sleep(0.2)
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(10)
        assert results == [(200, b"slept 1.5 s\n")] * 2
        assert served.process.wait(10) == 0
        assert time.monotonic() - started < 5, "a log follower held the shutdown up"
        follower.join(5)
        assert not follower.is_alive()


def test_generated_admin_password_file(tmp_path: Path) -> None:
    with served_gateway(tmp_path) as served:
        password_file = tmp_path / ".capfaas" / "admin-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / ".capfaas").stat().st_mode) == 0o700
        assert served.request("GET", "/system/functions", auth=False)[0] == 401
        assert served.request("GET", "/system/functions")[0] == 200
        result = served.cli("ls")  # the CLI finds the password in the state dir, as a user beside the gateway
        assert result.returncode == 0, result.stderr


def test_the_cli_verbs_end_to_end(tmp_path: Path) -> None:
    with served_gateway(tmp_path, env=ENV) as served:
        function = tmp_path / "shout.py"
        function.write_text("import os\n"
                            "def handle(event, context):\n"
                            "    print('shouting', event.text)\n"
                            "    secret = open('/var/openfaas/secrets/token').read() if os.path.exists('/var/openfaas/secrets/token') else '-'\n"
                            "    return event.text.upper() + '|' + os.environ.get('MOOD', '') + '|' + secret\n")

        def ok(*args: str, stdin: bytes | None = None) -> str:
            result = served.cli(*args, stdin=stdin)
            assert result.returncode == 0, (args, result.stderr)
            return result.stdout.decode()

        def fails(*args: str) -> str:
            result = served.cli(*args)
            assert result.returncode != 0, args
            message = result.stderr.decode().strip()
            assert message.count("\n") == 0 and message, message  # one clear sentence
            return message

        assert "created secret token" in ok("secrets", "create", "token", "--from-literal", "t0k3n")
        assert ok("secrets", "list").split() == ["token"]
        assert "deployed shout (version 1)" in ok("deploy", str(function), "--env", "MOOD=loud", "--secret", "token",
                                                   "--label", "team=x", "--max", "2", "--timeout", "5s",
                                                   "--memory", "64Mi")
        assert "updated shout (version 2)" in ok("deploy", str(function), "--env", "MOOD=louder", "--secret", "token")
        listing = ok("ls")
        assert "shout" in listing and "Invocations" in listing
        assert [f["name"] for f in json.loads(ok("ls", "--json"))] == ["shout"]
        described = ok("describe", "shout")
        assert "Version:" in described and "2" in described and "/function/shout" in described
        assert json.loads(ok("describe", "shout", "--json"))["envVars"] == {"MOOD": "louder"}

        assert ok("invoke", "shout", "--data", "hi") == "HI|louder|t0k3n"
        assert ok("invoke", "shout", stdin=b"from stdin") == "FROM STDIN|louder|t0k3n"
        data_file = tmp_path / "data.txt"
        data_file.write_text("from file")
        assert ok("invoke", "shout", "--data", f"@{data_file}") == "FROM FILE|louder|t0k3n"
        result = served.cli("invoke", "shout", "--async", "--data", "later")
        assert result.returncode == 0 and "call id" in result.stderr.decode()

        deadline = time.monotonic() + 10
        while "shouting later" not in (logs := ok("logs", "shout")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "shouting hi" in logs and "shouting from stdin" in logs and "shouting later" in logs
        assert ok("logs", "shout", "--lines", "1").count("\n") == 1
        follower = subprocess.Popen([*CAPFAAS, "logs", "shout", "--follow", "--lines", "0"], cwd=served.cwd,
                                    env={**served.env, "CAPFAAS_GATEWAY": served.url}, stdout=subprocess.PIPE)
        try:
            time.sleep(0.5)
            ok("invoke", "shout", "--data", "followed")
            assert "shouting followed" in follower.stdout.readline().decode()  # type: ignore[union-attr]
        finally:
            follower.kill()
            follower.wait(5)
        assert ok("logs", "shout", "--since", "2100-01-01T00:00:00Z") == ""

        notes = Path(__file__).resolve().parents[1] / "functions" / "notes.py"
        assert "deployed notes" in ok("deploy", str(notes))
        assert ok("invoke", "notes", "--method", "PUT", "--data", "a note") == ""
        assert ok("files").split() == ["NAME", "SIZE", "OWNER", "READERS", "WRITERS", "notes", "65536", "notes", "-", "-"]
        assert json.loads(ok("files", "--json")) == [{"name": "notes", "size": 65536, "owner": "notes",
                                                      "readers": [], "writers": []}]
        assert "removed CAP_File notes" in ok("files", "remove", "notes")
        assert "404" in fails("files", "remove", "notes")

        assert "updated secret token" in ok("secrets", "update", "token", "--from-literal", "new", )
        assert "removed shout" in ok("rm", "shout")
        assert "removed secret token" in ok("secrets", "remove", "token")
        assert ok("secrets", "list") == ""

        assert "404" in fails("invoke", "shout", "--data", "x")
        assert "404" in fails("rm", "shout")
        assert "404" in fails("describe", "shout")
        broken = tmp_path / "broken.py"
        broken.write_text("def handle(event, context):\n    return (\n")
        message = fails("deploy", str(broken))
        assert "broken.py, line 2" in message and message.count("line 2") == 1
        assert "not valid" in fails("deploy", str(function), "--name", "bad name")
        assert "KEY=VALUE" in fails("deploy", str(function), "--env", "nonsense")
        assert "does not exist" in fails("deploy", str(tmp_path / "missing.py"))
        served_url = served.url
    # the gateway is gone now
    result = served.cli("ls")
    assert result.returncode != 0 and "cannot reach the gateway" in result.stderr.decode()
    assert served_url in result.stderr.decode()
