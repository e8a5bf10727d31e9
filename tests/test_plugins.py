"""The plugin system: specs, built-ins, and third-party distributions found through entry points."""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from capfaas import hookspecs
from capfaas.core.backend import BackendError, select_backend
from capfaas.plugin_manager import DEFAULT_PLUGINS, make_plugin_manager, plugin_infos

PLUGIN_CODE = '''
from capfaas.hookspecs import hookimpl

STARTED = []


@hookimpl
def capfaas_cvm_started(cvm):
    STARTED.append(cvm.spec.name)


@hookimpl
def capfaas_register_commands(verbs):
    parser = verbs.add_parser("hello-plugin", help="say hello from a plugin")
    parser.set_defaults(verb=lambda args: print("hello from a plugin") or 0)
'''

BACKEND_CODE = '''
from capfaas.backends.emulated.backend import EmulatedBackend
from capfaas.core.backend import Availability
from capfaas.hookspecs import hookimpl


class BorrowedBackend(EmulatedBackend):
    """A third-party backend: the emulator under another name, ranked above everything."""

    name = "borrowed"
    priority = 1000
    description = "a third-party backend for tests"
    launches = 0

    @classmethod
    def availability(cls):
        return Availability(True, "always, for tests")

    async def launch(self, request):
        type(self).launches += 1
        return await super().launch(request)


@hookimpl
def capfaas_backends():
    return [BorrowedBackend]
'''


def make_distribution(root: Path, name: str, version: str, module: str, code: str) -> None:
    """A real installed distribution: a module plus a .dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[capfaas]\n{module} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_distribution(tmp_path, "capfaas-hello", "1.2.3", "capfaas_hello", PLUGIN_CODE)
    make_distribution(tmp_path, "capfaas-borrowed", "0.4.0", "capfaas_borrowed", BACKEND_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CAPFAAS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield tmp_path
    for module in ("capfaas_hello", "capfaas_borrowed"):
        sys.modules.pop(module, None)


def test_every_hook_is_documented_and_typed() -> None:
    specs = [obj for name, obj in vars(hookspecs).items() if name.startswith("capfaas_")]
    assert len(specs) >= 10
    for spec in specs:
        assert inspect.getdoc(spec), f"{spec.__name__} has no docstring"
        assert "return" in inspect.get_annotations(spec), f"{spec.__name__} has no return type"


def test_builtins_are_registered_from_one_tuple() -> None:
    pm = make_plugin_manager(autoload=False)
    names = [info.name for info in plugin_infos(pm)]
    assert names == list(DEFAULT_PLUGINS)
    assert all(info.distribution == "capfaas" for info in plugin_infos(pm))
    assert {cls.name for group in pm.hook.capfaas_backends() for cls in group} == {"emulated", "morello"}
    assert pm.hook.capfaas_libos() is not None


def test_each_manager_is_fresh() -> None:
    assert make_plugin_manager(autoload=False) is not make_plugin_manager(autoload=False)


def test_third_party_plugins_are_discovered(third_party: Path) -> None:
    infos = {info.name: info for info in plugin_infos(make_plugin_manager())}
    assert infos["capfaas_hello"].distribution == "capfaas-hello"
    assert infos["capfaas_hello"].version == "1.2.3"
    assert "capfaas_cvm_started" in infos["capfaas_hello"].hooks
    assert infos["capfaas_borrowed"].version == "0.4.0"


def test_autoload_can_be_disabled(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFAAS_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = {info.name for info in plugin_infos(make_plugin_manager())}
    assert "capfaas_hello" not in names and "capfaas_borrowed" not in names


def test_backend_selection() -> None:
    classes = [cls for group in make_plugin_manager(autoload=False).hook.capfaas_backends() for cls in group]
    assert select_backend(classes, "auto").name == "emulated"
    assert select_backend(classes, "emulated").name == "emulated"
    with pytest.raises(BackendError, match="unknown backend 'fpga'; choose one of: auto, emulated, morello"):
        select_backend(classes, "fpga")
    with pytest.raises(BackendError, match="backend 'morello' is not available here: not CheriBSD"):
        select_backend(classes, "morello")


async def test_third_party_backend_is_chosen_and_used(third_party: Path, tmp_path: Path) -> None:
    from capfaas.core.intravisor import Invocation
    from capfaas.core.spec import FunctionSpec
    from capfaas.local import run_once

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "fn.py").write_text("def handle(event, context):\n    return 'via ' + event.text\n")
    spec = FunctionSpec(name="fn", bundle=bundle, module="fn.py")
    result = await run_once(spec, Invocation(body=b"borrowed"), "auto")
    assert (result.status, result.body) == (200, b"via borrowed")
    assert sys.modules["capfaas_borrowed"].BorrowedBackend.launches == 1
    assert sys.modules["capfaas_hello"].STARTED == ["fn"]


def cli(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "capfaas", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli_lists_plugins_and_backends(third_party: Path) -> None:
    env = {"PYTHONPATH": f"{third_party}:{Path(__file__).resolve().parents[1]}"}
    listing = cli("plugins", env_extra=env)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^capfaas_hello +capfaas-hello 1\.2\.3 +\(capfaas_cvm_started", listing.stdout, re.M)
    assert "capfaas.plugins.libos" in listing.stdout
    shown = json.loads(cli("backends", "--json", env_extra=env).stdout)
    by_name = {row["name"]: row for row in shown}
    assert by_name["borrowed"]["available"] and by_name["emulated"]["available"]
    assert not by_name["morello"]["available"] and "CheriBSD" in by_name["morello"]["reason"]
    hello = cli("hello-plugin", env_extra=env)
    assert hello.returncode == 0 and hello.stdout.strip() == "hello from a plugin"


CHANNEL_CODE = '''
from capfaas.core.channels import Channel
from capfaas.hookspecs import hookimpl

class Shout(Channel):
    """A channel of its own: answers "shout" requests."""
    name = "shout"
    ops = frozenset({"shout"})

    async def serve(self, intravisor, cvm, request):
        return {"text": str(request.get("text", "")).upper() + " from " + cvm.spec.name}

class NoFiles(Channel):
    """Replaces the built-in CAP_Files."""
    name = "no-files"
    ops = frozenset({"file"})

    async def serve(self, intravisor, cvm, request):
        return {"error": {"type": "PermissionError", "message": "CAP_Files are switched off here"}}

@hookimpl
def capfaas_channels():
    return [Shout(), NoFiles()]
'''

CHANNEL_USER = """
def handle(event, context):
    shout = context.caller.request({"op": "shout", "text": "hello"})
    try:
        open("/cap/anything", "rb")
        files = "opened"
    except Exception as exc:
        files = f"{type(exc).__name__}: {exc}"
    return {"body": {"shout": shout.get("text"), "files": files}}
"""


async def _run_with(pm: Any, tmp_path: Path, code: str) -> Any:
    import json

    from capfaas.backends.emulated.backend import EmulatedBackend
    from capfaas.core.intravisor import Intravisor, Invocation
    from capfaas.core.spec import FunctionSpec

    bundle = tmp_path / "user"
    bundle.mkdir(exist_ok=True)
    (bundle / "fn.py").write_text(textwrap.dedent(code))
    async with Intravisor(EmulatedBackend(), pm, segment_size=4 << 30, region_size=1 << 30) as intravisor:
        cvm = await intravisor.create(FunctionSpec(name="user", bundle=bundle, module="fn.py"))
        return json.loads(bytes((await intravisor.invoke(cvm, Invocation())).body))


def test_the_channels_are_built_in_plugins() -> None:
    pm = make_plugin_manager(autoload=False)
    served = {op: channel.name for group in pm.hook.capfaas_channels() for channel in group for op in channel.ops}
    assert served == {"call": "CAP_Calls", "entry": "CAP_Calls", "buffer": "CAP_Calls", "file": "CAP_Files",
                      "stream": "CAP_Streams"}


async def test_a_third_party_channel_adds_ops_and_replaces_a_built_in(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(tmp_path, "capfaas-shout", "0.1.0", "capfaas_shout", CHANNEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CAPFAAS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    try:
        answer = await _run_with(make_plugin_manager(), tmp_path, CHANNEL_USER)
    finally:
        sys.modules.pop("capfaas_shout", None)
    assert answer == {"shout": "HELLO from user", "files": "PermissionError: CAP_Files are switched off here"}


async def test_a_blocked_channel_is_refused_by_name(tmp_path: Path) -> None:
    pm = make_plugin_manager(autoload=False)
    pm.set_blocked("capfaas.plugins.channels.files")
    answer = await _run_with(pm, tmp_path, CHANNEL_USER)
    assert answer["files"] == "RuntimeError: no channel serves 'file' requests"
    assert answer["shout"] is None
