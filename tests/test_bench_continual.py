"""`cdad bench continual`: the study's arithmetic on hand-made matrices, and one end-to-end run on a micro model."""
from __future__ import annotations

import json
import math

import pytest

from cdad_dist.bench.continual import (ContinualBenchConfig, aggregate, auroc_standard_error, markdown_table, run,
                                      summarise, summary_line)
from cdad_dist.data.demo import make_demo_dataset
from cdad_dist.errors import ConfigError
from cdad_dist.eval.matrix import AccuracyMatrix
from engine_utils import MICRO_OVERRIDES


def _matrix(rows: dict[int, dict[str, float]]) -> AccuracyMatrix:
    m = AccuracyMatrix()
    for t, row in rows.items():
        for cls, value in row.items():
            for metric in ("image_auroc", "pixel_auroc"):
                m.record(metric, t, cls, value)
    return m


def test_targets_are_computed_from_the_matrices():
    naive = _matrix({0: {"a": 1.0}, 1: {"a": 0.6, "b": 1.0}})  # forgets 40 points
    cdad = _matrix({0: {"a": 1.0}, 1: {"a": 0.95, "b": 0.9}})  # forgets 5
    joint = _matrix({0: {"a": 1.0, "b": 0.96}})
    out = summarise({"naive": naive, "cdad": cdad, "joint": joint})
    assert out["strategies"]["naive"]["image_auroc"]["FM"] == pytest.approx(40.0)
    assert out["strategies"]["cdad"]["image_auroc"]["A"] == pytest.approx(92.5)
    assert out["targets"]["fm_ratio_image"] == pytest.approx(5 / 40)
    assert out["targets"]["fm_ratio_met"] is True
    assert out["targets"]["a_minus_joint_points_image"] == pytest.approx(92.5 - 98.0)
    assert out["targets"]["joint_gap_met"] is False
    assert math.isnan(out["strategies"]["joint"]["image_auroc"]["FM"])
    line = summary_line(out)
    assert "FM(cdad)/FM(naive) = 0.125" in line and "NOT MET" in line


def test_every_projection_row_is_checked_against_the_same_naive_and_joint_rows():
    """An ablation row (cdad-synthetic) gets its own target check; the top-level keys stay cdad's."""
    naive = _matrix({0: {"a": 1.0}, 1: {"a": 0.6, "b": 1.0}})
    cdad = _matrix({0: {"a": 1.0}, 1: {"a": 0.95, "b": 0.9}})
    synthetic = _matrix({0: {"a": 1.0}, 1: {"a": 0.8, "b": 0.9}})  # forgets 20 of naive's 40: ratio 0.5
    joint = _matrix({0: {"a": 1.0, "b": 0.96}})
    out = summarise({"naive": naive, "cdad": cdad, "cdad-synthetic": synthetic, "joint": joint})
    assert out["targets"]["fm_ratio_image"] == pytest.approx(5 / 40) and out["targets"]["fm_ratio_met"]
    variant = out["targets"]["variants"]["cdad-synthetic"]
    assert variant["fm_ratio_image"] == pytest.approx(20 / 40) and variant["fm_ratio_met"] is False
    assert variant["a_minus_joint_points_image"] == pytest.approx(85.0 - 98.0)
    line = summary_line(out)
    assert "FM(cdad)/FM(naive) = 0.125" in line and "FM(cdad-synthetic)/FM(naive) = 0.500" in line
    assert "cdad-synthetic" not in ContinualBenchConfig().strategies  # an ablation runs only when named


def test_a_baseline_that_does_not_forget_cannot_meet_the_ratio_target():
    flat = _matrix({0: {"a": 0.9}, 1: {"a": 0.9, "b": 0.9}})
    out = summarise({"naive": flat, "cdad": flat})
    assert out["targets"]["fm_ratio_met"] is False and math.isnan(out["targets"]["fm_ratio_image"])


def test_unknown_strategy_and_zero_seeds_are_refused():
    with pytest.raises(ConfigError, match="unknown strategies"):
        ContinualBenchConfig(strategies=["naive", "ewc"])
    with pytest.raises(ConfigError, match="seeds"):
        ContinualBenchConfig(seeds=0)


def test_seeds_are_aggregated_to_mean_and_std_and_the_table_states_the_noise():
    one = summarise({"naive": _matrix({0: {"a": 1.0}, 1: {"a": 0.6, "b": 1.0}}),
                     "cdad": _matrix({0: {"a": 1.0}, 1: {"a": 0.95, "b": 0.9}})})
    two = summarise({"naive": _matrix({0: {"a": 0.9}, 1: {"a": 0.7, "b": 0.8}}),
                     "cdad": _matrix({0: {"a": 0.9}, 1: {"a": 0.9, "b": 0.8}})})
    agg = aggregate([one, two])
    naive = agg["strategies"]["naive"]["image_auroc"]
    assert naive["FM"] == pytest.approx(30.0) and naive["FM_std"] == pytest.approx(math.sqrt(200.0))
    assert naive["steps"][1] == pytest.approx((80.0 + 75.0) / 2) and agg["n_seeds"] == 2
    assert agg["targets"]["fm_ratio_image"] == pytest.approx(2.5 / 30.0)
    table = markdown_table(agg, (15, 15))
    assert "| naive | 77.5 ± 3.5 |" in table and "Mean ± std over 2 seeds" in table
    se = 100 * auroc_standard_error(0.9, 15, 15)
    assert 4.0 < se < 7.0 and f"standard error of {se:.1f} points at AUROC 0.9" in table


@pytest.mark.slow
def test_end_to_end_on_a_micro_model_writes_json_table_and_figure(tmp_path):
    micro = [o for o in MICRO_OVERRIDES if not o.startswith(("sequence=", "train.base_steps", "train.incremental"))]
    micro.append("eval.anomaly_map.input_size=null")  # the demo's 224-px extractor input costs time for nothing here
    # A small copy of the six-class demo data where the benchmark looks for it (it generates the full one otherwise).
    make_demo_dataset(tmp_path / "demo_data", size=32, n_train=8, n_test_good=2, n_test_bad=2)
    cfg = ContinualBenchConfig(base_steps=2, incremental_steps=2, max_test_per_class=2, capture_images=2,
                               extra_overrides=micro)
    result = run(True, tmp_path, cfg=cfg, log=lambda *a: None)
    assert set(result["strategies"]) == {"naive", "cdad", "cdad-grad", "cdad-paper", "joint", "knn", "replay-buffer",
                                         "cdad+replay-buffer"}
    assert result["train_seconds"][0]["base_task"] is not None
    saved = json.loads((tmp_path / "continual.json").read_text())
    assert saved["summary"] == result["summary"] and "FM(cdad)/FM(naive)" in saved["summary"]
    table = (tmp_path / "continual.md").read_text()
    assert table.count("|") > 20 and (tmp_path / "continual.png").stat().st_size
    # Per task: the diagonal (plasticity) for every strategy, and the projection's fill fraction for cdad rows.
    assert "| cdad | 1 |" in table and "| replay-buffer | 1 |" in table
    fill = result["strategies"]["cdad"]["fill_per_task"]
    assert len(fill) == len(result["strategies"]["cdad"]["per_task"]) == 3
    assert 0.0 < fill[0] <= fill[1] <= fill[2] <= 1.0  # bases only grow: saturation shows as fill -> 1
    # The four continual strategies started from the one shared base task, whose row 0 they all report.
    rows = {name: r["image_auroc"]["steps"][0] for name, r in result["strategies"].items()
            if name not in ("joint", "knn")}  # knn trains nothing: it runs on its own
    assert len(set(rows.values())) == 1
    again = run(True, tmp_path, cfg=cfg, log=lambda *a: None)  # finished runs are reused, not retrained
    assert all(v is None for v in again["train_seconds"][0].values())
