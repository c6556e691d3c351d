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


def _bases_for_file():
    g = torch.Generator().manual_seed(0)
    column = torch.linalg.qr(torch.randn(7, 7, generator=g))[0][:, 2:3]  # a d × 1 slice with stride 7
    assert column.stride(-1) != 1  # torch calls it contiguous, but .view(torch.uint8) refuses it
    return {"a.col": column, "b.wide": torch.randn(5, 3, generator=g), "c.empty": torch.empty(4, 0)}


def test_the_streamed_file_is_a_plain_safetensors_file(tmp_path):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    from cdad_dist.continual.store import bases_digest

    bases = _bases_for_file()
    store = BasisStore(bases=bases, task=2, complement={"c.empty"})
    path = store.save(tmp_path, dtype="bfloat16")
    back = load_file(str(path))  # the library reads (and validates) what the streamed writer wrote
    assert set(back) == set(bases)
    for name, U in bases.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], U.to(torch.bfloat16)), name
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["task"] == "2" and meta["dtype"] == "bfloat16" and meta["complement"] == '["c.empty"]'
    with store.open_file(tmp_path / "again", "float32") as writer:
        for name in store.names():
            writer.write(name, bases[name])
    assert writer.sha256 == hashlib.sha256(writer.path.read_bytes()).hexdigest()
    loaded = BasisStore.load(writer.path)
    assert loaded.complement == {"c.empty"} and loaded.rank("c.empty") == 4
    assert BasisStore.file_digest(writer.path) == bases_digest(loaded.bases) == bases_digest(bases)


def test_a_partial_load_holds_some_layers_and_knows_all(tmp_path):
    store = BasisStore(bases=_bases_for_file(), task=0, complement={"c.empty"})
    path = store.save(tmp_path)
    part = BasisStore.load(path, names=["b.wide"])
    assert sorted(part.bases) == ["b.wide"] and not part.complete
    assert part.names() == ["a.col", "b.wide", "c.empty"]
    assert (part.dim("a.col"), part.rank("a.col"), part.rank("c.empty")) == (7, 1, 4)
    assert part.total_bytes() == store.total_bytes() and part.held_bytes() == 5 * 3 * 4
    with pytest.raises(CheckpointError, match="held by another rank"):
        part.basis("a.col")
    with pytest.raises(CheckpointError, match="holds 1 of 3 layers"):
        part.save(tmp_path / "partial")


def test_an_interrupted_write_leaves_no_file(tmp_path):
    store = BasisStore(bases=_bases_for_file(), task=0)
    with pytest.raises(ValueError, match="expected tensor 'a.col'"):
        with store.open_file(tmp_path, "float32") as writer:
            writer.write("b.wide", store.bases["b.wide"])  # out of order
    with pytest.raises(ValueError, match="never written"):
        with store.open_file(tmp_path, "float32") as writer:
            writer.write("a.col", store.bases["a.col"])
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
