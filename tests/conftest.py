"""One suite, two hot paths: every test that takes ``impl`` runs on the compiled module and its twin."""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = SHARED / "vectors" / "morello"

IMPLEMENTATIONS = {
    "cython": ("capfaas.core._capability", "capfaas.backends.emulated._memory"),
    "python": ("capfaas.core._capability_py", "capfaas.backends.emulated._memory_py"),
}


@dataclass(frozen=True)
class HotPath:
    """The capability model and emulated memory of one implementation."""

    name: str
    capability: ModuleType
    memory: ModuleType

    @property
    def Capability(self) -> Any:
        return self.capability.Capability

    @property
    def TaggedMemory(self) -> Any:
        return self.memory.TaggedMemory


def extension_required() -> bool:
    return os.environ.get("CAPFAAS_REQUIRE_EXTENSION", "") not in ("", "0")


def pure_python_requested() -> bool:
    return os.environ.get("CAPFAAS_PUREPYTHON", "") not in ("", "0")


def load_hotpath(name: str) -> HotPath:
    cap_name, mem_name = IMPLEMENTATIONS[name]
    try:
        return HotPath(name, importlib.import_module(cap_name), importlib.import_module(mem_name))
    except ImportError as exc:
        if extension_required():
            pytest.fail(f"the compiled hot path did not build or import: {exc}")
        pytest.skip(f"compiled hot path not built: {exc}")


def _selected() -> list[str]:
    return ["python"] if pure_python_requested() else ["cython", "python"]


@pytest.fixture(params=_selected())
def impl(request: pytest.FixtureRequest) -> HotPath:
    """Each implementation in turn (only the twin under CAPFAAS_PUREPYTHON=1)."""
    return load_hotpath(request.param)


@pytest.fixture
def memory(impl: HotPath) -> Any:
    """A fresh 1 MiB segment of the implementation under test."""
    mem = impl.TaggedMemory(1 << 20)
    yield mem
    mem.close()


@pytest.fixture
def bundles() -> Iterator[Path]:
    """Function bundles outside /tmp, where they live in production: a cVM's /tmp is its own tmpfs,
    which would hide another function's files instead of showing that reading them is denied."""
    root = Path(tempfile.mkdtemp(prefix="capfaas-test-", dir="/var/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def intravisor() -> AsyncIterator[Any]:
    """A started intravisor on the emulated backend, with 1 GiB regions."""
    from capfaas.backends.emulated.backend import EmulatedBackend
    from capfaas.core.intravisor import Intravisor
    from capfaas.plugin_manager import make_plugin_manager

    async with Intravisor(EmulatedBackend(), make_plugin_manager(autoload=False),
                          segment_size=64 << 30, region_size=1 << 30) as iv:
        yield iv
