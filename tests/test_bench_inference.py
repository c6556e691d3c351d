"""`cdad bench inference`'s measuring function on a micro model, and its ratio arithmetic on known times."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cdad_dist.bench.inference as bench
from cdad_dist.bench.flops import speedup_bounds
from cdad_dist.config import EvalConfig, load_config
from cdad_dist.eval.anomaly_map import AnomalyMapConfig, extractor_from_config
from cdad_dist.eval.reconstruct import ReconstructionConfig
from cdad_dist.eval.scoring import ScoredBatch
from cdad_dist.models.presets import ModelConfig, build_model

SIZE = 32

REPO = Path(__file__).resolve().parent.parent


def _batches(n_batches: int = 2, device: str = "cpu") -> list[dict]:
    """Batches of one class each: a normal image and one with a bright square (its mask marks the square)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        x = 0.4 + 0.1 * torch.rand(2, 3, SIZE, SIZE, generator=g)
        mask = torch.zeros(2, 1, SIZE, SIZE)
        mask[1, :, 8:16, 10:18] = 1.0
        x[1] = torch.where(mask[1].bool(), torch.ones_like(x[1]), x[1])
        batches.append({"x": x.to(device), "label": torch.tensor([0, 1]), "mask": mask, "cls": f"demo/c{i % 2}"})
    return batches


@pytest.fixture(scope="module")
def micro():
    cfg = ModelConfig(preset="tiny", image_size=SIZE, block_out_channels=(32, 32), attention_head_dim=2,
                      cross_attention_dim=16, context_tokens=4, amn_depth=1, amn_heads=2, amn_neighbour=3,
                      amn_local_channels=(4, 4, 8, 8, 8, 8, 16))
    model = build_model(cfg).eval()
    extractor = extractor_from_config(AnomalyMapConfig())
    return model, extractor


def test_measure_modes_on_a_micro_model(micro):
    model, extractor = micro
    eval_cfg = EvalConfig(reconstruction=ReconstructionConfig(start_t=300), anomaly_map=AnomalyMapConfig(sigma=1.0))
    modes = bench.mode_configs(eval_cfg.reconstruction, ddim_steps=3)
    assert [m.mode for m in modes.values()] == ["ddim", "one_step", "fused"] and modes["ddim"].steps == 3
    assert all(m.start_t == 300 for m in modes.values())  # the run's other settings are kept
    out = bench.measure_modes(model, extractor, _batches(), eval_cfg, modes, repeats=2)
    assert out["n_images"] == 4 and out["repeats"] == 2 and set(out["modes"]) == {"ddim", "one_step", "fused"}
    ref = out["modes"]["ddim"]
    for name, r in out["modes"].items():
        assert len(r["denoise_s_runs"]) == len(r["recon_s_runs"]) == len(r["total_s_runs"]) == 2
        assert all(0 < d < a < b for d, a, b in zip(r["denoise_s_runs"], r["recon_s_runs"], r["total_s_runs"]))
        batch_times = out["batch_times_s"][name]
        assert len(batch_times["recon"]) == 2 and all(len(t) == 2 for t in batch_times["recon"])
        assert r["recon_s_runs"] == pytest.approx([sum(t[i] for t in batch_times["recon"]) for i in range(2)])
        median_pass = sum(statistics.median(t) for t in batch_times["recon"])
        assert r["recon_ms_per_image"] == pytest.approx(1e3 * median_pass / 4)
        median_pass = sum(statistics.median(t) for t in batch_times["total"])
        assert r["total_ms_per_image"] == pytest.approx(1e3 * median_pass / 4)
        assert r["speedup_recon"] == pytest.approx(ref["recon_ms_per_image"] / r["recon_ms_per_image"])
        assert r["speedup_total"] == pytest.approx(ref["total_ms_per_image"] / r["total_ms_per_image"])
        assert r["speedup_denoise"] == pytest.approx(ref["denoise_ms_per_image"] / r["denoise_ms_per_image"])
        assert set(r["per_class"]) == {"demo/c0", "demo/c1"}
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
        assert r["reconstruction"]["mode"] == name
    assert ref["speedup_recon"] == 1.0
    # The same seeded noise for every pass: re-measuring gives the same metrics.
    again = bench.measure_modes(model, extractor, _batches(), eval_cfg, {"ddim": modes["ddim"]}, repeats=1)
    assert again["modes"]["ddim"]["per_class"] == ref["per_class"]


def test_samples_rows_average_k_draws_of_the_runs_own_mode(micro):
    """`--samples 2`: one extra row, the run's mode with 2 draws; the three modes keep one draw even when the
    run itself was configured with several (their speed-ups stay comparable with earlier figures)."""
    model, extractor = micro
    run_rec = ReconstructionConfig(mode="one_step", one_step_t=200, samples=3)
    modes = bench.mode_configs(run_rec, ddim_steps=3, samples=(2,))
    assert list(modes) == ["ddim", "one_step", "fused", "one_step×2"]
    assert [m.samples for m in modes.values()] == [1, 1, 1, 2] and modes["one_step×2"].mode == "one_step"
    eval_cfg = EvalConfig(reconstruction=run_rec, anomaly_map=AnomalyMapConfig(sigma=1.0))
    out = bench.measure_modes(model, extractor, _batches(), eval_cfg,
                              {k: modes[k] for k in ("ddim", "one_step", "one_step×2")}, repeats=1)
    one, two = out["modes"]["one_step"], out["modes"]["one_step×2"]
    assert two["reconstruction"]["samples"] == 2
    assert two["per_class"] != one["per_class"]  # the second draw changed the maps


def _fake_score_batch(seconds_per_image: dict[str, float], map_s_per_image: float, shared_s_per_image: float):
    """A score_batch whose 'measured' times are known: perfect maps (= the masks), scores = labels; the
    reconstruction is the mode's denoising plus ``shared_s_per_image``."""
    calls = []

    def fake(model, extractor, x, eval_cfg, generator):
        b = x.shape[0]
        calls.append(eval_cfg.reconstruction.mode)
        maps = torch.zeros(b, 1, SIZE, SIZE)
        maps[1:, :, 8:16, 10:18] = 1.0
        maps += 0.01 * torch.stack([torch.rand(maps.shape[1:], generator=g) for g in generator])  # one per image
        denoise = seconds_per_image[eval_cfg.reconstruction.mode] * b
        return ScoredBatch(x, maps, maps.flatten(1).amax(1), recon_s=denoise + shared_s_per_image * b,
                           map_s=map_s_per_image * b, denoise_s=denoise)

    return fake, calls


@pytest.mark.parametrize("one_step_s, met", [(0.001, True), (0.002, False)])
def test_ratios_are_computed_from_the_measured_times(monkeypatch, one_step_s, met):
    times = {"ddim": 0.010, "one_step": one_step_s, "fused": 0.004}
    fake, calls = _fake_score_batch(times, map_s_per_image=0.005, shared_s_per_image=0.002)
    monkeypatch.setattr(bench, "score_batch", fake)
    modes = bench.mode_configs(ReconstructionConfig(), ddim_steps=10)
    out = bench.measure_modes(None, None, _batches(3), EvalConfig(), modes, repeats=3)
    # One warm-up batch per mode, then 3 passes × 3 batches × 3 modes, interleaved in rotating order.
    assert len(calls) == 3 + 3 * 3 * 3
    assert calls[3:9] == ["ddim", "one_step", "fused", "one_step", "fused", "ddim"]
    for name, r in out["modes"].items():
        assert r["denoise_s_runs"] == pytest.approx([6 * times[name]] * 3)
        assert r["recon_s_runs"] == pytest.approx([6 * (times[name] + 0.002)] * 3)
        assert r["denoise_ms_per_image"] == pytest.approx(1e3 * times[name])
        assert r["recon_ms_per_image"] == pytest.approx(1e3 * (times[name] + 0.002))
        assert r["speedup_denoise"] == pytest.approx(times["ddim"] / times[name])
        assert r["speedup_recon"] == pytest.approx((times["ddim"] + 0.002) / (times[name] + 0.002))
        assert r["speedup_total"] == pytest.approx((times["ddim"] + 0.007) / (times[name] + 0.007))
        assert r["image_auroc"] == 1.0 and r["pixel_auroc"] == pytest.approx(1.0)
    line = bench.summary_line(out, 10)
    expected = f"one_step {times['ddim'] / one_step_s:.1f}x faster than ddim-10 in denoising"
    assert line.startswith("inference: ") and expected in line and "fused 2.5x faster" in line
    target = bench.target_check(out)
    assert target["met"] is met and target["image_auroc_gap_points"] == 0.0 and target["span"] == "denoise"
    assert math.isclose(target["one_step_speedup"], times["ddim"] / one_step_s)


def test_measure_modes_rejects_a_missing_reference():
    with pytest.raises(ValueError, match="reference mode 'ddim'"):
        bench.measure_modes(None, None, _batches(1), EvalConfig(), {"one_step": ReconstructionConfig()})


def test_training_settings_are_a_valid_config_named_by_their_values(tmp_path):
    quick = bench.InferenceBenchConfig.quick()
    overrides = bench._train_overrides(quick, tmp_path)
    cfg = load_config(bench.DEFAULT_CONFIG, overrides)
    assert cfg.sequence == [bench.DEMO_TASK0] and cfg.train.base_steps == bench.QUICK_STEPS
    assert cfg.model.image_size == 32 and cfg.continual.strategy == "naive"
    assert cfg.run_dir.parent == tmp_path / "runs"
    other = bench._train_overrides(bench.InferenceBenchConfig(train_steps=10), tmp_path)
    assert other[-1] != overrides[-1] and bench._train_overrides(quick, tmp_path)[-1] == overrides[-1]
    # Any dataset: the real-photo config trains on its first task, its data generated under the work folder.
    real = bench.InferenceBenchConfig.quick(str(REPO / "configs" / "real.yaml"))
    real_cfg = load_config(real.config, bench._train_overrides(real, tmp_path))
    assert real_cfg.sequence == [["real/coffee", "real/chelsea"]] and real_cfg.data.dataset == "real_photos"
    assert Path(real_cfg.data.root).parent == tmp_path and real_cfg.run_dir.name != cfg.run_dir.name


def test_stage_costs_count_the_work_of_each_stage(micro):
    model, extractor = micro
    eval_cfg = EvalConfig(anomaly_map=AnomalyMapConfig(sigma=1.0))
    costs = bench.stage_costs(model, extractor, eval_cfg, SIZE, presets=(), ddim_steps=10)
    assert list(costs) == ["measured"] and costs["measured"]["image_size"] == SIZE
    g = costs["measured"]["gmacs_per_image"]
    assert g["encode"] == g["decode"] == 0.0  # space-to-depth is a reshape
    assert g["unet_call"] > 0 and g["condition"] > 0 and g["maps"] > 0
    # Doubling the batch doubles the counted work: the count is per image and really measures the calls.
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.condition(torch.rand(2, 3, SIZE, SIZE))
    assert counter.get_total_flops() / 2e9 == pytest.approx(2 * g["condition"])
    bound = costs["measured"]["bounds"]
    shared = g["condition"]
    assert bound["denoise"] == 10.0
    assert bound["reconstruction"] == pytest.approx((shared + 10 * g["unet_call"]) / (shared + g["unet_call"]))
    assert 1.0 < bound["end_to_end"] < bound["reconstruction"] < 10.0
    assert "reconstruction" in bench.cost_lines(costs, 10)[0]


def test_speedup_bounds_on_known_costs():
    gmacs = {"encode": 1.0, "condition": 0.5, "unet_call": 2.0, "decode": 1.5, "maps": 3.0}
    bound = speedup_bounds(gmacs, ddim_steps=10)
    assert bound["reconstruction"] == pytest.approx((3.0 + 20.0) / (3.0 + 2.0))
    assert bound["end_to_end"] == pytest.approx((7.5 + 20.0) / (7.5 + 2.0))


def test_a_kept_model_trained_with_other_settings_is_refused_not_resumed(tmp_path):
    """The kept run's name comes from the overrides only, so an edited config file reaches the same name: the
    benchmark must name the changed key instead of reusing (or resuming) that model."""
    import json

    from cdad_dist.engine.run_dir import IDENTITY, run_identity
    from cdad_dist.errors import CheckpointError

    quick = bench.InferenceBenchConfig.quick()
    cfg = load_config(bench.DEFAULT_CONFIG, bench._train_overrides(quick, tmp_path))
    edited = run_identity(cfg, [bench.DEMO_TASK0])
    edited["config"]["train.lr"] = 0.1  # as if configs/demo.yaml had said lr 0.1 when the model was trained
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    (cfg.run_dir / IDENTITY).write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"bench inference: .* other settings \(train.lr: 0.1 → 0.0003\)"):
        bench.train_bench_model(quick, tmp_path, log=lambda *_: None)
