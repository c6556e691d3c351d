"""The strategy protocol (continual/protocol.py): registry, torch-free configs validated at load, the engine and the
reducer free of strategy / sketch type tests, joint's plan, CDAD's summary."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cdad_dist.config import config_from_dict, load_config
from cdad_dist.continual.config import ContinualConfig, ReplayConfig
from cdad_dist.continual.protocol import ContinualStrategy, build_strategy
from cdad_dist.continual.registry import SKETCH_REGISTRY, STRATEGY_REGISTRY
from cdad_dist.continual.sketches import SketchOptions, make_sketch
from cdad_dist.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "cdad_dist"


@pytest.mark.parametrize("name", sorted(STRATEGY_REGISTRY))
def test_every_registered_strategy_builds_by_name_and_summarises(name):
    strategy = build_strategy({"strategy": name})
    assert isinstance(strategy, ContinualStrategy) and strategy.name == name
    assert isinstance(strategy.summary(), dict) and strategy.state_dict()["name"] == name


def test_summary_is_required():
    class NoSummary(ContinualStrategy):
        name = "x"

    with pytest.raises(TypeError, match="summary"):
        NoSummary()


@pytest.mark.parametrize("kind", sorted(SKETCH_REGISTRY))
def test_every_registered_sketch_declares_its_reduction(kind):
    sketch = make_sketch(16, SketchOptions(kind=kind))
    assert sketch.kind == kind and sketch.reduction in ("sum", "merge")


@pytest.mark.parametrize("override, key", [
    ({"eval": {"reconstruction": {"mode": "fuzed"}}}, "mode"),
    ({"continual": {"strategy": "nope"}}, "continual.strategy"),
    ({"continual": {"sketch": "grams"}}, "continual.sketch"),
    ({"continual": {"capture": {"mode": "random"}}}, "capture.mode"),
    ({"continual": {"replay": {"ratio": 1.5}}}, "continual.replay.ratio"),
    ({"continual": {"basis_dtype": "float8"}}, "basis_dtype"),
])
def test_a_bad_value_fails_when_the_config_loads(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(override)


def test_built_directly_the_configs_validate_the_same_way():
    with pytest.raises(ConfigError, match="continual.project must be one of"):
        ContinualConfig(project="both")
    with pytest.raises(ConfigError, match="continual.replay.source"):
        ReplayConfig(source="generative-typo")
    from cdad_dist.eval.reconstruct import ReconstructionConfig

    with pytest.raises(ConfigError, match="eval.reconstruction.mode"):
        ReconstructionConfig(mode="fuzed")


def test_the_continual_config_is_torch_free():
    code = "import sys, cdad_dist.continual.config as c; c.ContinualConfig(); print('torch' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


def test_the_engine_and_reducer_test_no_strategy_or_sketch_by_name_or_type():
    names = "|".join(re.escape(n) for n in STRATEGY_REGISTRY)
    for path in (PACKAGE / "engine").glob("*.py"):
        hits = re.findall(rf"""["']({names})["']""", path.read_text())
        assert not hits, f"{path.name} names strategies {hits}"
    reducer = (PACKAGE / "continual" / "reducer.py").read_text()
    assert "isinstance(" not in reducer.replace("isinstance(U", "") and "GramSketch" not in reducer
    assert "cdad_dist.engine" not in "".join(p.read_text() for p in (PACKAGE / "continual").glob("*.py"))


def test_joint_plans_one_task_with_the_whole_budget():
    joint = build_strategy({"strategy": "joint"})
    assert joint.plan_tasks([["a"], ["b", "c"], ["d"]]) == [["a", "b", "c", "d"]]
    assert joint.task_steps(0, [300, 100, 100]) == 500
    naive = build_strategy({"strategy": "naive"})
    assert naive.plan_tasks([["a"], ["b"]]) == [["a"], ["b"]] and naive.task_steps(1, [300, 100]) == 100
    assert build_strategy({"strategy": "knn"}).task_steps(0, [300]) == 0


def test_only_strategies_that_capture_ask_for_images():
    assert build_strategy({"strategy": "naive"}).capture_plan(0) is None
    plan = build_strategy({"strategy": "cdad", "capture": {"images": 5, "perturbed": True}}).capture_plan(0)
    assert plan.images == 5 and plan.perturbed
    assert build_strategy({"strategy": "knn"}).capture_plan(0).images == 1.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_cdad_summary_reports_ranks_fill_bytes_and_layer_classes():
    torch.manual_seed(0)
    net = Net()
    strategy = build_strategy({"strategy": "cdad", "gamma": 0.99})
    assert strategy.summary() == {"tasks_done": 0}
    fills = []
    for task in range(2):
        strategy.begin_task(task, net)
        x = torch.randn(64, 3) @ torch.randn(3, 12)  # each task's inputs span 3 of fc1's 12 dimensions
        strategy.end_task(task, net, [{"image": x}], lambda b: net(b["image"]))
        fills.append(strategy.summary()["fill_fraction"])
    s = strategy.summary()
    assert s["tasks_done"] == 2 and s["fill_per_task"] == fills and fills[0] <= fills[1] <= 1.0
    assert s["d_total"] == 12 + 8 and 0 < s["k_total"] < 20 and s["bytes"] > 0
    assert s["layer_classes"]["fc1.other"]["k"] <= 6  # two tasks of rank-3 inputs
    assert s["bytes_vs_protected_weights"] > 0 and sum(r["layers"] for r in s["layer_classes"].values()) == 2


def test_the_engine_builds_the_strategy_from_the_config_it_loaded(tmp_path):
    cfg = load_config(None, ["continual.strategy=cdad+replay", "continual.replay.per_class=3"])
    strategy = build_strategy(cfg.continual)
    assert strategy.name == "cdad+replay" and strategy.cfg.replay.per_class == 3
