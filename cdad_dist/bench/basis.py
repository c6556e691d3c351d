"""``cdad bench basis``: what the end-of-task basis pass costs against plain inference, on 1 and 2 ranks.

The basis pass is ``CDADStrategy.end_task`` as the engine calls it: the capture forward passes (the evaluation's DDIM
trajectory from the start timestep) with hooks feeding every protected layer's sketch, the reduction across ranks
and the final decompositions. Plain inference is the same forward passes over the same images without hooks. The
two alternate ``repeats`` times in the same processes and the median ratio is reported (target ≤ 1.5×). With 2
ranks (gloo, spawned), each rank takes half of the images and one core; wall time is the slowest rank's.

Also reported: the capture with its sketch updates alone (the part that grows with the number of images) against
inference, and the rest (reduction and one decomposition per layer: a fixed cost per task, which dominates for a
small model on a CPU and few images).

Model: the ``tiny`` preset with random weights (the cost does not depend on the weights' values); images: smooth
random colour fields at the preset's size.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cdad_dist.bench.ranks import run_ranks

TARGET_RATIO = 1.5


@dataclass
class BasisBenchConfig:
    preset: str = "tiny"
    images: int = 32  # over all ranks
    batch: int = 8
    ddim_steps: int = 10
    start_t: int = 300
    sketch: str = "auto"
    repeats: int = 3
    ranks: list[int] = field(default_factory=lambda: [1, 2])

    @classmethod
    def quick(cls) -> BasisBenchConfig:
        return cls(images=16, ddim_steps=5, repeats=2)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)


def _worker(rank: int, world: int, cfg: dict) -> dict:
    from cdad_dist.continual.capture import CaptureConfig, make_capture_forward
    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig
    from cdad_dist.eval.reconstruct import ReconstructionConfig
    from cdad_dist.models.presets import ModelConfig, build_model, resolve_config

    model = build_model(ModelConfig(preset=cfg["preset"])).eval()
    size = resolve_config(model.model_config).image_size
    per_rank = cfg["images"] // world
    images = _images(cfg["images"], size, seed=0)[rank * per_rank:(rank + 1) * per_rank]
    batches = [{"image": images[i:i + cfg["batch"]]} for i in range(0, len(images), cfg["batch"])]
    capture = CaptureConfig(images=1.0, ddim_steps=cfg["ddim_steps"])
    recon = ReconstructionConfig(start_t=cfg["start_t"])

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    times: dict[str, list[float]] = {"inference": [], "basis": [], "capture": []}
    details: dict[str, Any] = {}
    for r in range(cfg["repeats"] + 1):  # round 0 warms up (allocations, lazy init) and is not reported
        forward = make_capture_forward(model, capture, recon)
        barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                forward(batch)
        barrier()
        inference = time.perf_counter() - t0
        strategy = CDADStrategy(ContinualConfig(sketch=cfg["sketch"], capture=capture))
        forward = make_capture_forward(model, capture, recon)
        barrier()
        t0 = time.perf_counter()
        strategy.end_task(0, model, batches, forward)
        barrier()
        basis = time.perf_counter() - t0
        # The same capture alone (hooks + sketch updates, no reduction or decomposition): the part that grows
        # with the number of images; the rest is a fixed cost per task and layer.
        probe = CDADStrategy(ContinualConfig(sketch=cfg["sketch"], capture=capture))
        layers = probe.protected_layers(model)
        sketches = probe._new_sketches(layers, rank)
        forward = make_capture_forward(model, capture, recon)
        barrier()
        t0 = time.perf_counter()
        probe._capture(0, model, layers, sketches, batches, forward, rank, world)
        barrier()
        capture_s = time.perf_counter() - t0
        del sketches
        if r > 0:
            times["inference"].append(inference)
            times["basis"].append(basis)
            times["capture"].append(capture_s)
        details = {"k_total": strategy.history[-1]["k_total"], "digest": strategy.history[-1]["digest"],
                   "sketches": sorted({i.get("sketch") for i in strategy.history[-1]["layers"].values()})}
    return {"times": times, **details}


def _measure(world: int, cfg: BasisBenchConfig) -> dict[str, Any]:
    reports = run_ranks(_worker, world, asdict(cfg), what=f"basis bench ({world} ranks)")
    # Barriers around each phase make every rank's time the slowest rank's; take rank 0's.
    t = reports[0]["times"]
    ratios = [b / i for b, i in zip(t["basis"], t["inference"])]
    capture_ratio = statistics.median(c / i for c, i in zip(t["capture"], t["inference"]))
    return {"ranks": world, "inference_s": statistics.median(t["inference"]), "basis_s": statistics.median(t["basis"]),
            "ratio_runs": ratios, "ratio": statistics.median(ratios), "capture_s": statistics.median(t["capture"]),
            "capture_ratio": capture_ratio,
            "fixed_s": statistics.median(b - c for b, c in zip(t["basis"], t["capture"])),
            "k_total": reports[0]["k_total"],
            "sketches": reports[0]["sketches"], "bases_identical_on_ranks": len({r["digest"] for r in reports}) == 1}


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for key, m in result["by_ranks"].items():
        parts.append(f"{key}: basis pass {m['basis_s']:.2f} s = {m['ratio']:.2f}x inference ({m['inference_s']:.2f} s); "
                     f"capture + sketch updates {m['capture_ratio']:.2f}x inference, reduction + decompositions "
                     f"{m['fixed_s']:.2f} s")
    line = "basis: " + "; ".join(parts)
    if "speedup_2_vs_1_rank" in result:
        line += f"; 2 ranks {result['speedup_2_vs_1_rank']:.2f}x faster than 1"
    worst = max(m["ratio"] for m in result["by_ranks"].values())
    return line + f" (target <= {TARGET_RATIO}x: {'MET' if worst <= TARGET_RATIO else 'NOT MET'})"


def run(quick: bool, out_dir=None, *, cfg: BasisBenchConfig | None = None, log=print) -> dict[str, Any]:
    cfg = cfg or (BasisBenchConfig.quick() if quick else BasisBenchConfig())
    by_ranks = {f"{w}rank": _measure(w, cfg) for w in cfg.ranks}
    result: dict[str, Any] = {"config": asdict(cfg), "by_ranks": by_ranks, "target_ratio": TARGET_RATIO,
                              "load_average": os.getloadavg()}
    if "1rank" in by_ranks and "2rank" in by_ranks:
        result["speedup_2_vs_1_rank"] = by_ranks["1rank"]["basis_s"] / by_ranks["2rank"]["basis_s"]
    result["met"] = all(m["ratio"] <= TARGET_RATIO for m in by_ranks.values())
    result["summary"] = summary_line(result)
    log(result["summary"])
    return result
