"""The run directory `runs/NAME/`: created once, never silently overwritten, resumed only by the same run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cdad_dist.config import RunConfig, config_to_dict, dump_config
from cdad_dist.atomic import write_json_atomic
from cdad_dist.errors import CheckpointError

IDENTITY = "run.json"


def run_identity(cfg: RunConfig, tasks: list[list[str]]) -> dict[str, Any]:
    """What must not change between a run and its resumption: the model, the sequence and the strategy."""
    as_dict = config_to_dict(cfg)
    model = as_dict["model"]
    continual = as_dict["continual"]
    return {
        "model_preset": cfg.model.preset,
        "model_fingerprint": _fingerprint(model),
        "tasks": tasks,
        "strategy": cfg.continual.strategy,
        "continual_fingerprint": _fingerprint(continual),
        "seed": cfg.train.seed,
    }


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def prepare_run_dir(cfg: RunConfig, tasks: list[list[str]], *, resume: bool, accelerator) -> Path:
    """Check, then create `runs/NAME`. Every rank checks before any rank writes, so that all ranks take the same
    decision (raise, or go on); nothing is written when the directory holds another run."""
    run_dir = cfg.run_dir
    identity = run_identity(cfg, tasks)
    identity_file = run_dir / IDENTITY
    if identity_file.exists():
        saved = json.loads(identity_file.read_text())
        if not resume:
            raise CheckpointError(
                f"{run_dir} already holds a run; pass --resume to continue it, or choose another name "
                f"(--set name=...). Nothing was changed."
            )
        diff = describe_mismatch(saved, identity)
        if diff:
            raise CheckpointError(
                f"{run_dir} holds a different run (differs in: {', '.join(diff)}); its checkpoints cannot be "
                f"resumed with this config. Nothing was changed."
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a cdad-dist run directory; choose another name")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not identity_file.exists():
            write_json_atomic(identity_file, identity)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    accelerator.wait_for_everyone()
    return run_dir
