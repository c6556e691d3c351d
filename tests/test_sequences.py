"""Named and inline task sequences."""
from __future__ import annotations

import pytest

from cdad_dist.data import demo
from cdad_dist.data.sequences import (
    DEMO_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
    TaskSequence,
    named_sequence,
    one_class_per_task,
    resolve_sequence,
    sequence_names,
)
from cdad_dist.errors import CdadError, ConfigError

BASE10 = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw"]
VISA8 = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1"]


def bare(tasks: list[list[str]]) -> list[list[str]]:
    return [[c.split("/", 1)[1] for c in t] for t in tasks]


def test_class_lists() -> None:
    assert list(MVTEC_CLASSES) == sorted(MVTEC_CLASSES) and len(MVTEC_CLASSES) == 15
    assert list(VISA_CLASSES) == sorted(VISA_CLASSES) and len(VISA_CLASSES) == 12
    assert DEMO_CLASSES == demo.DEMO_CLASSES
    assert sorted(DEMO_CLASSES) == sorted(demo.TEXTURE_CLASSES + demo.OBJECT_CLASSES)


def test_mvtec_settings_match_the_authors_task_lists() -> None:
    s1 = named_sequence("14-1")
    assert bare(s1.tasks) == [list(MVTEC_CLASSES[:14]), ["zipper"]]
    s2 = named_sequence("10-5")
    assert bare(s2.tasks) == [BASE10, ["tile", "toothbrush", "transistor", "wood", "zipper"]]
    s3 = named_sequence("3x5")
    assert bare(s3.tasks) == [
        ["bottle", "cable", "capsule"], ["carpet", "grid", "hazelnut"], ["leather", "metal_nut", "pill"],
        ["screw", "tile", "toothbrush"], ["transistor", "wood", "zipper"],
    ]  # fmt: skip
    s4 = named_sequence("10-1x5")
    assert bare(s4.tasks) == [BASE10, ["tile"], ["toothbrush"], ["transistor"], ["wood"], ["zipper"]]
    assert [len(s) for s in (s1, s2, s3, s4)] == [2, 2, 5, 6]
    assert all(c.startswith("mvtec/") for s in (s1, s2, s3, s4) for c in s.all_classes())


def test_visa_settings() -> None:
    assert bare(named_sequence("11-1").tasks) == [list(VISA_CLASSES[:11]), ["pipe_fryum"]]
    assert bare(named_sequence("8-4").tasks) == [VISA8, ["pcb2", "pcb3", "pcb4", "pipe_fryum"]]
    assert bare(named_sequence("8-1x4").tasks) == [VISA8, ["pcb2"], ["pcb3"], ["pcb4"], ["pipe_fryum"]]
    assert named_sequence("8-4").datasets() == ["visa"]


def test_cross_dataset() -> None:
    m2v = named_sequence("mvtec-to-visa")
    assert m2v.tasks == [[f"mvtec/{c}" for c in MVTEC_CLASSES], [f"visa/{c}" for c in VISA_CLASSES]]
    v2m = named_sequence("visa-to-mvtec")
    assert v2m.tasks == m2v.tasks[::-1] and v2m.datasets() == ["visa", "mvtec"]


def test_demo_sequences() -> None:
    s = named_sequence("demo-3x2")
    assert s.tasks == [["demo/carpet", "demo/bottle"], ["demo/grid", "demo/nut"], ["demo/wood", "demo/pill"]]
    assert len(named_sequence("demo-2x3")) == 2 and len(named_sequence("demo-1x6")) == 6


def test_seen_and_eval_classes() -> None:
    s = named_sequence("10-1x5")
    assert s.classes_seen(0) == [f"mvtec/{c}" for c in BASE10]
    assert s.eval_classes(2) == [f"mvtec/{c}" for c in BASE10 + ["tile", "toothbrush"]]
    assert s.new_classes(2) == ["mvtec/toothbrush"]
    assert s.eval_classes(len(s) - 1) == [f"mvtec/{c}" for c in MVTEC_CLASSES]
    assert s.task_of("mvtec/wood") == 4
    with pytest.raises(IndexError):
        s.classes_seen(6)
    with pytest.raises(ConfigError, match="mvtec/nothing"):
        s.task_of("mvtec/nothing")


def test_aliases_and_unknown_name() -> None:
    assert named_sequence("3×5").tasks == named_sequence("mvtec-3x5").tasks == named_sequence("3x5").tasks
    assert named_sequence("visa-8-4").name == "8-4"
    with pytest.raises(ConfigError, match="7-7"):
        resolve_sequence("7-7")
    assert "one-class-per-task" in sequence_names() and "10-1x5" in sequence_names()


def test_resolve_inline_with_dataset() -> None:
    s = resolve_sequence([["bottle", "cable"], ["mvtec/zipper"]], dataset="mvtec")
    assert s.tasks == [["mvtec/bottle", "mvtec/cable"], ["mvtec/zipper"]] and s.name == "inline"
    t = resolve_sequence("carpet,bottle|grid", dataset="demo")
    assert t.tasks == [["demo/carpet", "demo/bottle"], ["demo/grid"]]


def test_resolve_inline_qualifies_from_available() -> None:
    available = ["mvtec/bottle", "mvtec/pill", "visa/candle", "visa/capsules"]
    s = resolve_sequence([["bottle", "candle"], ["pill"]], available_classes=available)
    assert s.tasks == [["mvtec/bottle", "visa/candle"], ["mvtec/pill"]]
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_sequence([["pill"]], available_classes=["mvtec/pill", "demo/pill"])
    with pytest.raises(ConfigError, match="screw"):
        resolve_sequence([["screw"]], available_classes=available)
    with pytest.raises(ConfigError, match="not qualified"):
        resolve_sequence([["screw"]])


def test_validation_errors() -> None:
    with pytest.raises(ConfigError, match="task 1 is empty"):
        resolve_sequence([["a"], []], dataset="demo")
    with pytest.raises(ConfigError, match="demo/a.*twice"):
        resolve_sequence([["a", "b"], ["a"]], dataset="demo")
    with pytest.raises(ConfigError, match="no tasks"):
        resolve_sequence([], dataset="demo")
    with pytest.raises(ConfigError, match="string"):
        resolve_sequence(["ab"], dataset="demo")
    with pytest.raises(ConfigError, match="qualified"):
        TaskSequence("x", [["a/b/c"]])
    assert issubclass(ConfigError, CdadError)


def test_available_classes_check_names_the_class() -> None:
    avail = [f"mvtec/{c}" for c in MVTEC_CLASSES if c != "wood"]
    with pytest.raises(ConfigError, match="'mvtec/wood' \\(task 4\\)"):
        resolve_sequence("10-1x5", available_classes=avail)
    assert len(resolve_sequence("10-5", available_classes=MVTEC_CLASSES, dataset="mvtec")) == 2
    with pytest.raises(ConfigError, match="visa/candle"):
        resolve_sequence("mvtec-to-visa", available_classes=MVTEC_CLASSES, dataset="mvtec")


def test_one_class_per_task() -> None:
    s = resolve_sequence("one-class-per-task", available_classes=["b", "a", "c"], dataset="demo")
    assert s.tasks == [["demo/b"], ["demo/a"], ["demo/c"]] and len(s) == 3
    assert one_class_per_task(["x", "y"], "d").tasks == [["d/x"], ["d/y"]]
    with pytest.raises(ConfigError, match="available"):
        resolve_sequence("one-class-per-task")


def test_task_sequence_passthrough_and_dict() -> None:
    s = named_sequence("8-4")
    assert resolve_sequence(s, available_classes=[f"visa/{c}" for c in VISA_CLASSES]) is s
    assert s.to_dict() == {"name": "8-4", "tasks": s.tasks}
