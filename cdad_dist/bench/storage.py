"""``cdad bench storage``: how big the basis store is next to the model, and what bf16 storage costs in accuracy.

A ``tiny`` model (random weights) sees two tasks with different images (smooth colour fields, then fine textures);
after each, ``CDADStrategy.end_task`` merges the task into the store, which keeps per layer U or its complement V,
whichever is smaller. Reported per task: bytes in memory and of the ``bases_task<t>.safetensors`` file, in float32
and bfloat16, relative to the protected weights (float32). Then the orthogonality residual of the projection with
the bf16-stored factors: for random weight changes ΔW, ‖P̃(ΔW)·U‖ / ‖ΔW‖ where P̃ projects with the bf16 factor
(cast to float32, as the projector does) and U is the float64 basis, next to the same number with the float32
factor — the leak that bf16 storage adds to every step.

Checkpoint size: the strategy state a task-end checkpoint carries, serialised as the checkpoint writes it
(``torch.save``), once by a strategy without a run directory (the bases embedded, as before) and once by one bound
to a run directory (the bases written once per task under ``<run dir>/bases/``, the state only referencing them).

Bases held per rank with layer ownership: a 2-rank run keeps each basis on its home rank only
(``ownership.capture_ownership_of_dims``, the assignment the run computes; ``tests/test_layer_ownership.py`` checks that a real
2-rank run holds exactly these bytes), so the busiest rank's bytes are printed next to the 1-rank store.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cdad_dist.bench.basis import _images
from cdad_dist.continual.capture import CaptureConfig, make_capture_forward
from cdad_dist.continual.layers import protected_weight_bytes
from cdad_dist.continual.ownership import capture_ownership_of_dims
from cdad_dist.continual.projector import project_rows, project_rows_complement
from cdad_dist.continual.protocol import StrategyContext
from cdad_dist.continual.store import BasisStore
from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig, sketch_options
from cdad_dist.eval.reconstruct import ReconstructionConfig
from cdad_dist.models.presets import ModelConfig, build_model, resolve_config


@dataclass
class StorageBenchConfig:
    preset: str = "tiny"
    images_per_task: int = 16
    ddim_steps: int = 5
    probes: int = 4  # random ΔW per layer for the residual
    seed: int = 0

    @classmethod
    def quick(cls) -> StorageBenchConfig:
        return cls(images_per_task=8, ddim_steps=3, probes=2)


def _state_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def _file_bytes(store: BasisStore, dtype: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return os.path.getsize(store.save(Path(tmp), dtype=dtype))


@torch.no_grad()
def residuals(store: BasisStore, weights: dict[str, torch.Tensor], probes: int, seed: int) -> dict[str, float]:
    """Largest and mean ‖P̃(ΔW)·U‖/‖ΔW‖ over layers with 0 < k < d, for the factor stored in float32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for name, stored in store.bases.items():
        k, d = store.rank(name), store.dim(name)
        if k in (0, d):
            continue
        U = store.basis(name, torch.float64)
        complement = name in store.complement
        rows = weights[name].shape[0]
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            factor = stored.to(dtype).to(torch.float32)
            for _ in range(probes):
                dW = torch.randn(rows, d, generator=g)
                projected = project_rows_complement(dW, factor) if complement else project_rows(dW, factor)
                out[dtype_name].append(float((projected.double() @ U).norm() / dW.double().norm()))
    return {f"{k}_{stat}": (max(v) if stat == "max" else sum(v) / len(v)) if v else 0.0
            for k, v in out.items() for stat in ("max", "mean")}


def held_per_rank(store: BasisStore, options, world: int) -> list[int]:
    """Bytes of the bases each rank holds when every basis stays on its home rank."""
    homes = capture_ownership_of_dims({n: store.dim(n) for n in store.names()}, options, world).owners
    held = [0] * world
    for name in store.names():
        d, columns, itemsize = store.layout[name]
        held[homes[name]] += d * columns * itemsize
    return held


def run(quick: bool, out_dir=None, *, cfg: StorageBenchConfig | None = None, log=print) -> dict[str, Any]:
    cfg = cfg or (StorageBenchConfig.quick() if quick else StorageBenchConfig())
    model = build_model(ModelConfig(preset=cfg.preset)).eval()
    size = resolve_config(model.model_config).image_size
    capture = CaptureConfig(images=1.0, ddim_steps=cfg.ddim_steps)
    strategy = CDADStrategy(ContinualConfig(capture=capture))
    run_dir = tempfile.TemporaryDirectory()
    referencing = CDADStrategy(ContinualConfig(capture=capture))  # the same tasks, bases written under a run dir
    referencing.bind(StrategyContext(image_size=None, run_dir=Path(run_dir.name)))
    layers = strategy.protected_layers(model)
    weight_bytes = protected_weight_bytes(layers)
    smooth = _images(cfg.images_per_task, size, cfg.seed)
    textured = torch.rand(cfg.images_per_task, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed + 1))
    tasks = []
    for t, images in enumerate((smooth, textured)):
        batches = [{"image": images[i:i + 8]} for i in range(0, len(images), 8)]
        forward = make_capture_forward(model, capture, ReconstructionConfig(start_t=300))
        strategy.end_task(t, model, batches, forward)
        referencing.end_task(t, model, batches, forward)
        store = strategy.store
        checkpoint = {"embedded": _state_bytes(strategy.state_dict()),
                      "referenced": _state_bytes(referencing.state_dict()),
                      "bases_files": sorted(p.name for p in (Path(run_dir.name) / "bases").iterdir())}
        fp32_file, bf16_file = _file_bytes(store, "float32"), _file_bytes(store, "bfloat16")
        weights = {name: module.weight.detach().reshape(module.weight.shape[0], -1) for name, module in layers.items()}
        tasks.append({
            "task": t, "k_total": sum(store.rank(n) for n in store.bases),
            "d_total": sum(store.dim(n) for n in store.bases),
            "complement_layers": len(store.complement), "layers": len(store.bases),
            "memory_bytes": store.total_bytes(), "relative_to_weights": store.relative_to(weight_bytes),
            "file_bytes_float32": fp32_file, "file_bytes_bfloat16": bf16_file,
            "file_relative_float32": fp32_file / weight_bytes, "file_relative_bfloat16": bf16_file / weight_bytes,
            "residual": residuals(store, weights, cfg.probes, cfg.seed + 7 * t),
            "checkpoint_strategy_state_bytes": checkpoint,
            "held_bytes_per_rank_2_ranks": held_per_rank(store, sketch_options(strategy.cfg), 2),
        })
    run_dir.cleanup()
    result = {"config": asdict(cfg), "protected_weight_bytes": weight_bytes, "tasks": tasks}
    parts = [f"task {x['task']}: store {100 * x['file_relative_float32']:.0f}% of the protected weights in float32, "
             f"{100 * x['file_relative_bfloat16']:.0f}% in bf16; leak max {x['residual']['float32_max']:.1e} (fp32) vs "
             f"{x['residual']['bfloat16_max']:.1e} (bf16); checkpoint strategy state "
             f"{x['checkpoint_strategy_state_bytes']['embedded'] / 2**20:.2f} MiB with the bases embedded -> "
             f"{x['checkpoint_strategy_state_bytes']['referenced'] / 2**10:.1f} KiB referencing "
             f"{x['checkpoint_strategy_state_bytes']['bases_files'][-1]}; bases held per rank on 2 ranks "
             f"{max(x['held_bytes_per_rank_2_ranks']) / 2**20:.2f} of {x['memory_bytes'] / 2**20:.2f} MiB "
             f"({max(x['held_bytes_per_rank_2_ranks']) / max(1, x['memory_bytes']):.2f}x)" for x in tasks]
    result["summary"] = "storage: " + "; ".join(parts)
    log(result["summary"])
    return result
