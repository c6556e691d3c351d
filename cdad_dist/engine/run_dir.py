"""The run directory `runs/NAME/`: created once, never silently overwritten, resumed only by the same run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdad_dist.config import RunConfig, config_to_dict, dump_config
from cdad_dist.atomic import write_json_atomic, write_text_atomic
from cdad_dist.errors import CheckpointError

IDENTITY = "run.json"


# Keys that may change when a run is resumed: where things are, how often to log / checkpoint, memory-only
# switches, and the evaluation batch size (each image's noise is its own, so it does not change a score). Every
# other key can change the result, and a --resume that changes one is refused, naming it.
RESUMABLE_KEYS = (
    "name", "output_dir", "tasks",
    "data.root", "data.shards", "data.num_workers",
    "train.checkpoint_every", "train.keep_last", "train.log_every", "train.max_bad_steps", "train.loss_balance_warn",
    "model.gradient_checkpointing", "model.attention_backend",
    "continual.sketch_device", "continual.knn.query_chunk",
    "eval.batch_size", "eval.heatmap_images",
)


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Every config value under its dotted key (``train.lr``), as JSON would store it."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(json.loads(json.dumps(config_to_dict(cfg))), "")
    return out


def run_identity(cfg: RunConfig, tasks: list[list[str]]) -> dict[str, Any]:
    """What must not change between a run and its resumption: the classes of each task and every config value
    that can change a result (all but :data:`RESUMABLE_KEYS`)."""
    config = {k: v for k, v in flat_config(cfg).items() if k not in RESUMABLE_KEYS}
    return {"tasks": tasks, "config": config}


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


_LEGACY = {"model_preset": "model.preset", "strategy": "continual.strategy", "seed": "train.seed"}  # round 1


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One ``key: saved → now`` line per difference (dotted config keys; ``tasks`` for the class sequence)."""
    diffs = []
    if saved.get("tasks") != current.get("tasks"):
        diffs.append(f"tasks: {_show(saved.get('tasks'))} → {_show(current.get('tasks'))}")
    new = current["config"]
    if "config" not in saved:  # a run.json of round 1: only its few plain keys can be compared
        for old_key, key in _LEGACY.items():
            if old_key in saved and saved[old_key] != new.get(key, _MISSING):
                diffs.append(f"{key}: {_show(saved[old_key])} → {_show(new.get(key, _MISSING))}")
        return diffs
    old = saved["config"]
    defaults = flat_config(RunConfig())
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        # A key added to the config after the run was made, now at its default: new keys default to the
        # behaviour before them, so the run behaved that way (a run is resumable across such an upgrade).
        if a is _MISSING and key in defaults and b == defaults[key]:
            continue
        if a != b:
            diffs.append(f"{key}: {_show(a)} → {_show(b)}")
    return diffs


def settings_mismatch(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The result-changing settings in which the run saved in ``run_dir`` differs from ``cfg`` (one
    ``key: saved → now`` line each; empty when they agree), for tools that reuse a finished run by its name: a
    name made from command-line overrides does not see an edited config file."""
    saved = json.loads((run_dir / IDENTITY).read_text())
    return describe_mismatch(saved, run_identity(cfg, saved.get("tasks")))  # the settings, not the task list


def check_reusable(run_dir: Path, cfg: RunConfig, tool: str) -> None:
    """Refuse to reuse a finished run whose settings differ from ``cfg``, naming the keys."""
    diff = settings_mismatch(run_dir, cfg)
    if diff:
        raise CheckpointError(f"{tool}: {run_dir} was trained with other settings ({'; '.join(diff)}); its "
                              f"results would not be this configuration's. Use another --out, or delete it.")


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
                f"{run_dir}: --resume with settings that change the result ({'; '.join(diff)}); resume with the "
                f"run's own settings ({run_dir / 'config.yaml'}) or start a new run (--set name=...). Only "
                f"{', '.join(RESUMABLE_KEYS)} may change on resume. Nothing was changed."
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a cdad-dist run directory; choose another name")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not identity_file.exists():  # a new run; a resumed one keeps its own config.yaml and run.json
            write_json_atomic(identity_file, identity)
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    accelerator.wait_for_everyone()
    return run_dir
