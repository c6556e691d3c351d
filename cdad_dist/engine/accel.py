"""Building the `Accelerator` so that the same code runs on 1..N CPU processes (gloo) and on GPUs (NCCL).

Two traps found on CPU machines (checked):
- `accelerate launch --cpu --num_processes 2` starts ONE process. The working recipe is
  `accelerate launch --multi_gpu --num_processes 2` plus `Accelerator(cpu=True)` when CUDA is absent, which gives
  `MULTI_CPU` over gloo (`launch/cpu-2proc.yaml`). Without `cpu=True` every rank silently trains alone.
- Under DeepSpeed, `cpu=True` silently drops the DeepSpeed plugin, so it is never set there; the process group
  then needs `backend="gloo"` explicitly on CPU.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from cdad_dist.errors import ConfigError


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
