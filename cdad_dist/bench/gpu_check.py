"""``launch/gpu-check.sh``: what the sd15 architecture costs on one GPU, in bf16, in one JSON (≤ 8 minutes).

Random weights (the cost does not depend on their values), 256 px. Measured, each after a warm-up:
training throughput (img/s, and MFU against the GPU's dense bf16 peak), the CDAD basis pass against plain
inference on the same 32 images and U-Net calls, one_step vs ddim-10 latency per image, the per-step projection
overhead (train step with bases vs without), SDPA vs xformers attention in the AMN (when xformers is installed),
and the peak memory of each. `--device cpu --preset tiny` runs the same script here, as its smoke test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of `repeats` calls after one warm-up, and the peak memory of those calls."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": sorted(times)[len(times) // 2], "peak_bytes": peak}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cdad_dist.continual.capture import CaptureConfig, make_capture_forward
    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig
    from cdad_dist.eval.reconstruct import ReconstructionConfig, reconstruct_latent
    from cdad_dist.models.presets import ModelConfig, build_model
    from cdad_dist.plan.trace import flop_counter

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    overrides = {"image_size": args.image_size} if args.image_size else {}
    model = build_model(ModelConfig(preset=args.preset, **overrides)).to(device)
    size = model.model_config.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    images = torch.rand(args.images, 3, size, size, generator=g).to(device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "preset": args.preset, "image_size": size, "precision": args.precision,
                           "batch": args.batch, "torch": torch.__version__}

    def train_step(strategy=None) -> None:
        with autocast():
            loss = model(x, x.flip(-1))["loss"]
        loss.backward()
        if strategy is not None:
            strategy.before_optimizer_step(model)
        optimizer.step()
        if strategy is not None:
            strategy.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)

    counter = flop_counter()
    with counter, autocast():
        model(x, x.flip(-1))["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    step_flops = float(counter.get_total_flops())
    train = _timed(train_step, device, args.repeats)
    peak = _peak_tflops(device)
    out["train"] = {**train, "images_per_s": args.batch / train["seconds"], "flops_per_step": step_flops,
                    "mfu": (step_flops / train["seconds"] / 1e12 / peak) if peak else None}

    recon = ReconstructionConfig(mode="ddim", start_t=300, steps=10)
    capture = CaptureConfig(images=1.0, ddim_steps=10, perturbed=False)
    batches = [{"image": images[i:i + args.batch]} for i in range(0, args.images, args.batch)]

    @torch.no_grad()
    def inference() -> None:
        with autocast():
            for batch in batches:
                z = model.encode(batch["image"])
                reconstruct_latent(model, z, model.condition(batch["image"]), recon)

    def basis_pass() -> None:
        strategy = CDADStrategy(ContinualConfig(capture=capture))
        forward = make_capture_forward(model, capture, recon, device=device)

        def under_autocast(batch):
            with autocast():
                forward(batch)
        strategy.end_task(0, model, batches, under_autocast)
        out.setdefault("basis_layers", {"k_total": strategy.history[-1]["k_total"],
                                        "sketches": sorted({i["sketch"] for i in strategy.history[-1]["layers"]
                                                            .values()})})

    plain = _timed(inference, device, 1)
    basis = _timed(basis_pass, device, 1)
    out["basis_pass"] = {"inference": plain, "basis": basis, "ratio": basis["seconds"] / plain["seconds"],
                         "images": args.images}

    latency = {}
    one = images[:1]
    for name, cfg in (("one_step", ReconstructionConfig(mode="one_step", one_step_t=100)),
                      ("ddim10", ReconstructionConfig(mode="ddim", start_t=300, steps=10))):
        @torch.no_grad()
        def single(cfg=cfg) -> None:
            with autocast():
                reconstruct_latent(model, model.encode(one), model.condition(one), cfg)
        latency[name] = _timed(single, device, args.repeats)
    out["latency"] = {**latency, "ddim10_over_one_step": latency["ddim10"]["seconds"] / latency["one_step"]["seconds"]}

    strategy = CDADStrategy(ContinualConfig(capture=capture))
    strategy.begin_task(0, model)
    strategy.end_task(0, model, batches[:1], make_capture_forward(model, capture, recon, device=device))
    strategy.begin_task(1, model)
    projected = _timed(lambda: train_step(strategy), device, args.repeats)
    out["projection"] = {"plain_step": train, "projected_step": projected,
                         "overhead": projected["seconds"] / train["seconds"] - 1}

    out["attention"] = {"sdpa": out["train"]["seconds"]}
    try:
        import xformers  # noqa: F401

        for module in model.amn.modules():
            if hasattr(module, "backend"):
                module.backend = "xformers"
        model.unet.enable_xformers_memory_efficient_attention()
        out["attention"]["xformers"] = _timed(train_step, device, args.repeats)["seconds"]
    except ImportError:
        out["attention"]["xformers"] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/gpu-check.json")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
