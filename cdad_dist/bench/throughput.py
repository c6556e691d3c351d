"""``cdad bench throughput``: training images/s and peak memory, measured in one run.

CPU (always): the ``tiny`` preset at its 64 px, batch 8 per process, fp32, one process with every core against
two DDP processes (gloo) sharing the cores — the comparison a user of ``launch/cpu-2proc.yaml`` cares about. Each
configuration runs in fresh spawned processes, so the peak RSS is that configuration's own; they alternate over
``repeats`` rounds and the median is reported.

GPU (when CUDA is present): the ``sd15`` architecture with random weights at 256², bf16 autocast, for every
combination of attention backend (SDPA, and xformers when installed) and gradient checkpointing; images/s, peak
CUDA memory, and model FLOPs utilisation = (FLOPs of one training step, counted by ``torch.utils.flop_counter``)
× steps/s ÷ the GPU's dense bf16 peak.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cdad_dist.bench.ranks import run_ranks

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, by a substring of the device name.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                        "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


@dataclass
class ThroughputBenchConfig:
    preset: str = "tiny"
    batch: int = 8
    warmup_steps: int = 3
    steps: int = 20
    repeats: int = 3
    processes: list[int] = field(default_factory=lambda: [1, 2])
    gpu_preset: str = "sd15"
    gpu_image_size: int = 256
    gpu_batch: int = 8
    gpu_steps: int = 10

    @classmethod
    def quick(cls) -> ThroughputBenchConfig:
        return cls(warmup_steps=2, steps=8, repeats=2, gpu_steps=5)


def _step_fn(model, optimizer, images: torch.Tensor, generator: torch.Generator, autocast: torch.dtype | None):
    def step() -> None:
        with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(images, images, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _cpu_worker(rank: int, world: int, cfg: dict) -> dict:
    """One rank: build the model, warm up, time ``steps`` steps; report wall time and peak RSS."""
    from cdad_dist.models.presets import ModelConfig, build_model, resolve_config

    model = build_model(ModelConfig(preset=cfg["preset"]))
    size = resolve_config(model.model_config).image_size
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    images = torch.rand(cfg["batch"], 3, size, size, generator=g)
    step = _step_fn(trained, optimizer, images, g, None)
    for _ in range(cfg["warmup_steps"]):
        step()
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    if world > 1:
        torch.distributed.barrier()
    return {"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), "image_size": size,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's peak into a spawned
    child across exec, so ru_maxrss would report the launching process's peak instead of the worker's."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_cpu(world: int, cfg: ThroughputBenchConfig) -> dict[str, Any]:
    reports = run_ranks(_cpu_worker, world, asdict(cfg), what=f"throughput ({world} processes)")
    seconds = max(r["seconds"] for r in reports)
    return {"processes": world, "threads_per_process": reports[0]["threads"], "image_size": reports[0]["image_size"],
            "images_per_s": world * cfg.batch * cfg.steps / seconds,
            "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in reports),
            "peak_rss_mib_total": sum(r["peak_rss_mib"] for r in reports)}


def measure_cpu(cfg: ThroughputBenchConfig) -> dict[str, Any]:
    rounds: dict[int, list[dict]] = {w: [] for w in cfg.processes}
    for r in range(cfg.repeats):
        order = cfg.processes if r % 2 == 0 else list(reversed(cfg.processes))
        for world in order:
            rounds[world].append(_measure_cpu(world, cfg))
    out = {}
    for world, runs in rounds.items():
        out[f"{world}proc"] = {**runs[0], "images_per_s": statistics.median(x["images_per_s"] for x in runs),
                               "images_per_s_runs": [x["images_per_s"] for x in runs],
                               "peak_rss_mib_per_process": statistics.median(x["peak_rss_mib_per_process"]
                                                                             for x in runs)}
    if "1proc" in out and "2proc" in out:
        out["speedup_2proc_vs_1proc"] = out["2proc"]["images_per_s"] / out["1proc"]["images_per_s"]
    return out


def gpu_peak_tflops(name: str) -> float | None:
    for key, value in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def measure_gpu(cfg: ThroughputBenchConfig) -> list[dict[str, Any]]:
    """sd15 at 256², bf16 autocast: SDPA/xformers × gradient checkpointing off/on."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdad_dist.models.presets import ModelConfig, build_model

    try:
        import xformers  # noqa: F401
        backends = ["sdpa", "xformers"]
    except ImportError:
        backends = ["sdpa"]
    name = torch.cuda.get_device_name()
    peak = gpu_peak_tflops(name)
    results = []
    for backend in backends:
        for checkpointing in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build_model(ModelConfig(preset=cfg.gpu_preset, image_size=cfg.gpu_image_size,
                                            attention_backend=backend,
                                            gradient_checkpointing=checkpointing)).cuda()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            g = torch.Generator(device="cuda").manual_seed(0)
            images = torch.rand(cfg.gpu_batch, 3, cfg.gpu_image_size, cfg.gpu_image_size, device="cuda")
            step = _step_fn(model, optimizer, images, g, torch.bfloat16)
            step()
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(cfg.gpu_steps):
                step()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            achieved = flops * cfg.gpu_steps / seconds / 1e12
            results.append({"device": name, "preset": cfg.gpu_preset, "image_size": cfg.gpu_image_size,
                            "batch": cfg.gpu_batch, "attention": backend, "gradient_checkpointing": checkpointing,
                            "images_per_s": cfg.gpu_batch * cfg.gpu_steps / seconds,
                            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                            "tflops_per_step": flops / 1e12, "achieved_tflops": achieved,
                            "mfu": achieved / peak if peak else None})
            del model, optimizer
    return results


def summary_line(result: dict[str, Any]) -> str:
    cpu = result["cpu"]
    parts = [f"{k}: {v['images_per_s']:.1f} img/s, peak RSS {v['peak_rss_mib_per_process']:.0f} MiB/process"
             for k, v in cpu.items() if isinstance(v, dict)]
    line = f"throughput ({result['config']['preset']}, CPU fp32): " + "; ".join(parts)
    if "speedup_2proc_vs_1proc" in cpu:
        line += f"; 2 processes / 1 process = {cpu['speedup_2proc_vs_1proc']:.2f}x"
    for g in result.get("gpu", []):
        mfu = f", MFU {100 * g['mfu']:.1f}%" if g.get("mfu") is not None else ""
        line += (f" | GPU {g['attention']}{' +ckpt' if g['gradient_checkpointing'] else ''}: "
                 f"{g['images_per_s']:.1f} img/s, {g['peak_memory_gib']:.1f} GiB{mfu}")
    return line


def run(quick: bool, out_dir=None, *, cfg: ThroughputBenchConfig | None = None, log=print) -> dict[str, Any]:
    cfg = cfg or (ThroughputBenchConfig.quick() if quick else ThroughputBenchConfig())
    result: dict[str, Any] = {"config": asdict(cfg), "cpu": measure_cpu(cfg),
                              "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        result["gpu"] = measure_gpu(cfg)
    result["summary"] = summary_line(result)
    log(result["summary"])
    return result
