"""Slow: busy for ?seconds=N (default 60), longer than the default timeout, to show timeouts."""
import time


def handle(event, context):
    deadline = time.monotonic() + float(event.query.get("seconds", "60"))
    while time.monotonic() < deadline:
        pass
    return "finished\n"
