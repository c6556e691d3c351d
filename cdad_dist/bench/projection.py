"""``cdad bench projection``: what keeping protected updates orthogonal costs and what it buys, on a real model.

One model (preset ``tiny`` by default, random init) plays task 0: its protected-layer inputs are captured along
the DDIM trajectory of the task-0 images and turned into bases (``CDADStrategy.end_task``). Copies of it then
train on task-1 images with AdamW + weight decay under three strategies: ``naive`` (no projection), ``update``
(the default projection of the optimizer's update) and ``grad`` (the paper's gradient projection).

Timing is built to survive a shared machine: the three copies take turns in short blocks of steps (the order
rotating per block), and the overhead is the median over blocks of the per-block ratio ``update / naive``, so a
load change hits both sides of a ratio alike. Wall-clock and process-CPU time are both reported; the load average
is printed so a reader can tell when the machine was busy; the ratio of the fastest steps is a second estimate of
the quiet-machine ratio. The issue's target is a wall-clock step ratio ≤ 1.10 for ``update`` on the tiny preset
(batch 8, 64 px, 2 CPU threads). Note that a cdad step also differs from a naive one outside the projection (the
unprotected parameters and the k = d layers are frozen, so backward and AdamW do a little less), so the
projection's own time is printed too, as a share of a naive step.

Also reported per strategy: the largest leak ‖ΔW·U‖/‖ΔW‖ over the protected layers and the drift of the task-0
DDIM reconstruction (relative L2 change of the final latent, same noise); plus the basis store's size (stored
in its smaller form, U or its complement) against the protected weights and the capture time.

AMN drift on perturbed inputs: the AMN trains on NSA-perturbed images, so the capture also passes each image's
perturbed version (``continual.capture.perturbed``). To show what that protects, two more copies train on task 1
under the update projection with bases captured on clean images only vs clean + perturbed, and the relative change
of the AMN's output (the condition) on the task-0 images' perturbed versions is reported against naive.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cdad_dist.continual.capture import CaptureConfig, make_capture_forward
from cdad_dist.continual.layers import protected_weight_bytes
from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig, NaiveStrategy

MODES = ("naive", "update", "grad")


@dataclass
class ProjectionBenchConfig:
    preset: str = "tiny"
    n_old: int = 8
    n_new: int = 16
    batch: int = 8
    warmup_steps: int = 2  # per strategy, untimed (first steps allocate; update mode takes its anchor)
    repeats: int = 7  # timed blocks per strategy; the ratio is the median over blocks
    steps_per_repeat: int = 3
    threads: int = 2  # torch intra-op threads during the benchmark (restored afterwards)
    lr: float = 1e-4
    weight_decay: float = 0.01
    ddim_steps: int = 5
    seed: int = 0
    target_ratio: float = 1.10
    drift_steps: int = 20  # task-1 steps of the AMN-drift copies (untimed)

    @classmethod
    def quick(cls) -> ProjectionBenchConfig:
        return cls(n_old=4, n_new=8, warmup_steps=1, repeats=3, steps_per_repeat=2, ddim_steps=3, drift_steps=6)


def _images(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    """Task 0: smooth colour fields; task 1: fine textures — two visibly different input distributions."""
    g = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
    return torch.rand(n, 3, size, size, generator=g)


def _perturbed(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image with NSA patches from the next image of the set (as training perturbs it)."""
    import numpy as np

    from cdad_dist.data.perturb import NSAConfig, NSAPerturber

    perturber = NSAPerturber(NSAConfig(probability=1.0))
    rng = np.random.default_rng(seed)
    as_uint8 = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    out = [perturber(as_uint8[i], as_uint8[(i + 1) % len(as_uint8)], rng)[0] for i in range(len(as_uint8))]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _batches(images: torch.Tensor, size: int, perturbed: torch.Tensor | None = None) -> list[dict]:
    batches = []
    for i in range(0, len(images), size):
        batch = {"image": images[i:i + size], "key": [str(i + j) for j in range(len(images[i:i + size]))]}
        if perturbed is not None:
            batch["perturbed"] = perturbed[i:i + size]
        batches.append(batch)
    return batches


@torch.no_grad()
def _reconstruct(model, images: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Final DDIM latent from the first DDIM timestep with fixed noise (the test-time reconstruction path)."""
    from cdad_dist.eval.reconstruct import ReconstructionConfig, reconstruct_latent

    was_training = model.training
    model.eval()
    z = reconstruct_latent(model, model.encode(images), model.condition(images),
                           ReconstructionConfig(steps=steps), torch.Generator().manual_seed(seed))
    model.train(was_training)
    return z


class _Trainee:
    """One model copy with its strategy and AdamW, stepping on task-1 images with its own generator."""

    def __init__(self, model, strategy, cfg: ProjectionBenchConfig, images: torch.Tensor,
                 perturbed: torch.Tensor) -> None:
        self.model, self.strategy, self.images, self.perturbed, self.cfg = model, strategy, images, perturbed, cfg
        groups = strategy.optimizer_param_groups(model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    def step(self) -> tuple[float, float, float]:
        """One optimizer step (forward, backward, step, projection): (wall s, process-CPU s, projection wall s)."""
        g = self.generator
        index = torch.randint(0, len(self.images), (self.cfg.batch,), generator=g)
        x, x_tilde = self.images[index], self.perturbed[index]
        wall, cpu = time.perf_counter(), time.process_time()
        loss = self.model(x, x_tilde, generator=g)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        self.strategy.before_optimizer_step(self.model)
        t1 = time.perf_counter()
        self.optimizer.step()
        t2 = time.perf_counter()
        self.strategy.after_optimizer_step(self.model)
        end = time.perf_counter()
        return end - wall, time.process_time() - cpu, (t1 - t0) + (end - t2)


def _timed_blocks(trainees: dict[str, _Trainee], cfg: ProjectionBenchConfig) -> dict[str, list[dict]]:
    """Per strategy, one entry per block: median wall / CPU / projection seconds per step in that block."""
    for trainee in trainees.values():
        for _ in range(cfg.warmup_steps):
            trainee.step()
    blocks: dict[str, list[dict]] = {mode: [] for mode in trainees}
    order = list(trainees)
    for r in range(cfg.repeats):
        for mode in order[r % len(order):] + order[: r % len(order)]:  # rotate who runs first
            samples = [trainees[mode].step() for _ in range(cfg.steps_per_repeat)]
            block = {key: statistics.median(s[i] for s in samples)
                     for i, key in enumerate(("wall_s", "cpu_s", "projection_s"))}
            block["best_wall_s"] = min(s[0] for s in samples)
            blocks[mode].append(block)
    return blocks


def _ratio(blocks: dict[str, list[dict]], mode: str, key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(blocks[mode], blocks["naive"]))


def _max_leak(model, layers_of, store, start: dict) -> float:
    """Largest ‖ΔW·U‖/‖ΔW‖ over layers with 0 < k < d (k = d layers are frozen, k = 0 ones unconstrained)."""
    leak = 0.0
    for name, module in layers_of(model).items():
        if name not in store.layout or store.rank(name) in (0, store.dim(name)):
            continue
        U = store.basis(name, torch.float64)
        dW = (module.weight.detach().double() - start[name]).reshape(module.weight.shape[0], -1)
        norm = float(dW.norm())
        if norm > 0:
            leak = max(leak, float((dW @ U).norm()) / norm)
    return leak


def run(quick: bool, out_dir=None, *, cfg: ProjectionBenchConfig | None = None) -> dict:
    """Capture task 0, train three copies on task 1 in turns, print the overhead and the checks, return them."""
    cfg = cfg or (ProjectionBenchConfig.quick() if quick else ProjectionBenchConfig())
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ProjectionBenchConfig) -> dict:
    from cdad_dist.models.presets import ModelConfig, build_model

    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(preset=cfg.preset))
    size = model.model_config.image_size
    old, new = _images("smooth", cfg.n_old, size, cfg.seed), _images("texture", cfg.n_new, size, cfg.seed + 1)
    old_perturbed, new_perturbed = _perturbed(old, cfg.seed), _perturbed(new, cfg.seed + 1)
    capture = CaptureConfig(images=1.0, ddim_steps=cfg.ddim_steps, seed=cfg.seed)
    task0 = CDADStrategy(ContinualConfig(capture=capture))
    task0.begin_task(0, model)
    t0 = time.perf_counter()
    task0.end_task(0, model, _batches(old, cfg.batch, old_perturbed), make_capture_forward(model, capture))
    capture_s = time.perf_counter() - t0
    state, store = task0.state_dict(), task0.store
    layers = task0.protected_layers(model)
    weights_bytes = protected_weight_bytes(layers)
    reference = _reconstruct(model, old, cfg.ddim_steps, cfg.seed)
    finder = CDADStrategy(ContinualConfig()).protected_layers
    trainees, starts = {}, {}
    for mode in MODES:
        copy_ = copy.deepcopy(model)
        strategy = NaiveStrategy() if mode == "naive" else CDADStrategy(ContinualConfig(project=mode))
        if mode != "naive":
            strategy.load_state_dict(state)
        strategy.begin_task(1, copy_)
        starts[mode] = {n: m.weight.detach().double().clone() for n, m in finder(copy_).items()}
        trainees[mode] = _Trainee(copy_, strategy, cfg, new, new_perturbed)
    load_before = _load_average()
    blocks = _timed_blocks(trainees, cfg)
    load_after = _load_average()
    results = {}
    for mode, trainee in trainees.items():
        drift = _reconstruct(trainee.model, old, cfg.ddim_steps, cfg.seed)
        projector = getattr(trainee.strategy, "_projector", None)
        results[mode] = {
            "step_s": statistics.median(b["wall_s"] for b in blocks[mode]),
            "best_step_s": min(b["best_wall_s"] for b in blocks[mode]),
            "cpu_step_s": statistics.median(b["cpu_s"] for b in blocks[mode]),
            "projection_s": statistics.median(b["projection_s"] for b in blocks[mode]),
            "step_ratio_vs_naive": _ratio(blocks, mode, "wall_s"),
            "cpu_ratio_vs_naive": _ratio(blocks, mode, "cpu_s"),
            "block_ratios": [a["wall_s"] / b["wall_s"] for a, b in zip(blocks[mode], blocks["naive"])],
            "max_leak": _max_leak(trainee.model, finder, store, starts[mode]),
            "old_reconstruction_drift": float((drift - reference).norm() / reference.norm()),
            "trainable_params": sum(p.numel() for p in trainee.model.parameters() if p.requires_grad),
            "anchor_bytes": projector.anchor_bytes() if projector is not None else 0,
        }
    for r in results.values():
        r["best_ratio_vs_naive"] = r["best_step_s"] / results["naive"]["best_step_s"]
        r["projection_share_of_naive_step"] = r["projection_s"] / results["naive"]["step_s"]
        r["drift_vs_naive"] = r["old_reconstruction_drift"] / max(results["naive"]["old_reconstruction_drift"],
                                                                  1e-30)
    report = _summarise(cfg, store, layers, weights_bytes, capture_s, results, (load_before, load_after))
    report["ownership"] = _ownership_work(task0, layers)
    report["summary"] += "; " + report["ownership"]["summary"]
    report["amn_drift"] = _amn_drift(cfg, model, state, old, old_perturbed, new, new_perturbed)
    report["summary"] += "; " + report["amn_drift"]["summary"]
    return report


def _amn_drift(cfg: ProjectionBenchConfig, model, state_with_perturbed: dict, old: torch.Tensor,
               old_perturbed: torch.Tensor, new: torch.Tensor, new_perturbed: torch.Tensor) -> dict:
    """Relative change of the AMN output on the task-0 perturbed images after task-1 training: naive, and the
    update projection with bases captured on clean images only vs on clean + perturbed (the same steps)."""
    capture = CaptureConfig(images=1.0, ddim_steps=cfg.ddim_steps, seed=cfg.seed, perturbed=False)
    clean_only = CDADStrategy(ContinualConfig(capture=capture))
    clean_only.end_task(0, model, _batches(old, cfg.batch, old_perturbed), make_capture_forward(model, capture))
    with torch.no_grad():
        model.eval()
        before = model.condition(old_perturbed)
        before_clean = model.condition(old)
    states = {"naive": None, "clean_only": clean_only.state_dict(), "clean_and_perturbed": state_with_perturbed}
    drift = {}
    for label, state in states.items():
        trainee_model = copy.deepcopy(model).train()
        strategy = NaiveStrategy() if state is None else CDADStrategy(ContinualConfig(project="update"))
        if state is not None:
            strategy.load_state_dict(state)
        strategy.begin_task(1, trainee_model)
        trainee = _Trainee(trainee_model, strategy, cfg, new, new_perturbed)
        for _ in range(cfg.drift_steps):
            trainee.step()
        trainee_model.eval()
        with torch.no_grad():
            after = trainee_model.condition(old_perturbed)
            after_clean = trainee_model.condition(old)
        drift[label] = {"perturbed": float((after - before).norm() / before.norm()),
                        "clean": float((after_clean - before_clean).norm() / before_clean.norm())}
    naive = max(drift["naive"]["perturbed"], 1e-30)
    for values in drift.values():
        values["perturbed_vs_naive"] = values["perturbed"] / naive
    summary = (f"AMN drift on old perturbed inputs after {cfg.drift_steps} task-1 steps: clean-only capture "
               f"{drift['clean_only']['perturbed_vs_naive']:.3g}x naive, clean+perturbed "
               f"{drift['clean_and_perturbed']['perturbed_vs_naive']:.3g}x naive")
    print("  " + summary + f" (clean inputs: {drift['clean_only']['clean']:.2e} vs "
          f"{drift['clean_and_perturbed']['clean']:.2e}; naive {drift['naive']['clean']:.2e})")
    return {"steps": cfg.drift_steps, "relative_change": drift, "summary": summary}


MACS_TARGET = 0.55  # per-rank projection MACs on 2 ranks / on 1 rank (layer-ownership issue)


def _ownership_work(strategy: CDADStrategy, layers: dict) -> dict:
    """Per-rank projection work on 1 and 2 ranks, counted by the projector each rank would build (its owned
    layers' 2·out·d·columns per step, ``Projector.step_macs``) from the task-0 bases, plus its anchor bytes."""
    from cdad_dist.continual.projector import Projector

    store = strategy.store
    per_world = {}
    for world in (1, 2):
        owners = strategy.projection_owners(layers, world)
        ranks = []
        for rank in range(world):
            projector = Projector(layers, store.bases, "update", complement=store.complement, owners=owners,
                                  rank=rank, world=world)
            anchor = sum(4 * m.weight.numel() for n, m in layers.items() if n in projector.names and projector.owns(n))
            ranks.append({"macs": projector.step_macs(), "anchor_bytes": anchor})
        per_world[f"{world}rank"] = ranks
    one = per_world["1rank"][0]["macs"]
    worst = max(r["macs"] for r in per_world["2rank"])
    ratio = worst / one if one else 0.0
    met = ratio <= MACS_TARGET
    summary = (f"projection MACs per step: 1 rank {one / 1e6:.1f} M, 2 ranks max {worst / 1e6:.1f} M per rank = "
               f"{ratio:.3f}x (target <= {MACS_TARGET:g}x: {'met' if met else 'not met'})")
    print("  " + summary)
    return {"per_rank": per_world, "macs_2_vs_1_rank": ratio, "target": MACS_TARGET, "met": met, "summary": summary}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on every platform
        return None


def _summarise(cfg, store, layers, weights_bytes: int, capture_s: float, results: dict, loads) -> dict:
    store_bytes = store.total_bytes()
    u_only_bytes = sum(store.dim(n) * store.rank(n) * store.bases[n].element_size() for n in store.bases)
    saturated = sum(store.rank(n) == store.dim(n) for n in store.bases)
    print(f"bench projection: preset {cfg.preset}, {len(layers)} protected layers ({len(store.complement)} stored "
          f"as complement, {saturated} with k = d frozen), bases {store_bytes / 2**20:.2f} MiB = "
          f"{100 * store_bytes / weights_bytes:.1f}% of protected weights (U alone would be "
          f"{100 * u_only_bytes / weights_bytes:.1f}%), capture+reduce {capture_s:.1f}s "
          f"({cfg.n_old} images × {cfg.ddim_steps} DDIM steps)")
    busy = [x for x in loads if x is not None and x > cfg.threads + 0.5]
    print(f"  timing: batch {cfg.batch}, {cfg.threads} threads, {cfg.repeats} blocks × {cfg.steps_per_repeat} steps "
          f"per strategy, load average {_fmt_load(loads)}" + ("  (machine busy: timings are noisy)" if busy else ""))
    for mode in MODES:
        r = results[mode]
        print(f"  {mode:<7} step {r['step_s'] * 1e3:8.1f} ms (×{r['step_ratio_vs_naive']:.3f} naive wall, "
              f"×{r['cpu_ratio_vs_naive']:.3f} CPU, ×{r['best_ratio_vs_naive']:.3f} fastest steps; projection "
              f"{r['projection_s'] * 1e3:6.1f} ms = {100 * r['projection_share_of_naive_step']:.1f}% of a naive step)"
              f"  max leak "
              f"‖ΔW·U‖/‖ΔW‖ {r['max_leak']:.2e}  task-0 reconstruction drift {r['old_reconstruction_drift']:.2e} "
              f"({r['drift_vs_naive']:.3f}× naive)")
    ratio = results["update"]["step_ratio_vs_naive"]
    met = ratio <= cfg.target_ratio
    verdict = (f"update/naive step time ×{ratio:.3f} (median of {cfg.repeats} blocks): target ≤ ×{cfg.target_ratio:.2f} "
               f"{'MET' if met else 'NOT MET'}")
    print("  " + verdict)
    summary = (f"update: step ×{ratio:.3f} naive (target ≤ ×{cfg.target_ratio:.2f}: {'met' if met else 'not met'}), "
               f"leak {results['update']['max_leak']:.1e}, drift {results['update']['drift_vs_naive']:.3f}× naive; "
               f"grad: leak {results['grad']['max_leak']:.1e}, drift {results['grad']['drift_vs_naive']:.3f}× naive")
    return {"config": asdict(cfg), "protected_layers": len(layers), "protected_weight_bytes": weights_bytes,
            "bases_bytes": store_bytes, "bases_vs_weights": store_bytes / weights_bytes,
            "bases_u_only_bytes": u_only_bytes, "complement_layers": len(store.complement),
            "saturated_layers": saturated, "anchor_bytes_update_mode": results["update"]["anchor_bytes"],
            "capture_s": capture_s, "load_average": list(loads), "modes": results,
            "update_step_ratio": ratio, "target_met": met, "summary": summary}


def _fmt_load(loads) -> str:
    return " → ".join("n/a" if x is None else f"{x:.2f}" for x in loads)
