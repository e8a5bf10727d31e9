"""The environment function code sees: its own variables, a few basics, and nothing of the host's."""
from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from typing import Any

BASICS = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}


def replace_environment(env: Mapping[str, str]) -> None:
    """Replace the process environment (Python's and libc's) with ``BASICS`` plus ``env``.

    Whatever the gateway or template inherited (an admin password, cloud credentials) is gone,
    and so is any temporary directory ``tempfile`` chose before, which pointed at the host /tmp.
    """
    os.environ.clear()
    os.environ.update(BASICS)
    os.environ.update(env)
    tempfile: Any = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None


def reseed_random() -> None:
    """A fresh seed for ``random``: cVMs forked from one template would otherwise share a sequence.

    (``random`` also reseeds itself in every forked child through ``os.register_at_fork``.)
    """
    random.seed(os.urandom(32))
