"""Run a function or a script in several local processes joined by a gloo process group (CPU-only tests).

    from dist_utils import run_distributed
    results = run_distributed(my_fn, world_size=2, args=(path,))   # my_fn(*args) runs on every rank
    rank0, rank1 = results

`fn` must be importable by a fresh interpreter (a module-level function of a test module or package): the ranks are
started with the "spawn" method, because forking a process that already runs torch threads can deadlock. Inside
`fn`, torch.distributed is initialised (gloo) unless init_process_group=False, and the usual launcher variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set, so `accelerate.Accelerator()`
works in either case. A rank's exception is re-raised in the parent as DistributedTestError with the child's
traceback; a rank that hangs is killed after `timeout` seconds.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank failed, crashed or timed out; the message holds what the rank reported."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment variables torchrun / accelerate launch give each rank on one machine."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, kwargs: dict,
           out_dir: str, init_process_group: bool, threads: int, pg_timeout: float) -> None:
    out = Path(out_dir)
    try:
        os.environ.update(launcher_env(rank, world_size, port))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if init_process_group:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        result = fn(*args, **kwargs)
        if dist.is_initialized():
            dist.destroy_process_group()
        (out / f"result_{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException:
        # Written before the process group goes away (which makes the peers fail too). First line: when it
        # failed (CLOCK_MONOTONIC is shared by the processes), so the parent can report the root cause first.
        (out / f"error_{rank}.txt").write_text(f"{time.monotonic_ns()}\n{traceback.format_exc()}")
        raise SystemExit(1)
    # The rank's work is done and its result written: leave without the interpreter's teardown, which
    # occasionally aborts in native code after a gloo/DeepSpeed run (SIGABRT "terminate called without an active
    # exception": ~1 run in 8 with DeepSpeed on CPU, ~1 in 50 with DDP here) when nothing is left to check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (),
                    kwargs: dict[str, Any] | None = None, *, timeout: float = 120.0,
                    init_process_group: bool = True, threads: int = 1) -> list[Any]:
    """Run fn(*args, **kwargs) on `world_size` spawned ranks; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cdad_dist_test_") as tmp:
        procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), tmp,
                                                  init_process_group, threads, timeout), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        hung = _wait_all(lambda r: procs[r].exitcode, range(world_size), timeout)
        for r in hung:
            procs[r].kill()
            procs[r].join()
        errors = _collect_errors(Path(tmp), procs, hung, timeout)
        if errors:
            raise DistributedTestError("\n".join(errors))
        return [pickle.loads((Path(tmp) / f"result_{r}.pkl").read_bytes()) for r in range(world_size)]


def _wait_all(exitcode: Callable[[int], int | None], ranks: Sequence[int], timeout: float,
              grace: float = 10.0) -> list[int]:
    """Wait until every rank exits; once one fails the others get `grace` seconds (they are probably blocked in
    a collective with the dead rank). Returns the ranks still running at the end."""
    deadline = time.monotonic() + timeout
    while True:
        codes = {r: exitcode(r) for r in ranks}
        running = [r for r, c in codes.items() if c is None]
        if not running or time.monotonic() > deadline:
            return running
        if any(c not in (None, 0) for c in codes.values()):
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.05)


def _collect_errors(tmp: Path, procs: list, hung: list[int], timeout: float) -> list[str]:
    found = []  # (order, message): the earliest error first, since the others are usually its consequences
    for r, p in enumerate(procs):
        err = tmp / f"error_{r}.txt"
        if err.exists():
            when, _, text = err.read_text().partition("\n")
            found.append((int(when), f"--- rank {r} raised:\n{text}"))
        elif r in hung:
            found.append((float("inf"), f"--- rank {r} did not finish within {timeout} s (killed)"))
        elif not (tmp / f"result_{r}.pkl").exists():
            found.append((0, f"--- rank {r} exited with code {p.exitcode} without a result"))
        elif p.exitcode != 0:
            found.append((0, f"--- rank {r} wrote its result, then exited with code {p.exitcode}"))
    return [msg for _, msg in sorted(found, key=lambda f: f[0])]


def run_script_distributed(argv: Sequence[str], world_size: int = 2, *, env: dict[str, str] | None = None,
                           cwd: str | os.PathLike | None = None, timeout: float = 300.0
                           ) -> list[subprocess.CompletedProcess]:
    """Run `python argv...` once per rank with the launcher variables set (as torchrun would); no process group
    is created here, the script initialises it (e.g. through accelerate). Raises DistributedTestError with the
    output of the failing ranks; returns the completed processes (text stdout/stderr) in rank order."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cdad_dist_script_") as tmp:
        procs, logs = [], []
        for r in range(world_size):
            child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), **launcher_env(r, world_size, port)}
            # output goes to files, not pipes: a chatty rank would block on a full pipe while we poll
            out, err = open(Path(tmp) / f"out_{r}", "w+"), open(Path(tmp) / f"err_{r}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, *argv], env=child_env, cwd=cwd, stdout=out, stderr=err,
                                          text=True))
        hung = _wait_all(lambda r: procs[r].poll(), range(world_size), timeout)
        for r in hung:
            procs[r].kill()
            procs[r].wait()
        done = []
        for p, (out, err) in zip(procs, logs):
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    bad = [r for r, c in enumerate(done) if c.returncode != 0 or r in hung]
    if bad:
        msgs = [f"--- rank {r} {'timed out (killed)' if r in hung else f'exited {done[r].returncode}'}:\n"
                f"{done[r].stdout[-4000:]}\n{done[r].stderr[-8000:]}" for r in bad]
        raise DistributedTestError("\n".join(msgs))
    return done


def accelerate_launch_cmd(config_file: Path, script: Path, overrides: Sequence[str] = ()) -> list[str]:
    """`accelerate launch --config_file CONFIG --main_process_port <free> SCRIPT --set k=v ...` as an argv list."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--main_process_port", str(free_port()), str(script)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_first_task_then_resume(cmd: list[str], cwd: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess,
                                                                                           subprocess.CompletedProcess]:
    """Run `cmd --tasks 0:1`, then `cmd --resume` (one OpenMP thread per rank); both must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for extra in (["--tasks", "0:1"], ["--resume"]):
        proc = subprocess.run(cmd + extra, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(extra)}: {proc.stderr[-3000:]}"
        runs.append(proc)
    return runs[0], runs[1]
