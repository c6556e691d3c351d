"""``cdad bench basis``: what the end-of-task basis pass costs against plain inference, on 1 and 2 ranks.

The basis pass is ``CDADStrategy.end_task`` as the engine calls it: the capture forward passes (the evaluation's DDIM
trajectory from the start timestep, on each clean image and on its perturbed version, as training shows them:
``continual.capture.perturbed``) with hooks feeding every protected layer's sketch, the reduction across ranks and
the final decompositions. Plain inference is the evaluation's reconstruction of the same clean images with the same
DDIM steps, without hooks. The two alternate ``repeats`` times in the same processes and the median ratio is
reported. With 2 ranks (gloo, spawned), each rank takes half of the images and one core; wall time is the slowest
rank's.

Targets (paper-scale issue): <= 3x on the width-reduced ``sd15`` (1/8 of SD 1.5's channels, same depth and layer
types, 64 px) and <= 5x on ``tiny``, with every layer's basis capturing >= 99.9 % of the energy that the exact
gamma-basis of the same inputs captures (float64 Gram eigenvectors; the worst layer is reported). The perturbed
pass is part of the basis pass, so 2x is its floor.

Layer ownership (its own issue): on 2 ranks each layer's sketch lives on its owner only, so the most loaded rank's
peak sketch memory (owned sketches + one layer's gathered blocks in flight, as the sketches count it) is reported
against the 1-rank figure; target <= 0.6x.

Also reported: the capture with its sketch updates alone (the part that grows with the number of images) against
inference, and the rest (reduction and one decomposition per layer: a fixed cost per task, which dominates for a
small model on a CPU and few images).

Models have random weights (the cost does not depend on the weights' values); images: smooth random colour fields.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cdad_dist.bench.ranks import run_ranks

# Targets of the paper-scale issue: the basis pass against plain inference on the same images and DDIM steps.
TARGETS = {"tiny": 5.0, "sd15": 3.0}
SKETCH_MEMORY_TARGET = 0.6  # per-rank peak sketch bytes on 2 ranks / on 1 rank (layer-ownership issue)
ENERGY_TARGET = 0.999  # captured energy of the computed basis / that of the exact gamma-basis, worst layer


@dataclass
class ModelUnderTest:
    preset: str = "tiny"
    width_multiplier: float = 1.0
    image_size: int | None = None  # None: the preset's

    @property
    def label(self) -> str:
        if self.width_multiplier == 1.0:
            return self.preset
        return f"{self.preset}x{self.width_multiplier:g}@{self.image_size}px"

    @property
    def target(self) -> float:
        return TARGETS[self.preset]


@dataclass
class BasisBenchConfig:
    models: list[ModelUnderTest] = field(default_factory=lambda: [
        ModelUnderTest("tiny"), ModelUnderTest("sd15", width_multiplier=0.125, image_size=64)])
    images: int = 32  # over all ranks
    batch: int = 8
    ddim_steps: int = 10
    start_t: int = 300
    sketch: str = "auto"
    repeats: int = 3
    ranks: list[int] = field(default_factory=lambda: [1, 2])

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelUnderTest) else ModelUnderTest(**m) for m in self.models]

    @classmethod
    def quick(cls) -> BasisBenchConfig:
        return cls(images=16, ddim_steps=5, repeats=2)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)


def _build(model_cfg: dict):
    from cdad_dist.models.presets import ModelConfig, build_model

    options = {"preset": model_cfg["preset"]}
    if model_cfg["width_multiplier"] != 1.0:
        options.update(width_multiplier=model_cfg["width_multiplier"], image_size=model_cfg["image_size"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(**options)).eval()
    return model, model.model_config.image_size  # already resolved by build_model


def _batches(images: torch.Tensor, batch: int) -> list[dict]:
    # "perturbed" as training shows it (a flipped copy stands in for the NSA perturbation: the cost is the same)
    return [{"image": images[i:i + batch], "perturbed": images[i:i + batch].flip(-1)}
            for i in range(0, len(images), batch)]


def _worker(rank: int, world: int, cfg: dict) -> dict:
    from cdad_dist.continual.capture import CaptureConfig, make_capture_forward
    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig
    from cdad_dist.eval.reconstruct import ReconstructionConfig

    model, size = _build(cfg["model"])
    per_rank = cfg["images"] // world
    images = _images(cfg["images"], size, seed=0)[rank * per_rank:(rank + 1) * per_rank]
    batches = _batches(images, cfg["batch"])
    capture = CaptureConfig(images=1.0, ddim_steps=cfg["ddim_steps"])
    recon = ReconstructionConfig(start_t=cfg["start_t"])
    # Plain inference: the evaluation's reconstruction of each image (clean only, no hooks).
    plain = CaptureConfig(images=1.0, ddim_steps=cfg["ddim_steps"], perturbed=False)

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    times: dict[str, list[float]] = {"inference": [], "basis": [], "capture": []}
    details: dict[str, Any] = {}
    strategy = None
    for r in range(cfg["repeats"] + 1):  # round 0 warms up (allocations, lazy init) and is not reported
        forward = make_capture_forward(model, plain, recon)
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
        ownership = probe.capture_owners(layers, world)
        sketches = probe._new_sketches(layers, rank, ownership)
        forward = make_capture_forward(model, capture, recon)
        barrier()
        t0 = time.perf_counter()
        probe._capture(0, model, layers, sketches, batches, forward, rank, world, ownership)
        barrier()
        capture_s = time.perf_counter() - t0
        del sketches
        if r > 0:
            times["inference"].append(inference)
            times["basis"].append(basis)
            times["capture"].append(capture_s)
        details = {"k_total": strategy.history[-1]["k_total"], "digest": strategy.history[-1]["digest"],
                   "sketch_peak_bytes_per_rank": strategy.history[-1]["sketch_peak_bytes_per_rank"],
                   "sketches": sorted({i.get("sketch") for i in strategy.history[-1]["layers"].values()})}
    if world == 1:  # untimed: the computed bases against the exact gamma-bases of the same captured inputs
        details["energy"] = _energy_vs_exact(model, strategy, batches, capture, recon)
    return {"times": times, **details}


def _energy_vs_exact(model, strategy, batches, capture, recon) -> dict[str, Any]:
    """Per layer: energy of the captured inputs inside span(U) of the run's basis, over the energy the exact
    gamma-basis (eigenvectors of the float64 Gram of the same inputs, smallest k reaching gamma) captures."""
    from cdad_dist.continual.capture import make_capture_forward
    from cdad_dist.continual.sketches import rank_for_energy
    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig

    capture = dataclasses.replace(capture, max_columns_per_block=None)  # every column, as the energy reference
    exact = CDADStrategy(ContinualConfig(sketch="gram", capture=capture))
    layers = exact.protected_layers(model)
    sketches = exact._new_sketches(layers, 0)
    exact._capture(0, model, layers, sketches, batches, make_capture_forward(model, capture, recon), 0, 1)
    gamma = strategy.cfg.gamma
    ratios = {}
    for name, sketch in sketches.items():
        G = sketch.gram().to(torch.float64)
        total = float(torch.trace(G))
        if total <= 0:
            continue
        evals = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
        k = rank_for_energy(evals, total, gamma)
        best = float(evals[:k].sum()) / total
        U = strategy.store.basis(name, torch.float64)
        got = float(torch.trace(U.T @ G @ U)) / total
        ratios[name] = got / best if best > 0 else 1.0
    worst = min(ratios, key=ratios.get)
    return {"worst_layer": worst, "worst_ratio": ratios[worst], "mean_ratio": statistics.fmean(ratios.values()),
            "layers": len(ratios)}


def _measure(world: int, cfg: BasisBenchConfig, model: ModelUnderTest) -> dict[str, Any]:
    payload = {**asdict(cfg), "model": asdict(model)}
    reports = run_ranks(_worker, world, payload, what=f"basis bench ({model.label}, {world} ranks)")
    # Barriers around each phase make every rank's time the slowest rank's; take rank 0's.
    t = reports[0]["times"]
    ratios = [b / i for b, i in zip(t["basis"], t["inference"])]
    capture_ratio = statistics.median(c / i for c, i in zip(t["capture"], t["inference"]))
    out = {"ranks": world, "inference_s": statistics.median(t["inference"]), "basis_s": statistics.median(t["basis"]),
           "ratio_runs": ratios, "ratio": statistics.median(ratios), "capture_s": statistics.median(t["capture"]),
           "capture_ratio": capture_ratio,
           "fixed_s": statistics.median(b - c for b, c in zip(t["basis"], t["capture"])),
           "k_total": reports[0]["k_total"],
           # each layer's sketch lives on its owner (layer ownership): the most loaded rank's peak
           "sketch_peak_bytes_per_rank": reports[0]["sketch_peak_bytes_per_rank"],
           "sketch_peak_bytes_max_rank": max(reports[0]["sketch_peak_bytes_per_rank"]),
           "sketches": reports[0]["sketches"], "bases_identical_on_ranks": len({r["digest"] for r in reports}) == 1}
    if "energy" in reports[0]:
        out["energy"] = reports[0]["energy"]
    return out


def model_line(label: str, result: dict[str, Any]) -> str:
    parts = []
    for key, m in result["by_ranks"].items():
        parts.append(f"{key}: basis pass {m['basis_s']:.2f} s = {m['ratio']:.2f}x inference ({m['inference_s']:.2f} s); "
                     f"capture + sketch updates {m['capture_ratio']:.2f}x inference, reduction + decompositions "
                     f"{m['fixed_s']:.2f} s")
    line = f"{label}: " + "; ".join(parts)
    if "speedup_2_vs_1_rank" in result:
        line += f"; 2 ranks {result['speedup_2_vs_1_rank']:.2f}x faster than 1"
    if "sketch_memory_2_vs_1_rank" in result:
        peaks = ", ".join(f"{key} {m['sketch_peak_bytes_max_rank'] / 2**20:.1f} MiB"
                          for key, m in result["by_ranks"].items())
        line += (f"; peak sketch memory per rank {peaks} = {result['sketch_memory_2_vs_1_rank']:.2f}x (target <= "
                 f"{SKETCH_MEMORY_TARGET:g}x: {'MET' if result['sketch_memory_met'] else 'NOT MET'})")
    energy = result.get("energy")
    if energy:
        line += (f"; energy vs exact gamma-basis: worst layer {100 * energy['worst_ratio']:.3f}% "
                 f"({energy['worst_layer']}), mean {100 * energy['mean_ratio']:.3f}%")
    target = result["target_ratio"]
    return line + f" (target <= {target:g}x and >= {100 * ENERGY_TARGET:g}% energy: " \
                  f"{'MET' if result['met'] else 'NOT MET'})"


def summary_line(result: dict[str, Any]) -> str:
    return "basis: " + " | ".join(model_line(label, r) for label, r in result["models"].items())


def measure_model(cfg: BasisBenchConfig, model: ModelUnderTest) -> dict[str, Any]:
    by_ranks = {f"{w}rank": _measure(w, cfg, model) for w in cfg.ranks}
    result: dict[str, Any] = {"by_ranks": by_ranks, "target_ratio": model.target}
    energy = next((m.pop("energy") for m in by_ranks.values() if "energy" in m), None)
    if energy:
        result["energy"] = energy
    if "1rank" in by_ranks and "2rank" in by_ranks:
        result["speedup_2_vs_1_rank"] = by_ranks["1rank"]["basis_s"] / by_ranks["2rank"]["basis_s"]
        result["sketch_memory_2_vs_1_rank"] = (by_ranks["2rank"]["sketch_peak_bytes_max_rank"]
                                               / by_ranks["1rank"]["sketch_peak_bytes_max_rank"])
        result["sketch_memory_met"] = result["sketch_memory_2_vs_1_rank"] <= SKETCH_MEMORY_TARGET
    result["met"] = judge(result)
    return result


def judge(result: dict[str, Any]) -> bool:
    ratio_ok = all(m["ratio"] <= result["target_ratio"] for m in result["by_ranks"].values())
    energy = result.get("energy")
    return ratio_ok and (energy is None or energy["worst_ratio"] >= ENERGY_TARGET)


def run(quick: bool, out_dir=None, *, cfg: BasisBenchConfig | None = None, log=print) -> dict[str, Any]:
    cfg = cfg or (BasisBenchConfig.quick() if quick else BasisBenchConfig())
    models = {}
    for model in cfg.models:
        models[model.label] = measure_model(cfg, model)
        log(model_line(model.label, models[model.label]))
    result: dict[str, Any] = {"config": asdict(cfg), "models": models, "energy_target": ENERGY_TARGET,
                              "load_average": os.getloadavg(), "met": all(m["met"] for m in models.values())}
    result["summary"] = summary_line(result)
    return result
