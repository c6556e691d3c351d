"""Atomic, verifiable checkpoints in `runs/NAME/checkpoints/`.

A checkpoint is a directory written under a temporary name (`.tmp-…`) by every rank (Accelerate's `save_state`
must run on all ranks: DeepSpeed deadlocks otherwise), then sealed by the main process with a `MANIFEST.json`
holding the sha256 of every file, then renamed into place. A crash at any moment leaves either the previous
checkpoint or the new one, never a half-written one that `--resume` would pick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdad_dist.atomic import sha256_file, write_json_atomic
from cdad_dist.errors import CheckpointError

MANIFEST = "MANIFEST.json"
STATE = "state.json"
MODEL_WEIGHTS = "model.safetensors"
STRATEGY = "strategy.pt"
SCHEDULER = "scheduler.pt"
_NAME = re.compile(r"^task(\d{3})-step(\d{7})(-end)?$")


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    task: int
    step: int
    task_end: bool

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.task, int(self.task_end), self.step)


def checkpoint_name(task: int, step: int, task_end: bool) -> str:
    return f"task{task:03d}-step{step:07d}{'-end' if task_end else ''}"


def save_checkpoint(
    accelerator,
    ckpt_root: Path,
    *,
    task: int,
    step: int,
    task_end: bool,
    state: dict[str, Any],
    strategy_state: dict[str, Any],
    scheduler_state: dict[str, Any] | None,
    keep_last: int,
    model=None,
) -> Path:
    """Save model/optimizer/scheduler/RNG (via Accelerate), run state and strategy state; all ranks call this.

    `model.safetensors` (the full weights, what `--resume`, `cdad predict` and reports read) is written by
    `save_state` under DDP; under DeepSpeed `save_state` writes the engine's own layout instead, so the weights
    are added from `model` (the prepared engine) with `save_model`.
    """
    name = checkpoint_name(task, step, task_end)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    # Decided from the backend, identically on every rank: a file-existence check would race with the rank that
    # writes the file and leave the ranks in different collectives (a hang).
    if model is not None and "DEEPSPEED" in str(accelerator.distributed_type).upper():
        accelerator.save_model(model, str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(strategy_state, tmp / STRATEGY)
        if scheduler_state is not None:
            # Saved here rather than through Accelerate's custom objects: those accumulate across tasks.
            torch.save(scheduler_state, tmp / SCHEDULER)
        write_json_atomic(tmp / STATE, state)
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        write_json_atomic(tmp / MANIFEST, {"files": files, "task": task, "step": step, "task_end": task_end})
        if final.exists():  # the same position saved again (e.g. a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(ckpt_root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep every task-end checkpoint and the newest `keep_last` mid-task ones."""
    mids = sorted((r for r in list_checkpoints(ckpt_root) if not r.task_end), key=lambda r: r.order)
    newest_end = max((r.order for r in list_checkpoints(ckpt_root) if r.task_end), default=None)
    for ref in mids[: max(0, len(mids) - keep_last)]:
        shutil.rmtree(ref.path, ignore_errors=True)
    # Mid-task checkpoints older than the newest task end are of no use any more.
    if newest_end is not None:
        for ref in mids:
            if ref.order < newest_end and ref.path.exists():
                shutil.rmtree(ref.path, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[CheckpointRef]:
    refs = []
    if not ckpt_root.is_dir():
        return refs
    for path in ckpt_root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            refs.append(CheckpointRef(path, int(match[1]), int(match[2]), bool(match[3])))
    return sorted(refs, key=lambda r: r.order)


def verify_checkpoint(path: Path) -> None:
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: no {MANIFEST} (half-written checkpoint)")
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest["files"].items():
        file = path / rel
        if not file.exists():
            raise CheckpointError(f"{path}: file {rel} listed in {MANIFEST} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{path}: file {rel} does not match its checksum")


def latest_checkpoint(ckpt_root: Path, log=print) -> CheckpointRef | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for ref in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(ref.path)
        except CheckpointError as err:
            log(f"skipping checkpoint: {err}")
            continue
        return ref
    return None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def read_scheduler_state(path: Path) -> dict[str, Any] | None:
    file = path / SCHEDULER
    return torch.load(file, map_location="cpu", weights_only=False) if file.exists() else None


def read_strategy_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STRATEGY, map_location="cpu", weights_only=False)


def select_task_end(run_dir: str | Path, task: str | int = "latest") -> CheckpointRef:
    """The task-end checkpoint of ``task`` ("latest" = the newest one); CheckpointError naming the run otherwise."""
    run_dir = Path(run_dir)
    ends = [ref for ref in list_checkpoints(run_dir / "checkpoints") if ref.task_end]
    if not ends:
        raise CheckpointError(f"{run_dir}: no task-end checkpoint in {run_dir / 'checkpoints'} "
                              "(has the run finished its first task?)")
    if str(task) == "latest":
        return ends[-1]
    try:
        index = int(task)
    except (TypeError, ValueError):
        raise CheckpointError(f"{run_dir}: --task must be 'latest' or a task index, got {task!r}") from None
    matches = [ref for ref in ends if ref.task == index]
    if not matches:
        raise CheckpointError(f"{run_dir}: no task-end checkpoint for task {index}; "
                              f"finished tasks: {sorted({ref.task for ref in ends})}")
    return matches[-1]


def resolve_task_end(path: str | Path) -> CheckpointRef:
    """A run directory (its newest task end) or one task-end checkpoint directory, verified."""
    path = Path(path)
    if (path / "checkpoints").is_dir() or not path.exists():
        ref = select_task_end(path, "latest")
    else:
        match = _NAME.match(path.name)
        if not match or not match[3]:
            raise CheckpointError(f"{path}: not a run directory nor a task-end checkpoint (taskNNN-stepNNNNNNN-end)")
        ref = CheckpointRef(path, int(match[1]), int(match[2]), True)
    verify_checkpoint(ref.path)
    return ref
