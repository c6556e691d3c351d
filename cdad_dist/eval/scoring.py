"""One scored batch: reconstruct, first-stage round trip, anomaly maps and image scores (timed by stage).

The evaluator, `cdad predict` and `cdad bench inference` all score images through `score_batch`, so the numbers
they report come from the same code.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from cdad_dist.errors import ConfigError
from cdad_dist.eval.anomaly_map import anomaly_maps, image_scores
from cdad_dist.eval.head_maps import fuse
from cdad_dist.eval.reconstruct import Noise, image_generators, reconstruct_latent

if TYPE_CHECKING:
    from cdad_dist.config import EvalConfig


@dataclass
class ScoredBatch:
    x_hat: torch.Tensor      # B×3×H×W reconstruction
    maps: torch.Tensor       # B×1×H×W anomaly maps
    scores: torch.Tensor     # B image scores
    recon_s: float           # wall time of the reconstruction x → x̂ (encode, AMN, denoising, decode)
    map_s: float             # wall time of the reference D(E(x)) decode and the anomaly maps
    denoise_s: float         # the part of recon_s the reconstruction mode does: noising, U-Net calls, updates
    head_s: float = 0.0      # wall time of the segmentation head's forward (0 without a head)
    # every map kind the model can give ("features", and with a head "head" and "fused") and its image scores;
    # ``maps`` / ``scores`` are those of eval.map
    maps_by_kind: dict[str, torch.Tensor] | None = None
    scores_by_kind: dict[str, torch.Tensor] | None = None


__all__ = ["ScoredBatch", "image_generators", "score_batch", "score_with"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def score_batch(model, extractor, x: torch.Tensor, eval_cfg: EvalConfig, generator: Noise | None = None,
                autocast: Callable[[], ContextManager] | None = None) -> ScoredBatch:
    """What the evaluator does per batch: x̂ = D(denoise(E(x), AMN(x))), maps of φ(D(E(x))) vs φ(x̂), scores.

    E(x) is computed once and serves both the reconstruction and the reference D(E(x)) (with the SD 1.5 VAE at
    256 px an encoder pass costs ~1.6 U-Net calls). ``autocast`` (e.g. ``accelerator.autocast``) gives the
    diffusion model the run's compute dtype (needed when the weights themselves are bf16/fp16, as under
    DeepSpeed); the anomaly maps are computed in float32. Stages are timed with ``perf_counter`` (synchronising
    CUDA first) so benchmarks use this very function. ``generator``: one per image (default
    ``image_generators(reconstruction seed, x)``: an image's score does not depend on its batch).
    """
    if generator is None:
        generator = image_generators(eval_cfg.reconstruction.seed, x)
    compute = autocast or contextlib.nullcontext
    clock = _StageClock(x.device)
    with compute():
        z = model.encode(x)
        c = model.condition(x)
        clock.lap("prepare")
        # K = reconstruction.samples draws, each the next noise of every image's generator (K=1: one draw)
        z_hats = [reconstruct_latent(model, z, c, eval_cfg.reconstruction, generator=generator)
                  for _ in range(eval_cfg.reconstruction.samples)]
        clock.lap("denoise")
        x_hats = [model.decode(z_k).float() for z_k in z_hats]
        clock.lap("decode")
        x_ref = model.decode(z).float()
    z_hat, x_hat = z_hats[0], x_hats[0]  # the first draw is the one shown, its PSNR measured, the head fed
    maps, scores = anomaly_maps(extractor, x_ref, x_hats, eval_cfg.anomaly_map)
    clock.lap("maps")
    by_kind, score_by_kind = {"features": maps}, {"features": scores}
    head = getattr(model, "seg_head", None)
    if head is not None:
        with compute():
            head_map = model.head_map(x, z, z_hat, x_hat)  # x̂ already decoded above
        clock.lap("head")
        hs = eval_cfg.head_scoring
        by_kind["head"] = head_map
        by_kind["fused"] = fuse(maps, head_map, head.map_scale)
        for kind in ("head", "fused"):
            score_by_kind[kind] = image_scores(by_kind[kind], hs.score, hs.topk)
    kind = getattr(eval_cfg, "map", "features")
    if kind not in by_kind:
        raise ConfigError(f"eval.map={kind!r} needs a segmentation head (model.seg_head.enabled: true)")
    s = clock.seconds
    return ScoredBatch(x_hat, by_kind[kind], score_by_kind[kind], recon_s=s["prepare"] + s["denoise"] + s["decode"],
                       map_s=s["maps"], denoise_s=s["denoise"], head_s=s.get("head", 0.0), maps_by_kind=by_kind,
                       scores_by_kind=score_by_kind)


def score_with(scorer: Callable | None, model, extractor, x: torch.Tensor, eval_cfg: EvalConfig,
               generator: Noise | None = None, autocast: Callable[[], ContextManager] | None = None) -> ScoredBatch:
    """A strategy's own scores (``ContinualStrategy.score_batch``, e.g. knn's banks) when it gives them, else the
    reconstruction's (:func:`score_batch`); the evaluator and ``cdad predict`` both score through here."""
    if generator is None:
        generator = image_generators(eval_cfg.reconstruction.seed, x)
    scored = scorer(model, extractor, x, eval_cfg, generator, autocast) if scorer is not None else None
    return scored if scored is not None else score_batch(model, extractor, x, eval_cfg, generator, autocast=autocast)


class _StageClock:
    """Wall time between successive ``lap`` calls, CUDA synchronised at each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        _sync(device)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now
