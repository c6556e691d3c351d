"""Deterministic fault injection for the kill-and-resume tests (and for users rehearsing a cluster failure).

``CDAD_FAULT=PHASE:TASK:INDEX[:RANK[:ACTION]]`` makes the process of rank RANK (default 0) SIGKILL itself at that
point, the way the OOM killer or a lost node would end it: no exception, no cleanup, no flushing. With ACTION
``raise`` it raises :class:`InjectedFault` there instead (an in-process crash, for single-process tests). Phases:

- ``train``: before optimizer step INDEX of task TASK;
- ``capture``: before capture batch INDEX of task TASK's basis pass;
- ``eval``: before evaluation batch INDEX after task TASK.

A timer-based external kill cannot aim at a phase that lasts milliseconds on the tests' micro model; this can.

``CDAD_FAULT_NAN=TASK:INDEX[:RANK]`` rehearses a diverged model instead: the anomaly map of the first image of
evaluation batch INDEX after task TASK gets NaN pixels, as a model gone numerically bad would give. The run must
record it (a warning naming the image, that class's metrics NaN) and go on, losing nothing.
Unset (the normal case), every call is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

from cdad_dist.errors import ConfigError

PHASES = ("train", "capture", "eval")
ENV = "CDAD_FAULT"
NAN_ENV = "CDAD_FAULT_NAN"


ACTIONS = ("kill", "raise")


class InjectedFault(RuntimeError):
    """Raised at a ``CDAD_FAULT=...:raise`` point."""


def _parse(spec: str) -> tuple[tuple[str, int, int, int], str]:
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4, 5) or parts[0] not in PHASES:
            raise ValueError
        rank = int(parts[3]) if len(parts) >= 4 else 0
        action = parts[4] if len(parts) == 5 else "kill"
        if action not in ACTIONS:
            raise ValueError
        return (parts[0], int(parts[1]), int(parts[2]), rank), action
    except ValueError:
        raise ConfigError(f"{ENV}={spec!r}: expected PHASE:TASK:INDEX[:RANK[:ACTION]] with PHASE one of {PHASES} "
                          f"and ACTION one of {ACTIONS}") from None


def fault_point(phase: str, task: int, index: int, rank: int) -> None:
    """SIGKILL this process (or raise InjectedFault) if ``CDAD_FAULT`` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, action = _parse(spec)
    if point == (phase, task, index, rank):
        if action == "raise":
            raise InjectedFault(f"{ENV}: injected fault ({phase}, task {task}, index {index}, rank {rank})")
        print(f"{ENV}: rank {rank} kills itself ({phase}, task {task}, index {index})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def poison_maps(maps, task: int, index: int, rank: int):
    """``maps`` with NaN in the first image's top rows if ``CDAD_FAULT_NAN`` names this evaluation batch."""
    spec = os.environ.get(NAN_ENV)
    if not spec:
        return maps
    try:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{NAN_ENV}={spec!r}: expected TASK:INDEX[:RANK]") from None
    if (parts[0], parts[1], parts[2] if len(parts) == 3 else 0) != (task, index, rank):
        return maps
    print(f"{NAN_ENV}: rank {rank} poisons the maps of eval batch {index} after task {task}", flush=True)
    maps = maps.clone()
    maps[0, ..., :2, :] = float("nan")
    return maps
