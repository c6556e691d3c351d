"""The `knn` memory-bank baseline: exact nearest distances, the coreset, and a run through the real engine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cdad_dist.config import load_config
from cdad_dist.continual.knn import greedy_coreset, nearest_distance
from cdad_dist.engine.trainer import train
from engine_utils import make_small_demo, micro_overrides


def test_nearest_distance_matches_brute_force_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    ref = torch.cdist(q.double(), bank.double()).amin(1).float()
    for chunk in (1, 7, 100):
        torch.testing.assert_close(nearest_distance(q, bank, chunk), ref, atol=1e-5, rtol=1e-5)


def test_greedy_coreset_covers_better_than_a_random_subset():
    g = torch.Generator().manual_seed(1)
    # Clustered points with one far outlier cluster: a random 5 % subset misses it, k-center does not.
    bank = torch.cat([torch.randn(950, 4, generator=g), 20 + torch.randn(50, 4, generator=g)])
    idx = greedy_coreset(bank, 0.05, dim=128)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.equal(idx, greedy_coreset(bank, 0.05, dim=128))  # deterministic
    radius = nearest_distance(bank, bank[idx], 256).max()
    random = torch.randperm(1000, generator=torch.Generator().manual_seed(2))[:50]
    assert radius < nearest_distance(bank, bank[random], 256).max()
    assert torch.equal(greedy_coreset(bank, 1.0, dim=4), torch.arange(1000))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_small_demo(tmp_path_factory.mktemp("demo") / "demo_data")


def test_knn_runs_through_the_engine_without_training_and_never_forgets(tmp_path, demo_root):
    cfg = load_config(None, micro_overrides(tmp_path, demo_root, extra=["continual.strategy=knn"]))
    matrix = train(cfg)
    run_dir = tmp_path / "runs" / "t"
    extra = json.loads((run_dir / "report" / "results.json").read_text())["strategy_summary"]
    # 8 training images of 32 px per class, features on the stride-4 grid of the 32 px input: 8·8·8 patches.
    assert extra["bank_patches_per_class"] == {"demo/carpet": 512, "demo/bottle": 512}
    per_class = extra["bank_bytes_per_class"]["demo/carpet"]
    assert per_class == 512 * 64 * 4  # 24 + 40 channels of EfficientNet-Lite0's stage1/stage2, fp32
    # Zero forgetting by construction: the first class's bank is exactly as task 0 left it.
    from cdad_dist.engine.checkpoint import list_checkpoints, read_strategy_state
    ends = [c for c in list_checkpoints(run_dir / "checkpoints") if c.task_end]
    banks = [read_strategy_state(c.path)["banks"] for c in ends]
    assert set(banks[0]) == {"demo/carpet"} and set(banks[1]) == {"demo/carpet", "demo/bottle"}
    assert torch.equal(banks[0]["demo/carpet"], banks[1]["demo/carpet"])
    assert all(0.0 <= v <= 1.0 for v in matrix["values"]["image_auroc"]["1"].values())
    # No optimizer step was taken: the weights are the initial ones.
    from safetensors.torch import load_file
    from cdad_dist.models.presets import build_model
    saved = load_file(str(ends[-1].path / "model.safetensors"))
    fresh = build_model(cfg.model).state_dict()
    assert all(torch.equal(saved[k], fresh[k]) for k in saved if k.startswith("unet."))


def test_predict_scores_a_knn_run_with_its_memory_banks(tmp_path, demo_root):
    """`cdad predict` on a knn run scores as its evaluation did (the banks), not by the untrained reconstruction."""
    from cdad_dist.eval.predict import load_image, load_run, predict
    from cdad_dist.eval.scoring import score_batch

    train(load_config(None, micro_overrides(tmp_path, demo_root, name="k", extra=["continual.strategy=knn"])))
    run = load_run(tmp_path / "runs" / "k")
    assert run.scorer is not None
    files = sorted((demo_root / "carpet" / "test").rglob("*.png"))[:3]
    result = predict(run, files, tmp_path / "out", log=lambda m: None)
    assert result["scored_by"] == "strategy" and result["strategy"] == "knn"
    x = torch.stack([load_image(f, run.image_size) for f in files])
    banks = run.scorer(run.model, run.extractor, x, run.cfg.eval, None, None).scores
    recon = score_batch(run.model, run.extractor, x, run.cfg.eval).scores
    got = torch.tensor([r["score"] for r in result["results"]])
    torch.testing.assert_close(got, banks.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, recon.float(), rtol=1e-2)
