"""The Morello backend: real CHERI capabilities through Intravisor on CheriBSD.

Host detection is complete; driving Intravisor's monitor is not built yet, so on a host that
passes every check the backend still reports itself unavailable, saying so.
"""
from __future__ import annotations

from typing import Any

from capfaas.core.backend import Availability, Backend, BackendError, CVMProcess, LaunchRequest

from .detect import failed_check, read_host

NOT_BUILT = "launching cVMs through Intravisor is not implemented in this version of capfaas"


class MorelloBackend(Backend):
    name = "morello"
    priority = 100
    description = "Arm Morello hardware capabilities through Intravisor on CheriBSD"

    @classmethod
    def availability(cls) -> Availability:
        problem = failed_check(read_host())
        return Availability(False, problem or NOT_BUILT)

    async def start(self, segment_size: int) -> Any:
        raise BackendError(self.availability().reason)

    async def launch(self, request: LaunchRequest) -> CVMProcess:
        raise BackendError(self.availability().reason)

    async def close(self) -> None:
        return None
