"""1 rank and 2 ranks evaluate a model to the same metrics (per-image noise + order-free metric states), for every
map kind (features, the segmentation head's, fused with scales calibrated over the ranks)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from dist_utils import run_distributed
from engine_utils import make_small_demo, micro_overrides


def _evaluate(overrides: list[str], run_dir: str) -> dict:
    """On every rank: the same random-weight micro model, evaluated on both demo classes."""
    import torch
    from accelerate import Accelerator

    from cdad_dist.config import load_config
    from cdad_dist.engine.data_prep import ensure_shards
    from cdad_dist.eval.evaluator import Evaluator
    from cdad_dist.models.presets import build_model, resolve_config

    cfg = load_config(None, overrides)
    acc = Accelerator(cpu=True)
    ensure_shards(cfg.data, acc)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    evaluator = Evaluator(cfg.eval, cfg.data, resolve_config(cfg.model).image_size, acc, Path(run_dir))
    classes = ["demo/carpet", "demo/bottle"]
    scales = evaluator.calibrate_fusion(model, classes)  # all ranks' normal training images, one all-reduce
    return {"metrics": evaluator.evaluate(model, classes, after_task=0), "scales": scales}


@pytest.mark.distributed
def test_one_and_two_ranks_give_the_same_metrics(tmp_path):
    demo = make_small_demo(tmp_path / "demo_data")
    overrides = micro_overrides(tmp_path, demo, extra=[
        "eval.heatmap_images=0", "model.seg_head.enabled=true", "model.seg_head.channels=[8, 16]",
        "eval.map=fused", "eval.compare_maps=true", "eval.head_scoring.calibration_images=7"])
    one = run_distributed(_evaluate, world_size=1, args=(overrides, str(tmp_path / "one")), timeout=300)[0]
    two = run_distributed(_evaluate, world_size=2, args=(overrides, str(tmp_path / "two")), timeout=300)
    assert two[0] == two[1]  # every rank ends with the same numbers
    assert one["scales"]["images"] == two[0]["scales"]["images"] == 7  # 4 + 3 images on 2 ranks
    for key in ("features_scale", "head_scale"):
        assert two[0]["scales"][key] == pytest.approx(one["scales"][key], rel=1e-5), key
    one, two = one["metrics"], [two[0]["metrics"]]
    assert {"features.pixel_ap", "head.pixel_ap", "fused.pixel_ap", "pixel_ap"} <= set(one["demo/carpet"])
    for cls, metrics in one.items():
        for name, value in metrics.items():
            assert not math.isnan(value), (cls, name)
            # equal up to the float rounding of a batch of 4 vs two batches of 2 through the U-Net
            assert two[0][cls][name] == pytest.approx(value, abs=1e-4), (cls, name)
