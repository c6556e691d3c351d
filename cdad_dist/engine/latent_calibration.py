"""Latent scaling of a pixel-space first stage, estimated once on the first task's training images.

Why here and not in the model: the statistics are a property of the data, summed over every rank's share of the
task's training images (float64 sums, one all-reduce), so 1 and N ranks calibrate alike; the result is written
into the first stage's buffers and from then on travels with the weights (checkpoints, `--resume`, `init_from`,
`cdad predict`). A first stage without `set_latent_stats` (SD's VAE has its own `scaling_factor`) is left alone.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


def needs_calibration(model, mode: str) -> bool:
    stage = model.first_stage
    return mode == "data" and hasattr(stage, "set_latent_stats") and not stage.calibrated


@torch.no_grad()
def calibrate_latents(model, batches: Iterable[dict], accelerator, log=print) -> tuple[float, float]:
    """Set the first stage's shift/scale so that its latents have zero mean and unit variance on `batches`."""
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        v = batch["image"].double() * 2 - 1
        sums += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()])
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    n, s1, s2 = (float(x) for x in sums)
    if n == 0:
        raise RuntimeError("latent calibration: the first task has no training images")
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 0.0))
    model.first_stage.set_latent_stats(mean, std)
    log(f"latent scaling from {int(n) // 3} pixel(s) of the first task: shift {mean:.4f}, scale {1 / std:.4f} "
        f"(pixel std {std:.4f} in 2x-1 units)")
    return mean, std
