"""The segmentation head's training cost: seconds per optimizer step with and without it, same model and batch.

The head adds, per step, a no-grad one-step reconstruction of the synthetic images (encode, AMN, one U-Net call,
decode for a pixel-input head) and the head's own forward and backward. Measured on one training batch of the
run's first task, with the model of the run's config at random init (the cost does not depend on the weights):
``repeats`` timed steps each way, interleaved, after one untimed warm-up step each; the median is reported.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from cdad_dist.config import load_config
from cdad_dist.data.perturb import NSAPerturber
from cdad_dist.data.sequences import resolve_sequence
from cdad_dist.data.shards import manifest_classes
from cdad_dist.data.stream import StreamConfig, train_stream
from cdad_dist.data.synthetic import SyntheticAnomalies
from cdad_dist.errors import ConfigError
from cdad_dist.models.presets import build_model, resolve_config


def head_step_cost(config: str, overrides: list[str], *, repeats: int = 5, log=print) -> dict[str, Any]:
    """{step_s_with_head, step_s_without_head, ratio, batch_size, device} for the run config ``config``."""
    from cdad_dist.data.shards import load_manifest

    cfg = load_config(config, overrides)
    if not cfg.model.seg_head.enabled:
        raise ConfigError("head_step_cost: the config has no segmentation head (model.seg_head.enabled)")
    classes = resolve_sequence(cfg.sequence, available_classes=manifest_classes(load_manifest(cfg.data.shards)))
    size = resolve_config(cfg.model).image_size
    stream = train_stream(cfg.data.shards, list(classes.tasks[0]),
                          cfg=StreamConfig(batch_size=cfg.data.batch_size, image_size=size, shuffle_buffer=1),
                          perturber=NSAPerturber(cfg.data.nsa), rank=0, world_size=1,
                          synthesizer=SyntheticAnomalies(cfg.data.synthetic, cfg.data.nsa))
    batch = next(iter(stream))
    model = build_model(cfg.model)
    head = model.seg_head
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step(with_head: bool) -> float:
        model.seg_head = head if with_head else None
        t0 = time.perf_counter()
        out = model(batch["image"], batch["perturbed"], generator=torch.Generator().manual_seed(0),
                    **({"synthetic": batch["synthetic"], "synthetic_mask": batch["synthetic_mask"]} if with_head else {}))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    try:
        step(True), step(False)
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(repeats):
            for with_head in ((True, False) if r % 2 == 0 else (False, True)):
                times[with_head].append(step(with_head))
    finally:
        model.seg_head = head
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    result = {"step_s_with_head": with_s, "step_s_without_head": without_s, "ratio": with_s / without_s,
              "batch_size": cfg.data.batch_size, "device": f"{torch.get_num_threads()} CPU thread(s)",
              "head_input": cfg.model.seg_head.input}
    log(f"segmentation head training cost: {with_s:.3f} s/step with vs {without_s:.3f} without "
        f"({result['ratio']:.2f}x), batch {cfg.data.batch_size}, {result['device']}")
    return result
