"""Run a benchmark function on N fresh local processes joined by a gloo process group.

Fresh spawned processes give each configuration its own peak RSS and no state left over from a previous one;
`worker(rank, world, cfg) -> dict` must be a module-level function (it is pickled into the children).
"""
from __future__ import annotations

import os
import queue as queue_module
import socket
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _entry(worker: Callable[[int, int, dict], dict], rank: int, world: int, port: int, cfg: dict, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores are shared by the ranks
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=900))
    try:
        queue.put({"rank": rank, **worker(rank, world, cfg)})
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run_ranks(worker: Callable[[int, int, dict], dict], world: int, cfg: dict, *, timeout: float = 3600.0,
              what: str = "benchmark") -> list[dict[str, Any]]:
    """Reports of every rank, in rank order; a clear error when a rank fails."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    reports: list[dict] = []
    deadline = time.monotonic() + timeout
    # Poll instead of one blocking get: a rank that dies (an exception, the OOM killer) leaves no report, and the
    # others may wait in a collective for it; stop as soon as one exits without reporting.
    while len(reports) < world:
        try:
            reports.append(queue.get(timeout=2.0))
            continue
        except queue_module.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            why = f"rank(s) {dead} exited with codes {[procs[r].exitcode for r in dead]}" if dead else \
                f"no report within {timeout:.0f} s"
            raise RuntimeError(f"{what}: {why} (the traceback is above, on stderr)")
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{what}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return sorted(reports, key=lambda r: r["rank"])
