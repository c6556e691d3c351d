"""Bases are written once per task under the run directory and checkpoints reference them (issue: layer ownership,
storage): task-end checkpoints no longer carry copies, and a missing or altered basis file stops a resume with an
error naming the file."""
from __future__ import annotations

import os

import pytest
import torch

from cdad_dist.config import load_config
from cdad_dist.continual.store import BasisStore
from cdad_dist.engine.checkpoint import list_checkpoints, read_strategy_state
from cdad_dist.engine.trainer import train
from cdad_dist.errors import CheckpointError
from engine_utils import make_small_demo, micro_overrides


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storage")
    demo = make_small_demo(tmp / "demo_data")
    overrides = micro_overrides(tmp, demo, extra=["continual.strategy=cdad"])
    matrix = train(load_config(None, overrides))
    return tmp / "runs" / "t", overrides, matrix


def test_bases_are_written_once_per_task_and_checkpoints_reference_them(finished_run):
    run_dir, _, _ = finished_run
    files = sorted(p.name for p in (run_dir / "bases").iterdir())
    assert files == ["bases_task000.safetensors", "bases_task001.safetensors"]
    ends = [c for c in list_checkpoints(run_dir / "checkpoints") if c.task_end]
    for ref in ends:
        state = read_strategy_state(ref.path)
        assert state["bases"] == {} and state["bases_ref"]["file"] == f"bases/bases_task{ref.task:03d}.safetensors"
        store = BasisStore.load(run_dir / state["bases_ref"]["file"])
        assert store.task == ref.task and store.bases
        # the strategy state is now small: far below the bases it references
        assert os.path.getsize(ref.path / "strategy.pt") < os.path.getsize(run_dir / state["bases_ref"]["file"])


def test_resume_verifies_the_referenced_basis_file(finished_run, tmp_path):
    run_dir, overrides, matrix = finished_run
    cfg = load_config(None, overrides)
    assert train(cfg, resume=True) == matrix  # intact: loads, verifies, nothing left to run
    path = run_dir / "bases" / "bases_task001.safetensors"
    original = path.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[-1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="bases_task001.safetensors: sha256 differs"):
            train(cfg, resume=True)
        path.unlink()
        with pytest.raises(CheckpointError, match="bases_task001.safetensors: basis file missing"):
            train(cfg, resume=True)
    finally:
        path.write_bytes(original)


def test_without_a_run_directory_the_state_embeds_the_bases():
    from torch import nn

    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig

    net = nn.Sequential(nn.Linear(6, 4))
    strategy = CDADStrategy(ContinualConfig())
    strategy.begin_task(0, net)
    strategy.end_task(0, net, [{"image": torch.randn(16, 6)}], lambda b: net(b["image"]))
    state = strategy.state_dict()
    assert state["bases_ref"] is None and set(state["bases"]) == {"0"}
    again = CDADStrategy(ContinualConfig())
    again.load_state_dict(state)
    assert torch.equal(again.store.bases["0"], strategy.store.bases["0"])
