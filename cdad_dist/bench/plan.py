"""``cdad bench plan``: `cdad plan`'s predictions against a real micro continual run of the sd15 architecture.

The model is the real `sd15` architecture (diffusers `UNet2DConditionModel` and `AutoencoderKL`, random weights,
same depth and layer types) with every channel width scaled by `width_multiplier` (1/8 by default), at 64 px, in
fp32 on this CPU. The micro run: task 0 trains a few AdamW steps, the CDAD basis pass captures a few images and
finalises the bases, task 1 trains a few projected steps. Each phase is measured with the same tools as the
plan — live tensor bytes (`plan.trace.TensorBytes`, over the weights and optimizer states already held) and
PyTorch's FlopCounterMode — and compared with the plan for the same config:

- memory targets: each phase's measured peak within ±20 % of the predicted one;
- compute targets: MACs of a train step and of the capture within ±5 %.

The plan's sketches assume a basis rank of `plan_rank_fraction`·d; the measured ranks are reported next to it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

MEMORY_TOLERANCE, MAC_TOLERANCE = 0.20, 0.05


@dataclass
class PlanBenchConfig:
    width_multiplier: float = 0.125
    image_size: int = 64
    batch: int = 2
    train_steps: int = 2
    capture_images: int = 4
    ddim_steps: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> PlanBenchConfig:
        return cls(train_steps=1, capture_images=2)


def run_config(cfg: PlanBenchConfig):
    """The run config the micro run and the plan share."""
    from cdad_dist.config import load_config

    return load_config(None, [
        "model.preset=sd15", f"model.width_multiplier={cfg.width_multiplier}", f"model.image_size={cfg.image_size}",
        "model.amn_neighbour=3", f"data.batch_size={cfg.batch}", f"eval.batch_size={cfg.batch}",
        f"continual.capture.images={cfg.capture_images}", f"continual.capture.ddim_steps={cfg.ddim_steps}",
        "eval.reconstruction.mode=one_step", "eval.reconstruction.one_step_t=100",
    ])


def _state_bytes(model, optimizer) -> int:
    from cdad_dist.plan.trace import tensor_bytes

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


def _train_steps(model, optimizer, images, steps: int, strategy=None) -> dict[str, float]:
    from cdad_dist.plan.trace import TensorBytes, flop_counter

    tracker = TensorBytes(baseline=_state_bytes(model, optimizer))
    flops = []
    with tracker:
        for _ in range(steps):
            counter = flop_counter()
            with counter:
                out = model(images, images.flip(-1))
                out["loss"].backward()
                if strategy is not None:
                    strategy.before_optimizer_step(model)
                optimizer.step()
                if strategy is not None:
                    strategy.after_optimizer_step(model)
            flops.append(float(counter.get_total_flops()))
            optimizer.zero_grad(set_to_none=True)
    return {"peak_bytes": tracker.peak_bytes, "flops": flops[-1]}


def _measure(cfg: PlanBenchConfig, run) -> dict[str, Any]:
    from cdad_dist.continual.capture import make_capture_forward
    from cdad_dist.continual.strategy import CDADStrategy
    from cdad_dist.models.presets import build_model
    from cdad_dist.plan.trace import TensorBytes, flop_counter

    torch.manual_seed(cfg.seed)
    model = build_model(run.model)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.rand(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=g)
    strategy = CDADStrategy(run.continual)
    strategy.begin_task(0, model)
    measured: dict[str, Any] = {}
    t0 = time.perf_counter()
    measured["train_step"] = _train_steps(model, optimizer, images, cfg.train_steps)
    capture_images = torch.rand(cfg.capture_images, 3, cfg.image_size, cfg.image_size, generator=g)
    batches = [{"image": capture_images[i:i + cfg.batch], "perturbed": capture_images[i:i + cfg.batch].flip(-1)}
               for i in range(0, cfg.capture_images, cfg.batch)]
    forward = make_capture_forward(model, run.continual.capture, run.eval.reconstruction)
    tracker, counter = TensorBytes(baseline=_state_bytes(model, optimizer)), flop_counter()
    with tracker, counter:
        strategy.end_task(0, model, batches, forward)
    measured["capture"] = {"peak_bytes": tracker.peak_bytes, "flops": float(counter.get_total_flops())}
    strategy.begin_task(1, model)
    measured["projection"] = _train_steps(model, optimizer, images, cfg.train_steps, strategy)
    layers = strategy.history[-1]["layers"]
    measured["rank_fraction"] = sum(i["k_new"] for i in layers.values() if "k_new" in i) / max(
        1, sum(i["d"] for i in layers.values() if "k_new" in i))
    measured["basis_bytes"] = strategy.store.total_bytes()
    measured["seconds"] = time.perf_counter() - t0
    return measured


def run(quick: bool, out_dir=None, *, cfg: PlanBenchConfig | None = None, log=print) -> dict[str, Any]:
    from cdad_dist.plan.planner import PlanOptions, make_plan

    cfg = cfg or (PlanBenchConfig.quick() if quick else PlanBenchConfig())
    run_cfg = run_config(cfg)
    t0 = time.perf_counter()
    plan = make_plan(run_cfg, PlanOptions(precision="fp32", train_images=cfg.capture_images))
    plan_seconds = time.perf_counter() - t0
    measured = _measure(cfg, run_cfg)
    phases = plan["phases"]
    # The capture measurement spans end_task: the capture pass and the finalisation.
    predicted_capture = max(phases["capture"]["peak_bytes"], phases["finalise"]["peak_bytes"])
    rows = {
        "train_step": (phases["train_step"]["peak_bytes"], measured["train_step"]["peak_bytes"]),
        "capture+finalise": (predicted_capture, measured["capture"]["peak_bytes"]),
        "projection_step": (phases["projection"]["peak_bytes"], measured["projection"]["peak_bytes"]),
    }
    memory = {k: {"predicted_bytes": p, "measured_bytes": m, "ratio": m / p,
                  "ok": abs(m / p - 1) <= MEMORY_TOLERANCE} for k, (p, m) in rows.items()}
    # The flop counter sees the model's matmuls / convs and the Gram block products; the plan's capture compute
    # also counts the decompositions, which the counter does not see: compare the counted parts only.
    sketch_products = sum(r["sketch_flops"] - 9.0 * r["d"] ** 3 for r in plan["layers"] if r["sketch"] == "gram")
    predicted_capture_flops = plan["traced"]["capture_flops_per_image"] * cfg.capture_images + sketch_products
    macs = {
        "train_step": (plan["traced"]["train_step_flops"] / 2, measured["train_step"]["flops"] / 2),
        "capture": (predicted_capture_flops / 2, measured["capture"]["flops"] / 2),
    }
    compute = {k: {"predicted_macs": p, "measured_macs": m, "ratio": m / p, "ok": abs(m / p - 1) <= MAC_TOLERANCE}
               for k, (p, m) in macs.items()}
    all_isvd = [r for r in plan["layers"] if r["sketch"] != "gram"]
    summary = (f"sd15 ×{cfg.width_multiplier} at {cfg.image_size} px: memory measured/predicted "
               + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in memory.items())
               + "; MACs " + ", ".join(f"{k} {v['ratio']:.3f}" for k, v in compute.items())
               + f"; targets ±{MEMORY_TOLERANCE:.0%} / ±{MAC_TOLERANCE:.0%}: "
               + ("met" if all(v["ok"] for v in [*memory.values(), *compute.values()]) else "NOT met")
               + f"; plan {plan_seconds:.1f} s; measured basis rank fraction {measured['rank_fraction']:.2f} "
                 f"(plan assumes {plan['options']['rank_fraction']})")
    log(summary)
    result = {"config": asdict(cfg), "memory": memory, "compute": compute, "measured": measured,
              "plan_phases": phases, "plan_seconds": plan_seconds, "isvd_layers": len(all_isvd),
              "summary": summary}
    return result
