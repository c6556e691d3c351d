"""Multiply-accumulates per image of each inference stage, counted by ``torch.utils.flop_counter``.

Wall-clock ratios between reconstruction modes depend on the machine; the work each stage does does not. The
counts say how much of a reconstruction the mode can change at all (the U-Net calls) and how much every mode pays
once per image (first stage, AMN condition, anomaly maps), hence the best speed-up any implementation of
``one_step`` can reach over ``ddim``-N on a given architecture (Amdahl's law). Only matmuls, convolutions and
attention are counted (what FlopCounterMode knows); element-wise work is left out.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdad_dist.eval.anomaly_map import AnomalyMapConfig, anomaly_maps

def _gmacs(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


@torch.inference_mode()
def stage_gmacs(model, extractor, map_cfg: AnomalyMapConfig, image_size: int, t: int = 300) -> dict[str, float]:
    """GMACs per image: ``encode``, ``condition`` (AMN), ``unet_call`` (one ε prediction), ``decode`` and
    ``maps`` (the extractor on the reference and the reconstruction, the distances, the smoothing)."""
    device = next(model.parameters()).device
    x = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    z = model.encode(x)
    c = model.condition(x)
    return {
        "encode": _gmacs(lambda: model.encode(x)),
        "condition": _gmacs(lambda: model.condition(x)),
        "unet_call": _gmacs(lambda: model.predict_eps(z, torch.full((1,), t, device=device), c)),
        "decode": _gmacs(lambda: model.decode(z)),
        "maps": _gmacs(lambda: anomaly_maps(extractor, x, x, map_cfg)),
    }


def speedup_bounds(gmacs: dict[str, float], ddim_steps: int = 10) -> dict[str, float]:
    """Work ratios ddim-N / one_step: of the denoising alone, of the reconstruction (plus encode, AMN and decode,
    paid once per image by every mode) and end to end (plus the reference decode and the anomaly maps)."""
    u = gmacs["unet_call"]
    recon_shared = gmacs["encode"] + gmacs["condition"] + gmacs["decode"]
    total_shared = recon_shared + gmacs["decode"] + gmacs["maps"]
    return {
        "denoise": float(ddim_steps),
        "reconstruction": (recon_shared + ddim_steps * u) / (recon_shared + u),
        "end_to_end": (total_shared + ddim_steps * u) / (total_shared + u),
    }
