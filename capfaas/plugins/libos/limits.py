"""Resource limits of a cVM process (setrlimit), hard limits included.

Capabilities are dropped afterwards, so the process cannot raise a hard limit again.
"""
from __future__ import annotations

import os
import resource

from .policy import LibOSPolicy


def apply_rlimits(policy: LibOSPolicy) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Set the limits; return a description and the (layer, reason) of limits not applied.

    * RLIMIT_AS caps the whole address space: interpreter, runtime, the shared-memory region the
      caller mapped and the function's heap together. ``MemoryError`` is what the function sees.
    * RLIMIT_CPU: SIGXCPU at ``cpu_seconds``, SIGKILL one second later. CPU time, not wall
      time: a function sleeping or blocked in I/O is stopped by the caller's timeout instead.
    * RLIMIT_FSIZE = ``tmp_quota``: no file written can exceed the /tmp quota (writes beyond
      fail with EFBIG; Python ignores SIGXFSZ). It also applies to a regular file inherited as
      stdout, which is why the platform hands cVMs pipes.
    * RLIMIT_NPROC = 0 stops a non-root uid from creating processes, but the kernel never
      applies it to uid 0, and for other uids it counts threads of every process of that user,
      so it would forbid threads too: it is set for root only, where seccomp's refusal of fork
      and non-thread clone is what holds.
    """
    limits = {
        resource.RLIMIT_AS: policy.memory_limit,
        resource.RLIMIT_CPU: policy.cpu_seconds,
        resource.RLIMIT_NOFILE: policy.open_files,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: policy.tmp_quota,
    }
    gaps: tuple[tuple[str, str], ...] = ()
    if os.geteuid() == 0:
        limits[resource.RLIMIT_NPROC] = 0
    else:
        gaps = (("rlimit-nproc", "RLIMIT_NPROC not set: for a non-root uid it counts the user's threads "
                                 "across processes and would forbid threads; seccomp refuses fork"),)
    for which, value in limits.items():
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:  # only lower: raising needs a privilege we may lack
            value, hard = min(value, current), min(hard, current)
        resource.setrlimit(which, (value, hard))
    detail = (f"address space {policy.memory_limit} B, CPU {policy.cpu_seconds} s, "
              f"{policy.open_files} files, file size {policy.tmp_quota} B, no core dumps")
    return detail, gaps
