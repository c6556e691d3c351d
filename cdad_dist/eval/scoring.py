"""One scored batch: reconstruct, first-stage round trip, anomaly maps and image scores (timed).

The evaluator, `cdad predict` and `cdad bench inference` all score images through `score_batch`, so the numbers
they report come from the same code.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from cdad_dist.eval.anomaly_map import anomaly_maps
from cdad_dist.eval.reconstruct import reconstruct, vae_roundtrip

if TYPE_CHECKING:
    from cdad_dist.config import EvalConfig


@dataclass
class ScoredBatch:
    x_hat: torch.Tensor      # B×3×H×W reconstruction
    maps: torch.Tensor       # B×1×H×W anomaly maps
    scores: torch.Tensor     # B image scores
    recon_s: float           # wall time of the reconstruction (encode, AMN, U-Net calls, decode)
    map_s: float             # wall time of the first-stage round trip and the anomaly maps


def batch_generator(seed: int, index: int) -> torch.Generator:
    """Noise of batch ``index``: a CPU generator, so the same seed gives the same noise on any device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def score_batch(model, extractor, x: torch.Tensor, eval_cfg: EvalConfig, generator: torch.Generator,
                autocast: Callable[[], ContextManager] | None = None) -> ScoredBatch:
    """What the evaluator does per batch: x̂ = reconstruct(x), maps of φ(D(E(x))) vs φ(x̂), image scores.

    ``autocast`` (e.g. ``accelerator.autocast``) gives the diffusion model the run's compute dtype (needed when
    the weights themselves are bf16/fp16, as under DeepSpeed); the anomaly maps are computed in float32.
    Both stages are timed with ``perf_counter`` (synchronising CUDA first) so benchmarks use this very function.
    """
    compute = autocast or contextlib.nullcontext
    _sync(x.device)
    t0 = time.perf_counter()
    with compute():
        x_hat = reconstruct(model, x, eval_cfg.reconstruction, generator=generator).float()
    _sync(x.device)
    t1 = time.perf_counter()
    with compute():
        x_ref = vae_roundtrip(model, x)
    maps, scores = anomaly_maps(extractor, x_ref.float(), x_hat.float(), eval_cfg.anomaly_map)
    _sync(x.device)
    t2 = time.perf_counter()
    return ScoredBatch(x_hat, maps, scores, t1 - t0, t2 - t1)
