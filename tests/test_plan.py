"""`cdad plan`: the meta-device plan runs in seconds, counts SD 1.5 exactly, and its verdict follows the memory."""
from __future__ import annotations

import json

import pytest

from cdad_dist.cli import main
from cdad_dist.config import REPO_ROOT, load_config
from cdad_dist.plan.planner import PlanOptions, make_plan
from cdad_dist.plan.trace import TensorBytes


def test_tensor_bytes_tracks_live_storages_and_their_peak():
    import torch

    for device in ("cpu", "meta"):
        with TensorBytes(baseline=100) as tracker:
            a = torch.ones(1000, 1000, device=device)
            b = a * 2
            view = b[:10]
            del a, b
            live_with_view = tracker.live  # the view keeps b's storage
            del view
        assert live_with_view == 4_000_000 and tracker.live == 0
        assert tracker.peak == 8_000_000 and tracker.peak_bytes == 8_000_100


def test_demo_plan_phases_and_verdict():
    cfg = load_config(None)
    one = make_plan(cfg, PlanOptions(precision="fp32"))
    two = make_plan(cfg, PlanOptions(precision="fp32", world=2, gpu_mem_gib=1e-3))
    phases = one["phases"]
    assert set(phases) == {"train_step", "capture", "finalise", "projection", "checkpoint"}
    assert phases["train_step"]["memory"]["ddp_buckets"] == 0 < two["phases"]["train_step"]["memory"]["ddp_buckets"]
    assert two["options"]["capture_images_per_rank"] == -(-one["options"]["capture_images"] // 2)
    assert two["verdict"]["fits"] is False and two["verdict"]["phase"] in phases
    # two ranks: the sketches are split by the run's ownership, one rank holds all of them
    assert one["ownership"] is None
    assert two["phases"]["capture"]["memory"]["sketches"] < phases["capture"]["memory"]["sketches"]
    assert phases["projection"]["peak_bytes"] > phases["train_step"]["peak_bytes"]  # the bases come on top
    assert sum(c["count"] for c in one["layer_classes"].values()) == one["model"]["protected_layers"]
    bf16 = make_plan(cfg, PlanOptions(precision="bf16"))
    assert bf16["traced"]["train_activation_bytes"] == pytest.approx(one["traced"]["train_activation_bytes"] / 2,
                                                                     rel=1e-6)


def test_sd15_plan_counts_the_real_unet_without_weights(tmp_path, capsys):
    """SD 1.5's U-Net has 859,520,964 parameters; the plan reads no weights (the config's path does not exist)."""
    code = main(["plan", "--config", str(REPO_ROOT / "configs" / "mvtec" / "setting2.yaml"), "--world", "8",
                 "--gpu-mem", "80", "--out", str(tmp_path)])
    plan = json.loads((tmp_path / "plan.json").read_text())
    unet = 859_520_964
    assert unet < plan["model"]["trainable_params"] < unet * 1.02  # + the AMN
    assert code == (0 if plan["verdict"]["fits"] else 1)
    assert "| layer class |" in (tmp_path / "plan.md").read_text() and "Fits" in capsys.readouterr().out
    # layer ownership splits the continual state: ≥ 20 % headroom per rank on 8 × 80 GB (the target)
    assert plan["verdict"]["fits"] and plan["verdict"]["peak_gib"] <= 0.8 * 80
    assert len(plan["ownership"]["per_rank"]) == 8
    assert plan["ownership"]["max_share"]["anchor_bytes"] < 0.2
    assert plan["ownership"]["max_share"]["projection_flops"] < 0.2
    assert plan["ownership"]["max_share"]["sketch_bytes"] < 1.0  # only the Gram share splits
    assert "Layer ownership over 8 ranks" in (tmp_path / "plan.md").read_text()
    big = [r for r in plan["layers"] if r["d"] > 20000]
    assert big and all(r["sketch"] == "isvd" and r["buffer"] >= r["d"] // 4 for r in big)
