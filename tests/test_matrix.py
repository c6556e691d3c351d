"""Continual accuracy matrix: derived numbers against hand computations, JSON round trip, errors."""
from __future__ import annotations

import json
import math

import pytest

from cdad_dist.errors import CdadError
from cdad_dist.eval.matrix import AccuracyMatrix

TASKS = [["m/a", "m/b"], ["m/c"], ["m/d"]]
# after task 0: a, b; after task 1: a, b, c; after task 2: a, b, c, d
VALUES = {
    0: {"m/a": 0.90, "m/b": 0.80},
    1: {"m/a": 0.85, "m/b": 0.82, "m/c": 0.70},
    2: {"m/a": 0.80, "m/b": 0.60, "m/c": 0.75, "m/d": 0.95},
}


def _matrix(task_classes=None, metric="image_auroc") -> AccuracyMatrix:
    m = AccuracyMatrix(task_classes)
    for t, row in VALUES.items():
        for cls, v in row.items():
            m.record(metric, t, cls, v)
    return m


@pytest.mark.parametrize("task_classes", [None, TASKS])
def test_derived_numbers_match_hand_computation(task_classes):
    m = _matrix(task_classes)
    assert m.final_average("image_auroc") == pytest.approx((0.80 + 0.60 + 0.75 + 0.95) / 4)
    # diagonal: mean(mean(a, b after 0), c after 1, d after 2)
    assert m.diagonal_average("image_auroc") == pytest.approx((0.85 + 0.70 + 0.95) / 3)
    # FM over a, b, c: a max(.90, .85) - .80 = .10; b max(.80, .82) - .60 = .22; c .70 - .75 = -.05
    assert m.forgetting("image_auroc") == pytest.approx((0.10 + 0.22 - 0.05) / 3)
    assert m.step_average("image_auroc", 1) == pytest.approx((0.85 + 0.82 + 0.70) / 3)
    assert [m.own_task(c) for c in ["m/a", "m/b", "m/c", "m/d"]] == [0, 0, 1, 2]
    assert m.classes() == ["m/a", "m/b", "m/c", "m/d"]
    assert m.tasks("image_auroc") == [0, 1, 2]


def test_forgetting_with_explicit_last_task_classes_and_single_task():
    m = _matrix()
    # treat c as learned in the last task too: FM over a, b only
    assert m.forgetting("image_auroc", ["m/c", "m/d"]) == pytest.approx((0.10 + 0.22) / 2)
    joint = AccuracyMatrix([["m/a", "m/b", "m/c", "m/d"]])
    for cls, v in VALUES[2].items():
        joint.record("image_auroc", 0, cls, v + 0.05)
    assert math.isnan(joint.forgetting("image_auroc"))
    assert joint.diagonal_average("image_auroc") == pytest.approx(joint.final_average("image_auroc"))


def test_gap_to_joint():
    m = _matrix()
    joint = AccuracyMatrix()
    for cls, v in VALUES[2].items():
        joint.record("image_auroc", 0, cls, v + 0.05)
    assert m.gap_to(joint, "image_auroc") == pytest.approx(0.05)
    other = AccuracyMatrix()
    other.record("image_auroc", 0, "m/zzz", 1.0)
    with pytest.raises(CdadError, match="m/zzz"):
        m.gap_to(other, "image_auroc")


def test_json_round_trip_with_nan(tmp_path):
    m = _matrix(TASKS)
    m.record("pixel_aupro", 0, "m/a", float("nan"))
    m.record("pixel_aupro", 0, "m/b", 0.5)
    data = json.loads(json.dumps(m.to_dict(), allow_nan=False))  # strict JSON: NaN is stored as null
    assert data["values"]["pixel_aupro"]["0"]["m/a"] is None
    back = AccuracyMatrix.from_dict(data)
    assert back == m
    assert math.isnan(back.get("pixel_aupro", 0, "m/a"))
    assert back.task_classes == TASKS
    path = m.save_json(tmp_path / "sub" / "matrix.json")
    assert AccuracyMatrix.load_json(path) == m
    with pytest.warns(UserWarning, match="NaN"):
        assert back.final_average("pixel_aupro") == pytest.approx(0.5)


def test_record_overwrites_and_validates():
    m = AccuracyMatrix()
    m.record("image_auroc", 0, "m/a", 0.5)
    m.record("image_auroc", 0, "m/a", 0.6)
    assert m.get("image_auroc", 0, "m/a") == 0.6
    m.record_all(1, "m/a", {"image_auroc": 0.7, "pixel_auroc": 0.8})
    assert m.metrics == ["image_auroc", "pixel_auroc"]
    with pytest.raises(CdadError, match="after_task"):
        m.record("image_auroc", -1, "m/a", 0.5)
    with pytest.raises(CdadError, match="not a number"):
        m.record("image_auroc", 0, "m/a", "high")
    with pytest.raises(CdadError, match="no values for metric 'nope'"):
        m.final_average("nope")
    with pytest.raises(CdadError, match="m/zz"):
        m.get("image_auroc", 0, "m/zz")
    with pytest.raises(CdadError, match="format"):
        AccuracyMatrix.from_dict({"values": {}})
    with pytest.raises(CdadError, match="not found"):
        AccuracyMatrix.load_json("/nonexistent/matrix.json")


def test_summary_has_every_number():
    m = _matrix()
    s = m.summary("image_auroc", joint=m)
    assert s["gap_to_joint"] == 0.0
    assert set(s) == {"final_average", "diagonal_average", "forgetting", "step_average", "gap_to_joint",
                      "task_averaged", "per_task"}
    assert s["step_average"][2] == pytest.approx(m.final_average("image_auroc"))


@pytest.mark.parametrize("task_classes", [None, TASKS])
def test_per_task_numbers_weigh_each_task_once(task_classes):
    m = _matrix(task_classes)
    per_task = m.per_task("image_auroc")
    assert per_task[0]["final"] == pytest.approx((0.80 + 0.60) / 2)
    assert per_task[0]["forgetting"] == pytest.approx((0.10 + 0.22) / 2)
    assert per_task[1] == pytest.approx({"final": 0.75, "forgetting": -0.05})
    assert per_task[2]["final"] == 0.95 and math.isnan(per_task[2]["forgetting"])
    task_avg = m.task_averages("image_auroc")
    assert task_avg["final_average"] == pytest.approx((0.70 + 0.75 + 0.95) / 3)
    assert task_avg["forgetting"] == pytest.approx((0.16 - 0.05) / 2)
    # class-averaged numbers differ: task 0 has two classes and counts twice there
    assert m.final_average("image_auroc") != pytest.approx(task_avg["final_average"])
    assert m.forgetting("image_auroc") != pytest.approx(task_avg["forgetting"])
