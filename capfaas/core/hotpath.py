"""Choose between a compiled module and its pure-Python twin, the msgpack way.

``CAPFAAS_PUREPYTHON=1`` forces the twin; otherwise the compiled module is used when it imports.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType


def pure_python_requested() -> bool:
    return os.environ.get("CAPFAAS_PUREPYTHON", "") not in ("", "0")


def choose(compiled: str, pure: str) -> tuple[ModuleType, str]:
    """Import ``compiled`` unless the pure twin is requested or the compile failed."""
    if not pure_python_requested():
        try:
            return importlib.import_module(compiled), "cython"
        except ImportError:
            pass
    return importlib.import_module(pure), "python"
