"""Per-function logs: what each invocation printed, kept bounded, followed live."""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LogLine:
    name: str
    instance: str
    timestamp: float
    text: str

    def as_openfaas(self) -> dict[str, str]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.timestamp))
        return {"name": self.name, "namespace": "capfaas", "instance": self.instance,
                "timestamp": f"{stamp}.{int(self.timestamp % 1 * 1e6):06d}Z", "text": self.text}


class LogStore:
    """The last ``per_function`` lines of each function, and queues of those following them."""

    def __init__(self, per_function: int = 10_000) -> None:
        self.lines: dict[str, collections.deque[LogLine]] = collections.defaultdict(
            lambda: collections.deque(maxlen=per_function))
        self.followers: dict[str, set[asyncio.Queue[LogLine | None]]] = collections.defaultdict(set)

    def add(self, name: str, instance: str, output: bytes) -> None:
        if not output:  # most invocations print nothing
            return
        now = time.time()
        for raw in output.decode("utf-8", "replace").splitlines():
            line = LogLine(name, instance, now, raw)
            self.lines[name].append(line)
            for queue in self.followers[name]:
                if queue.qsize() < 10_000:  # a stalled follower loses lines, not our memory
                    queue.put_nowait(line)

    def tail(self, name: str, count: int | None, since: float | None) -> list[LogLine]:
        lines = [line for line in self.lines.get(name, ()) if since is None or line.timestamp >= since]
        if count is None:
            return lines
        return lines[-count:] if count > 0 else []  # lines[-0:] would be all of them

    def follow(self, name: str) -> asyncio.Queue[LogLine | None]:
        """A queue of ``name``'s new lines; ``None`` in it means the store is closing."""
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue()
        self.followers[name].add(queue)
        return queue

    def unfollow(self, name: str, queue: asyncio.Queue[LogLine | None]) -> None:
        self.followers[name].discard(queue)

    def close(self) -> None:
        """End every follow (at shutdown, so a ``logs --follow`` does not hold the drain up)."""
        for queues in self.followers.values():
            for queue in queues:
                queue.put_nowait(None)
