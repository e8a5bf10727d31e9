"""Run a function file once in a fresh cVM: the developer's local loop behind ``capfaas run``."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .core.backend import select_backend
from .core.intravisor import Intravisor, Invocation, Result
from .core.outstream import collected
from .core.spec import FunctionSpec, SpecError
from .plugin_manager import make_plugin_manager

LOCAL_SEGMENT = 64 << 30
LOCAL_REGION = 1 << 30
PACKAGE_ENTRY = "handler.py"


@contextmanager
def bundle_of(path: Path) -> Iterator[tuple[Path, str]]:
    """A private copy of the function's code, so the cVM sees that and nothing beside it.

    A file becomes a bundle of one module; a directory is copied whole and must hold ``handler.py``.
    """
    path = path.resolve()
    if not path.exists():
        raise SpecError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="capfaas-run-") as scratch:
        bundle = Path(scratch) / "bundle"
        if path.is_dir():
            if not (path / PACKAGE_ENTRY).is_file():
                raise SpecError(f"{path} is a directory without {PACKAGE_ENTRY}")
            shutil.copytree(path, bundle, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            module = PACKAGE_ENTRY
        else:
            if path.suffix != ".py":
                raise SpecError(f"{path} is not a Python file (.py)")
            bundle.mkdir()
            shutil.copy2(path, bundle / path.name)
            module = path.name
        yield bundle, module


def spec_name(path: Path) -> str:
    stem = path.resolve().name if path.is_dir() else path.stem
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "function"


async def run_once(spec: FunctionSpec, invocation: Invocation, backend: str = "auto") -> Result:
    """Start a cVM for ``spec`` on the chosen backend, invoke it once, and stop everything."""
    pm = make_plugin_manager()
    backend_class = select_backend([cls for group in pm.hook.capfaas_backends() for cls in group], backend)
    async with Intravisor(backend_class(), pm, segment_size=LOCAL_SEGMENT, region_size=LOCAL_REGION) as iv:
        cvm = await iv.create(spec)
        result = await collected(await iv.invoke(cvm, invocation))
        if not isinstance(result.body, bytes):
            result = replace(result, body=bytes(result.body))  # the segment goes away with the intravisor
        return result
