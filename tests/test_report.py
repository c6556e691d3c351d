"""Reports: files, tables, figures and run comparison."""
from __future__ import annotations

import csv
import json
import math

import matplotlib.image as mpimg
import pytest
import torch

from cdad_dist.errors import CdadError
from cdad_dist.eval.matrix import AccuracyMatrix
from cdad_dist.eval.metrics import METRIC_NAMES
from cdad_dist.eval.report import compare_runs, load_results, save_heatmap_grid, write_report

TASKS = [["demo/carpet", "demo/grid"], ["demo/bottle"], ["demo/screw"]]


def _matrix(tasks, base: float, drop: float) -> AccuracyMatrix:
    """Value = base − drop × (tasks since the class was learned) + a per-class offset."""
    m = AccuracyMatrix(tasks)
    seen: list[str] = []
    for t, new in enumerate(tasks):
        seen += new
        for i, cls in enumerate(seen):
            for j, metric in enumerate(METRIC_NAMES):
                m.record(metric, t, cls, base - drop * (t - m.own_task(cls)) + 0.01 * i - 0.005 * j)
    return m


def test_write_report_files(tmp_path):
    m = _matrix(TASKS, 0.9, 0.05)
    m.record("pixel_aupro", 2, "demo/screw", float("nan"))  # an undefined cell
    with pytest.warns(UserWarning, match="undefined"):
        paths = write_report(tmp_path / "run", m, TASKS, {"setting": "demo 2-1x2", "strategy": "cdad", "seconds": 12.5})
    assert {"json", "markdown", "csv"} <= set(paths)
    assert all(p.is_file() for p in paths.values())

    data = json.loads(paths["json"].read_text())  # strict JSON (NaN -> null)
    assert data["tasks"] == TASKS and data["strategy"] == "cdad" and data["extra"]["seconds"] == 12.5
    assert data["summary"]["image_auroc"]["final_average"] == pytest.approx(m.final_average("image_auroc"))
    assert data["summary"]["image_auroc"]["forgetting"] == pytest.approx(m.forgetting("image_auroc"))
    assert data["matrix"]["values"]["pixel_aupro"]["2"]["demo/screw"] is None
    assert AccuracyMatrix.from_dict(data["matrix"]) == m

    md = paths["markdown"].read_text()
    assert "| Setting | Method | A-AUROC (↑) | FM (↓)" in md
    a_img, a_pix = m.final_average("image_auroc"), m.final_average("pixel_auroc")
    assert f"{100 * a_img:.1f} / {100 * a_pix:.1f}" in md
    assert "| Step | 1-2 | 3 | 4 | FM |" in md  # Table 5 shape: cumulative class indices
    assert md.count("### After task") == 3 and "| demo/bottle | 1 |" in md
    assert "averaged over **classes**" in md  # the reader is told what A and FM average over
    per_task = m.per_task("image_auroc")
    assert f"| 0 | demo/carpet, demo/grid | {100 * per_task[0]['final']:.1f} / " in md
    task_avg = m.task_averages("image_auroc")
    assert f"| **task-averaged** | | {100 * task_avg['final_average']:.1f} / " in md
    assert data["summary"]["image_auroc"]["per_task"]["1"]["forgetting"] == pytest.approx(0.05)

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 3 + 4  # classes seen after each task
    screw_last = [r for r in rows if r["class"] == "demo/screw" and r["after_task"] == "2"][0]
    assert screw_last["pixel_aupro"] == "" and float(screw_last["image_auroc"]) == pytest.approx(0.93)

    for metric in METRIC_NAMES:
        img = mpimg.imread(paths[f"fig:{metric}"])
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_report_rejects_an_empty_matrix(tmp_path):
    with pytest.raises(CdadError, match="empty"):
        write_report(tmp_path, AccuracyMatrix(), TASKS, {})


def test_heatmap_grid(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=gen)
    maps = torch.zeros(3, 1, 32, 32)
    maps[2, :, 10:20, 10:20] = 5.0
    masks = (maps > 0).float()
    path = save_heatmap_grid(tmp_path / "grid" / "carpet.png", images, images * 0.8, maps, masks, ["good", "good", "cut"])
    img = mpimg.imread(path)
    assert img.shape[0] > 3 * 150 and img.shape[1] > 4 * 150  # 3 rows × 4 columns
    with pytest.raises(CdadError, match="titles 2"):
        save_heatmap_grid(tmp_path / "x.png", images, images, maps, masks, ["a", "b"])
    with pytest.raises(CdadError, match="B×3×H×W"):
        save_heatmap_grid(tmp_path / "x.png", images[:, :1], images, maps, masks, ["a", "b", "c"])


def test_compare_runs(tmp_path):
    naive, cdad = _matrix(TASKS, 0.9, 0.10), _matrix(TASKS, 0.9, 0.01)
    joint_tasks = [[c for t in TASKS for c in t]]
    joint = _matrix(joint_tasks, 0.95, 0.0)
    for name, m, tasks in [("naive", naive, TASKS), ("cdad", cdad, TASKS), ("joint", joint, joint_tasks)]:
        write_report(tmp_path / name, m, tasks, {"setting": "demo", "strategy": name})
    md = compare_runs([tmp_path / "naive", tmp_path / "cdad", tmp_path / "joint"])
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Run | Strategy | Setting | A-AUROC")
    assert len(lines) == 5
    gap_img = joint.final_average("image_auroc") - naive.final_average("image_auroc")
    gap_pix = joint.final_average("pixel_auroc") - naive.final_average("pixel_auroc")
    naive_row = next(line for line in lines if line.startswith("| naive |"))
    assert naive_row.endswith(f"| {100 * gap_img:.2f} / {100 * gap_pix:.2f} |")
    assert "| joint | joint | demo |" in md and math.isnan(joint.forgetting("image_auroc"))
    assert load_results(tmp_path / "cdad")["name"] == "cdad"
    with pytest.raises(CdadError, match="results.json"):
        compare_runs([tmp_path / "missing"])


def test_every_class_of_a_long_sequence_gets_its_own_line_style():
    from cdad_dist.eval.report import class_style

    styles = [class_style(i) for i in range(30)]
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 30
    assert len({s["color"] for s in styles[:10]}) == 10  # one pass: ten clearly different colours
