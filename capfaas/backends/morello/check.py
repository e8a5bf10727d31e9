"""``capfaas morello check``: every check of the Morello backend, passed or failed, in order."""
from __future__ import annotations

from .config import ConfigError, load_config
from .detect import HOST_CHECKS, INSTALL_CHECKS, read_host


def run_checks() -> int:
    """Print one line per check; exit status 0 only when the backend can run here."""
    facts = read_host()
    failed = False
    for name, check in HOST_CHECKS:
        problem = check(facts)
        failed |= problem is not None
        print(f"{'ok  ' if problem is None else 'FAIL'}  {name}: {problem or 'yes'}")
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"FAIL  configuration: {exc}")
        return 1
    print(f"ok    configuration: {config.source}")
    for name, check in INSTALL_CHECKS:
        problem = check(config)
        failed |= problem is not None
        value = {"Intravisor": config.intravisor, "library OS": config.runtime, "disk image": config.disk}[name]
        print(f"{'ok  ' if problem is None else 'FAIL'}  {name}: {problem or value}")
    return 1 if failed else 0
