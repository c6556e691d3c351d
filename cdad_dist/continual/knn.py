"""``knn``: the training-free nearest-neighbour baseline (PatchCore without its coreset by default).

What users compare a continual detector against (anomalib's PatchCore): every training patch's feature goes into a
per-class memory bank; a test patch's score is its distance to the nearest bank patch over all classes seen so far
(one detector for every class, like the diffusion model); the image score is the map's max. It never forgets (old
banks are never touched) and needs no training; its cost is memory that grows with every class, reported in bytes
per class. An optional greedy coreset (PatchCore's k-center selection) keeps a fraction of each bank.

Features: the frozen extractor of the anomaly maps (EfficientNet-Lite0 by default), its stride-4 and stride-8
layers, each averaged over a 3×3 neighbourhood (PatchCore's local aggregation), the stride-8 one upsampled to the
stride-4 grid and concatenated.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from cdad_dist.continual.config import KnnConfig  # noqa: F401  (re-exported)
from cdad_dist.continual.protocol import STATE_FORMAT, CapturePlan, ContinualStrategy, check_strategy_state
from cdad_dist.errors import ConfigError

KNN_LAYERS = {"efficientnet_lite0": ("stage1", "stage2"), "resnet50": ("layer2", "layer3"),
              "wide_resnet50_2": ("layer2", "layer3")}


def patch_features(extractor, x: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """B×C×h×w locally aggregated patch features on the stride-4 grid of the extractor's input."""
    layers = KNN_LAYERS.get(getattr(extractor, "name", ""))
    if layers is None:
        raise ConfigError(f"knn: no patch layers known for extractor {getattr(extractor, 'name', extractor)!r}")
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x.float(), size=(input_size, input_size), mode="bilinear", align_corners=False,
                          antialias=True)
    feats = extractor._features((x.float() - extractor.mean) / extractor.std, set(layers))
    maps = [F.avg_pool2d(feats[name].float(), 3, stride=1, padding=1, count_include_pad=False) for name in layers]
    size = maps[0].shape[-2:]
    maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
    return torch.cat(maps, 1)


def greedy_coreset(bank: torch.Tensor, fraction: float, dim: int, seed: int = 0) -> torch.Tensor:
    """Indices of a k-center greedy coreset (k = ceil(fraction·N)), chosen in a seeded random projection."""
    n = bank.shape[0]
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    proj = bank.float() @ torch.randn(bank.shape[1], min(dim, bank.shape[1]), generator=g) if dim < bank.shape[1] \
        else bank.float()
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = 0  # deterministic start: the bank's order is deterministic (sorted by image key)
    nearest = torch.cdist(proj, proj[:1]).squeeze(1)
    for i in range(1, k):
        chosen[i] = int(torch.argmax(nearest))
        nearest = torch.minimum(nearest, torch.cdist(proj, proj[chosen[i]: chosen[i] + 1]).squeeze(1))
    return chosen


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row (blocked over queries)."""
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    for i in range(0, queries.shape[0], chunk):
        q = queries[i: i + chunk].float()
        out[i: i + chunk] = torch.cdist(q, bank.float()).amin(1).cpu()
    return out


def bank_bytes(banks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {cls: int(b.numel() * b.element_size()) for cls, b in banks.items()}


def summarize(banks: dict[str, torch.Tensor]) -> dict[str, Any]:
    sizes = bank_bytes(banks)
    return {"bank_bytes_per_class": sizes, "bank_bytes_total": sum(sizes.values()),
            "bank_patches_per_class": {cls: int(b.shape[0]) for cls, b in banks.items()}}


# ---------------------------------------------------------------------------------------------------- strategy
def _gather(obj):
    """Every rank's object, in rank order (a list of one when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class KnnStrategy(ContinualStrategy):
    """Memory banks instead of training: the engine trains 0 steps and scores with the banks."""

    name = "knn"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.knn: KnnConfig = cfg.knn
        self.banks: dict[str, torch.Tensor] = {}

    def task_steps(self, task_index: int, sequence_steps: list[int]) -> int:
        return 0

    def capture_plan(self, task_index: int) -> CapturePlan:
        return CapturePlan(images=1.0, perturbed=False)  # every training image goes into the bank

    @torch.no_grad()
    def end_task(self, task_index, model, capture_batches, capture_forward) -> None:
        extractor = self.context.extractor
        if extractor is None:
            raise ConfigError("knn: the engine did not bind a feature extractor before end_task")
        rows: list[tuple[str, str, torch.Tensor]] = []
        device = next(extractor.buffers()).device
        for batch in capture_batches:
            feats = patch_features(extractor, batch["image"].to(device), self.knn.input_size)
            flat = feats.permute(0, 2, 3, 1).reshape(feats.shape[0], -1, feats.shape[1]).cpu()
            rows += [(k, c, f) for k, c, f in zip(batch["key"], batch["cls"], flat)]
        every = sorted((r for part in _gather(rows) for r in part), key=lambda r: (r[1], r[0]))
        for cls in sorted({c for _, c, _ in every}):
            bank = torch.cat([f for _, c, f in every if c == cls])
            if self.knn.coreset < 1.0:
                bank = bank[greedy_coreset(bank, self.knn.coreset, self.knn.coreset_dim, seed=task_index)]
            self.banks[cls] = bank.contiguous()

    @torch.no_grad()
    def score_batch(self, model, extractor, x, eval_cfg, generator, autocast=None):
        from cdad_dist.eval.anomaly_map import gaussian_blur
        from cdad_dist.eval.scoring import ScoredBatch

        if not self.banks:
            raise ConfigError("knn: no memory bank yet (score after the first task's end)")
        feats = patch_features(self.context.extractor, x, self.knn.input_size)
        b, c, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
        bank = torch.cat(list(self.banks.values())).to(queries.device)
        dist = nearest_distance(queries, bank, self.knn.query_chunk).reshape(b, 1, h, w)
        maps = F.interpolate(dist, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.knn.sigma)
        return ScoredBatch(x_hat=x.float(), maps=maps, scores=maps.flatten(1).amax(1), recon_s=0.0, map_s=0.0,
                           denoise_s=0.0)

    def summary(self) -> dict[str, Any]:
        return summarize(self.banks)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "name": self.name, "banks": dict(self.banks)}

    def load_state_dict(self, state: dict) -> None:
        check_strategy_state(state, self.name)
        self.banks = dict(state.get("banks", {}))
