"""`cdad plan`: predicted memory per rank and compute of each phase of a run, without training.

The model is built on the meta device (no weights, no compute), so SD 1.5 plans in seconds on a laptop. What is
traced on it: one training step (forward + backward) and one capture forward per image, for their FLOPs
(PyTorch's FlopCounterMode) and the peak of live activation bytes (`trace.TensorBytes`), and the protected
layers' input columns per image (through the real capture hooks). What is computed from shapes: weights,
gradients and AdamW states, DDP gradient buckets, sketches (`continual.sketch_cost`), bases at an assumed rank
fraction, the per-step projection. Phases:

- train step:  weights + grads + AdamW (+ DDP buckets) + the step's activation peak
- capture:     weights + AdamW + one capture forward's activations + every layer's sketch (all are live together)
- finalise:    weights + AdamW + sketches + the largest layer's decomposition workspace + the new bases
- projection:  the train step + the bases, and its own FLOPs per optimizer step
- checkpoint:  bytes written (weights, AdamW, bases) and held in host memory while writing

With several ranks and ``continual.layer_ownership`` (the default), the continual state is split by the run's own
assignment (``continual.ownership``, the same function a run calls): each rank holds the sketches of the layers
it owns when they are Gram matrices plus one layer's gathered blocks in flight (world × d × the widest hook
block, fp32), and every isvd sketch of its own columns (small; merged on the owner after), decomposes its own
layers, and in update mode keeps the factors and anchors of the layers it projects; the weights, gradients,
optimizer state and activations are still per rank (DDP). In host memory a rank keeps only the bases of the
layers it owns (``finalised_basis_bytes``; ``continual.basis_comm``), not counted in the GPU phases.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cdad_dist.continual.capture import FeatureCapture, make_capture_forward
from cdad_dist.continual.layers import input_dim
from cdad_dist.continual.sketch_cost import F32, F64, assumed_rank, choose_sketch, gram_cost, isvd_cost
from cdad_dist.continual.store import basis_dtype
from cdad_dist.continual.strategy import CDADStrategy, sketch_options
from cdad_dist.errors import ConfigError
from cdad_dist.plan.trace import TensorBytes, flop_counter

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2 ** 30


@dataclass
class PlanOptions:
    world: int = 1
    gpu_mem_gib: float | None = None  # None: no verdict
    precision: str = "bf16"  # the launch config's mixed precision (activations); master weights stay fp32
    train_images: int | None = None  # images of the base task (capture count from a fraction); None: 264
    images_per_task_default: int = 264  # MVTec AD setting 2's base task

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ConfigError(f"plan: --world must be >= 1, got {self.world}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"plan: --precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


class _ColumnCounter:
    """Stands in for a sketch during the meta trace: counts the columns each layer's hook delivers."""

    def __init__(self) -> None:
        self.columns = 0
        self.widest_block = 0

    def update(self, block: torch.Tensor) -> None:
        self.columns += int(block.shape[1])
        self.widest_block = max(self.widest_block, int(block.shape[1]))


def build_meta_model(model_cfg) -> nn.Module:
    """The run's model with every parameter and buffer on the meta device (shapes only). Weights are never read:
    a `pretrained_path` is dropped and the config's shape fields (the preset's, e.g. SD 1.5's) are used."""
    from accelerate import init_empty_weights

    from cdad_dist.models.presets import build_model

    shapes_only = dataclasses.replace(model_cfg, pretrained_path=None, vae_path=None, context_path=None)
    with init_empty_weights():
        model = build_model(shapes_only)
    return model.to("meta")


def trace_train_step(model: nn.Module, batch: int, image_size: int) -> dict[str, float]:
    """FLOPs and activation peak of one forward + backward at `batch` images."""
    x = torch.empty(batch, 3, image_size, image_size, device="meta")
    counter, live = flop_counter(), TensorBytes()
    head = {}  # the segmentation head trains on synthetic anomalies: its extra passes are part of the step
    if getattr(model, "seg_head", None) is not None:
        head = {"synthetic": x, "synthetic_mask": torch.empty(batch, 1, image_size, image_size, device="meta")}
    with counter, live:
        out = model(x, x, **head)
        out["loss"].backward()
    for p in model.parameters():
        p.grad = None
    return {"flops": float(counter.get_total_flops()), "activation_peak_bytes": live.peak}


def trace_capture(model: nn.Module, cfg, batch: int, image_size: int,
                  layers: dict[str, nn.Module]) -> dict[str, Any]:
    """FLOPs, activation peak and per-layer columns of one capture forward at `batch` images (clean and, when
    configured, perturbed), through the real capture hooks and forward."""
    x = torch.empty(batch, 3, image_size, image_size, device="meta")
    counters = {name: _ColumnCounter() for name in layers}
    forward = make_capture_forward(model, cfg.continual.capture, cfg.eval.reconstruction)
    data = {"image": x, "perturbed": x} if cfg.continual.capture.perturbed else {"image": x}
    if getattr(model, "seg_head", None) is not None or cfg.continual.capture.synthetic:
        data["synthetic"] = x  # synthetic anomalies (the head's training inputs) get a capture pass of their own
    counter, live = flop_counter(), TensorBytes()
    with FeatureCapture(layers, counters), counter, live, torch.no_grad():  # type: ignore[arg-type]
        forward(data)
    return {"flops": float(counter.get_total_flops()), "activation_peak_bytes": live.peak,
            "columns_per_image": {n: c.columns / batch for n, c in counters.items()},
            "widest_block": {n: c.widest_block for n, c in counters.items()}}


def _layer_class(name: str, module: nn.Module) -> str:
    owner = name.split(".", 1)[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"{owner} conv{kh}x{kw}"
    return f"{owner} linear"


def _bytes_of(params, dtype_bytes: int | None = None) -> int:
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in params)


def capture_image_count(cfg, opts: PlanOptions) -> int:
    images = cfg.continual.capture.images
    total = opts.train_images or opts.images_per_task_default
    if isinstance(images, int):
        return min(images, total)
    return max(1, math.ceil(images * total))


def make_plan(cfg, opts: PlanOptions | None = None) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (see the module docstring)."""
    opts = opts or PlanOptions()
    from cdad_dist.models.presets import resolve_config

    model_cfg = resolve_config(cfg.model)
    size = model_cfg.image_size
    model = build_meta_model(cfg.model)
    strategy = CDADStrategy(cfg.continual)
    layers = strategy.protected_layers(model)
    trainable = [p for p in model.trainable_parameters()]
    p_train = sum(p.numel() for p in trainable)
    frozen = [p for p in model.first_stage.parameters()]
    first_stage_bytes = _bytes_of(frozen, torch.empty((), dtype=getattr(torch, model_cfg.first_stage_dtype))
                                  .element_size()) if frozen else 0
    weights = F32 * p_train + first_stage_bytes
    grads = F32 * p_train
    adam = (2 if cfg.train.optimizer == "adamw" else 1) * F32 * p_train
    buckets = F32 * p_train if opts.world > 1 else 0  # DDP's gradient buckets (a second copy of the grads)

    # Traced in fp32: autocast has no meta-device dispatch. Under bf16/fp16 autocast the matmul and conv
    # activations are half as large (norms and softmax stay fp32, so halving under-counts a little).
    train = trace_train_step(model, cfg.data.batch_size, size)
    capture = trace_capture(model, cfg, cfg.eval.batch_size, size, layers)
    act_scale = PRECISIONS[opts.precision].itemsize / F32
    train["activation_peak_bytes"] = int(train["activation_peak_bytes"] * act_scale)
    capture["activation_peak_bytes"] = int(capture["activation_peak_bytes"] * act_scale)

    images = capture_image_count(cfg, opts)
    images_per_rank = math.ceil(images / opts.world)
    options = sketch_options(cfg.continual)
    bdtype = torch.empty((), dtype=basis_dtype(cfg.continual.basis_dtype)).element_size()
    rows, classes = [], defaultdict(lambda: {"count": 0, "d": [], "kinds": set(), "sketch_bytes": 0,
                                             "basis_bytes": 0, "projection_flops": 0.0})
    sketch_held = 0
    sketch_transient = 0
    sketch_flops = 0.0
    finalise_workspace = 0
    basis_total = 0
    projection_flops = 0.0
    for name, module in layers.items():
        d = input_dim(module)
        out = module.weight.shape[0]
        columns = int(capture["columns_per_image"][name] * images_per_rank)
        if options.kind == "auto":
            choice = choose_sketch(d, options.memory_budget_mb * (1 << 20), columns=max(columns, 1),
                                   rank_fraction=options.rank_fraction, buffer_columns=options.buffer_columns)
            kind, cost, buffer = choice.kind, choice.cost, choice.buffer_columns
        else:
            kind = "gram" if options.kind == "gram" else "isvd"
            buffer = options.buffer_columns or d
            r = assumed_rank(d, options.rank_fraction)
            cost = gram_cost(d, columns) if kind == "gram" else isvd_cost(d, columns, buffer, r)
        r = assumed_rank(d, options.rank_fraction)
        held = F64 * d * d if kind == "gram" else F32 * d * (r + (buffer or d))
        sketch_held += held
        sketch_transient = max(sketch_transient, cost.peak_bytes - held)
        sketch_flops += cost.flops
        finalise_workspace = max(finalise_workspace, 2 * F64 * d * d if kind == "gram" else 3 * F32 * d * r)
        stored = min(r, d - r) * d * bdtype  # U, or its complement when k > d / 2
        basis_total += stored
        proj = 4.0 * out * d * min(r, d - r)  # ΔW·U then (ΔW·U)·Uᵀ (or with the complement)
        projection_flops += proj
        row = {"layer": name, "class": _layer_class(name, module), "d": d, "out": out, "columns": columns,
               "sketch": kind, "buffer": buffer if kind == "isvd" else None, "sketch_bytes": cost.peak_bytes,
               "sketch_flops": cost.flops, "basis_bytes": stored, "held_bytes": held,
               "widest_block": capture["widest_block"][name],
               "decomposition_bytes": 2 * F64 * d * d if kind == "gram" else 3 * F32 * d * r,
               "projection_flops": proj}
        rows.append(row)
        c = classes[row["class"]]
        c["count"] += 1
        c["d"].append(d)
        c["kinds"].add(kind)
        c["sketch_bytes"] += cost.peak_bytes
        c["basis_bytes"] += stored
        c["projection_flops"] += proj

    per_image_capture = capture["flops"] / cfg.eval.batch_size
    phases = {
        "train_step": {"memory": {"weights": weights, "gradients": grads, "optimizer": adam, "ddp_buckets": buckets,
                                  "activations": train["activation_peak_bytes"]},
                       "flops": train["flops"], "per": f"optimizer step of {cfg.data.batch_size} images per rank"},
        "capture": {"memory": {"weights": weights, "optimizer": adam,
                               "activations": capture["activation_peak_bytes"], "sketches": sketch_held,
                               "sketch_update": sketch_transient},
                    "flops": per_image_capture * images_per_rank + sketch_flops,
                    "per": f"task ({images_per_rank} capture images per rank)"},
        "finalise": {"memory": {"weights": weights, "optimizer": adam, "sketches": sketch_held,
                                "decomposition": finalise_workspace, "bases": basis_total},
                     "flops": sum(9.0 * r["d"] ** 3 for r in rows if r["sketch"] == "gram"), "per": "task"},
        "projection": {"memory": {"weights": weights, "gradients": grads, "optimizer": adam, "ddp_buckets": buckets,
                                  "activations": train["activation_peak_bytes"], "bases": basis_total},
                       "flops": projection_flops, "per": "optimizer step (on top of the train step)"},
        "checkpoint": {"memory": {"weights": weights, "optimizer": adam, "bases": basis_total},
                       "flops": 0.0, "per": "checkpoint (bytes written)"},
    }
    ownership = _ownership_plan(cfg, layers, rows, opts.world)
    if ownership is not None:
        worst = ownership["worst"]
        phases["capture"]["memory"]["sketches"] = worst["sketch_bytes"]
        phases["capture"]["memory"]["sketch_update"] = max(sketch_transient, worst["inflight_bytes"])
        phases["capture"]["flops"] = per_image_capture * images_per_rank + worst["sketch_flops"]
        phases["finalise"]["memory"]["sketches"] = worst["sketch_bytes"]
        phases["finalise"]["memory"]["decomposition"] = worst["decomposition_bytes"]
        phases["finalise"]["memory"]["bases"] = worst["finalised_basis_bytes"]
        phases["finalise"]["flops"] = worst["finalise_flops"]
        if cfg.continual.project == "update":
            phases["projection"]["memory"]["bases"] = worst["projected_basis_bytes"]
            phases["projection"]["memory"]["anchors"] = worst["anchor_bytes"]
            phases["projection"]["flops"] = worst["projection_flops"]
    elif cfg.continual.project == "update":
        phases["projection"]["memory"]["anchors"] = sum(F32 * r["out"] * r["d"] for r in rows)
    for phase in phases.values():
        phase["peak_bytes"] = sum(phase["memory"].values())
        phase["largest"] = max(phase["memory"], key=phase["memory"].get)
    worst = max(phases, key=lambda p: phases[p]["peak_bytes"] if p != "checkpoint" else -1)
    verdict = None
    if opts.gpu_mem_gib is not None:
        peak = phases[worst]["peak_bytes"]
        verdict = {"fits": peak <= opts.gpu_mem_gib * GIB, "peak_gib": peak / GIB, "gpu_mem_gib": opts.gpu_mem_gib,
                   "phase": worst, "largest_consumer": phases[worst]["largest"]}
    return {
        "model": {"preset": model_cfg.preset, "image_size": size, "width_multiplier": model_cfg.width_multiplier,
                  "trainable_params": p_train, "first_stage_params": sum(p.numel() for p in frozen),
                  "protected_layers": len(layers)},
        "options": {**dataclasses.asdict(opts), "capture_images": images, "capture_images_per_rank": images_per_rank,
                    "rank_fraction": options.rank_fraction, "memory_budget_mb": options.memory_budget_mb,
                    "capture_perturbed": cfg.continual.capture.perturbed},
        "traced": {"train_step_flops": train["flops"], "capture_flops_per_image": per_image_capture,
                   "train_activation_bytes": train["activation_peak_bytes"],
                   "capture_activation_bytes": capture["activation_peak_bytes"]},
        "phases": phases,
        "layer_classes": {k: {"count": v["count"], "d_min": min(v["d"]), "d_max": max(v["d"]),
                              "sketch": "/".join(sorted(v["kinds"])), "sketch_bytes": v["sketch_bytes"],
                              "basis_bytes": v["basis_bytes"], "projection_flops": v["projection_flops"]}
                          for k, v in sorted(classes.items())},
        "layers": rows,
        "ownership": ownership,
        "verdict": verdict,
    }


def _ownership_plan(cfg, layers: dict[str, nn.Module], rows: list[dict], world: int) -> dict[str, Any] | None:
    """Per-rank totals of the continual state under the run's layer ownership (None: 1 rank or ownership off)."""
    from cdad_dist.continual.ownership import assign_owners, capture_ownership, layer_shapes, projection_costs

    if world == 1 or not cfg.continual.layer_ownership:
        return None
    by_name = {r["layer"]: r for r in rows}
    capture = capture_ownership(layers, sketch_options(cfg.continual), world)
    rank_fraction = cfg.continual.plan_rank_fraction
    projection = assign_owners(projection_costs(layer_shapes(layers), None, rank_fraction), world)
    per_rank = []
    for rank in range(world):
        owned = [by_name[n] for n in capture.owned(rank)]
        projected = [by_name[n] for n in projection.owned(rank)]
        per_rank.append({
            "layers": len(owned),
            # Gram sketches live on their owner, which sketches every rank's columns of them; isvd sketches are
            # on every rank (their own columns) and merged on the owner after the capture
            "sketch_bytes": sum(r["held_bytes"] for r in owned if r["sketch"] == "gram")
            + sum(r["held_bytes"] for r in rows if r["sketch"] != "gram"),
            "sketch_flops": world * sum(r["sketch_flops"] for r in owned if r["sketch"] == "gram")
            + sum(r["sketch_flops"] for r in rows if r["sketch"] != "gram"),
            "inflight_bytes": max((world * F32 * r["d"] * r["widest_block"] for r in rows if r["sketch"] == "gram"),
                                  default=0),
            "decomposition_bytes": max((r["decomposition_bytes"] for r in owned), default=0),
            "finalise_flops": sum(9.0 * r["d"] ** 3 for r in owned if r["sketch"] == "gram"),
            "finalised_basis_bytes": sum(r["basis_bytes"] for r in owned),
            "projected_layers": len(projected),
            "projected_basis_bytes": sum(r["basis_bytes"] for r in projected),
            "anchor_bytes": sum(F32 * r["out"] * r["d"] for r in projected),
            "projection_flops": sum(r["projection_flops"] for r in projected),
        })
    worst = {key: max(p[key] for p in per_rank) for key in per_rank[0]}
    one_rank = {"sketch_bytes": sum(r["held_bytes"] for r in rows),
                "projection_flops": sum(r["projection_flops"] for r in rows),
                "anchor_bytes": sum(F32 * r["out"] * r["d"] for r in rows)}
    # the most loaded rank against what one rank holds / does alone (1/world is a perfect split; isvd sketches
    # are on every rank, so sketch bytes split only as far as the Gram share goes)
    return {"world": world, "per_rank": per_rank, "worst": worst,
            "max_share": {key: worst[key] / one_rank[key] if one_rank[key] else 0.0 for key in one_rank}}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _ownership_lines(ownership: dict[str, Any] | None) -> list[str]:
    if not ownership:
        return []
    share = ownership["max_share"]
    return [f"Layer ownership over {ownership['world']} ranks: the most loaded rank holds "
            f"{100 * share['sketch_bytes']:.1f}% of one rank's sketch bytes (Gram sketches split, isvd sketches on "
            f"every rank), {100 * share['anchor_bytes']:.1f}% of the anchors and does "
            f"{100 * share['projection_flops']:.1f}% of the projection work ({100 / ownership['world']:.1f}% is a "
            "perfect split).", ""]


def plan_markdown(plan: dict[str, Any]) -> str:
    m, o = plan["model"], plan["options"]
    lines = [f"# Plan: {m['preset']} at {m['image_size']} px (width ×{m['width_multiplier']}), "
             f"{o['world']} rank(s), {o['precision']}",
             "",
             f"{m['trainable_params'] / 1e6:.1f} M trainable parameters, {m['first_stage_params'] / 1e6:.1f} M frozen "
             f"first stage, {m['protected_layers']} protected layers; capture on {o['capture_images']} images "
             f"({o['capture_images_per_rank']} per rank{', clean + perturbed' if o['capture_perturbed'] else ''}); "
             f"bases at an assumed rank fraction of {o['rank_fraction']}.",
             "",
             *_ownership_lines(plan.get("ownership")),
             "| phase | peak per rank | largest | compute | per |",
             "|---|---|---|---|---|"]
    for name, p in plan["phases"].items():
        lines.append(f"| {name} | {_gib(p['peak_bytes'])} | {p['largest']} ({_gib(p['memory'][p['largest']])}) | "
                     f"{p['flops'] / 1e12:.3f} TFLOP ({p['flops'] / 2e12:.3f} TMAC) | {p['per']} |")
    lines += ["", "| layer class | count | d | sketch | sketch bytes | stored bases | projection per step |",
              "|---|---|---|---|---|---|---|"]
    for name, c in plan["layer_classes"].items():
        lines.append(f"| {name} | {c['count']} | {c['d_min']}–{c['d_max']} | {c['sketch']} | "
                     f"{_gib(c['sketch_bytes'])} | {_gib(c['basis_bytes'])} | {c['projection_flops'] / 1e9:.2f} GFLOP |")
    v = plan["verdict"]
    if v is not None:
        lines += ["", f"**{'Fits' if v['fits'] else 'Does not fit'}** in {v['gpu_mem_gib']:g} GiB: peak "
                      f"{v['peak_gib']:.1f} GiB in {v['phase']}, largest consumer {v['largest_consumer']}."]
    return "\n".join(lines) + "\n"
