"""Deterministic fault injection for the kill-and-resume tests (and for users rehearsing a cluster failure).

``CDAD_FAULT=PHASE:TASK:INDEX[:RANK]`` makes the process of rank RANK (default 0) SIGKILL itself at that point, the
way the OOM killer or a lost node would end it: no exception, no cleanup, no flushing. Phases:

- ``train``: before optimizer step INDEX of task TASK;
- ``capture``: before capture batch INDEX of task TASK's basis pass;
- ``eval``: before evaluation batch INDEX after task TASK.

A timer-based external kill cannot aim at a phase that lasts milliseconds on the tests' micro model; this can.
Unset (the normal case), every call is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

from cdad_dist.errors import ConfigError

PHASES = ("train", "capture", "eval")
ENV = "CDAD_FAULT"


def _parse(spec: str) -> tuple[str, int, int, int]:
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4) or parts[0] not in PHASES:
            raise ValueError
        rank = int(parts[3]) if len(parts) == 4 else 0
        return parts[0], int(parts[1]), int(parts[2]), rank
    except ValueError:
        raise ConfigError(f"{ENV}={spec!r}: expected PHASE:TASK:INDEX[:RANK] with PHASE one of {PHASES}") from None


def fault_point(phase: str, task: int, index: int, rank: int) -> None:
    """SIGKILL this process if ``CDAD_FAULT`` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if _parse(spec) == (phase, task, index, rank):
        print(f"{ENV}: rank {rank} kills itself ({phase}, task {task}, index {index})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
