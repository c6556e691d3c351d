"""Building the `Accelerator` so that the same code runs on 1..N CPU processes (gloo) and on GPUs (NCCL).

Two traps found on CPU machines (checked):
- `accelerate launch --cpu --num_processes 2` starts ONE process. The working recipe is
  `accelerate launch --multi_gpu --num_processes 2` plus `Accelerator(cpu=True)` when CUDA is absent, which gives
  `MULTI_CPU` over gloo (`launch/cpu-2proc.yaml`). Without `cpu=True` every rank silently trains alone.
- Under DeepSpeed, `cpu=True` silently drops the DeepSpeed plugin, so it is never set there; the process group
  then needs `backend="gloo"` explicitly on CPU.

DeepSpeed (ZeRO-1/2, `launch/deepspeed-zero2.yaml`): the engine is built per task by `prepare`; the "auto" entries
of the JSON that Accelerate cannot infer without a DataLoader are filled from the run config by
`fill_deepspeed_config`, so one JSON serves every experiment.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from cdad_dist.errors import ConfigError

# ZeRO stages cdad-dist supports: module parameters stay whole on every rank, which the continual projection and
# the basis capture need. Stage 3 shards them.
SUPPORTED_ZERO_STAGES = (0, 1, 2)


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def use_all_cpu_cores() -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 for every process, which halves CPU training speed on a
    2-core machine with one process. On CPU, give each local process its share of the cores instead
    (CDAD_NUM_THREADS overrides)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    wanted = os.environ.get("CDAD_NUM_THREADS")
    threads = int(wanted) if wanted else max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)


def make_accelerator(
    *,
    mixed_precision: str | None,
    grad_accum: int,
    project_dir: str,
    log_with: str | None = "tensorboard",
    timeout_s: int = 600,
) -> Accelerator:
    """Create the run's Accelerator; fail loudly when a multi-process launch collapsed to one process."""
    has_cuda = torch.cuda.is_available()
    deepspeed = _uses_deepspeed()
    mixed_precision = None if mixed_precision == "auto" else mixed_precision
    if mixed_precision == "fp16" and not has_cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use 'no' (fp32) on CPU")
    kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if _launched_world_size() > 1:
        # A dead rank must not hang the others forever: collectives time out with a clear error. (Passing a
        # backend in a single-process run would make Accelerate look for a process group that does not exist.)
        kwargs_handlers.append(
            InitProcessGroupKwargs(backend=None if has_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        )
    accelerator = Accelerator(
        cpu=not has_cuda and not deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "logs")),
        kwargs_handlers=kwargs_handlers,
    )
    if not has_cuda:
        use_all_cpu_cores()
    launched = _launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"WORLD_SIZE={launched} but Accelerate reports {accelerator.num_processes} process(es): every rank "
            "would train alone on all the data. On CPU launch with `accelerate launch --config_file "
            "launch/cpu-2proc.yaml` (i.e. --multi_gpu --num_processes N), not `--cpu`."
        )
    return accelerator


def deepspeed_plugin(accelerator: Accelerator | None):
    """The active DeepSpeed plugin, or None when the run does not use DeepSpeed."""
    if "DEEPSPEED" not in str(getattr(accelerator, "distributed_type", "")).upper():  # also None: no accelerator
        return None
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator: Accelerator | None) -> int | None:
    """The DeepSpeed ZeRO stage of the run, or None when it does not use DeepSpeed."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_config(accelerator: Accelerator, *, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the JSON's "auto" batch size and clipping from the run config (no-op without DeepSpeed), and refuse
    ZeRO-3. Under DeepSpeed the engine clips inside `backward`; `train.max_grad_norm` reaches it through here."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    stage = zero_stage(accelerator)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported: it shards the module's weights, which "
                          "the continual projection and basis capture need whole; use launch/deepspeed/zero2.json "
                          "(stage 2) or zero1.json")
    fills = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_clipping": float(max_grad_norm)}
    for key, value in fills.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size") == "auto":
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * accelerator.num_processes
                                      * accelerator.gradient_accumulation_steps)


def describe_backend(accelerator: Accelerator):
    """The ``Backend`` a strategy sees (continual/ never imports the engine or Accelerate)."""
    from cdad_dist.continual.protocol import Backend

    kind = str(getattr(accelerator, "distributed_type", "NO") or "NO")
    return Backend(distributed=kind.rsplit(".", 1)[-1].upper(), zero_stage=zero_stage(accelerator),
                   world=int(accelerator.num_processes), rank=int(accelerator.process_index),
                   device=str(accelerator.device))
