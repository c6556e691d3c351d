"""Experience replay (continual/replay.py, data/replay_shards.py): the buffer, the batch mixing, the engine run."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from cdad_dist.config import load_config
from cdad_dist.continual.protocol import StrategyContext, build_strategy
from cdad_dist.data.replay_shards import buffer_bytes, chosen_positions, write_class_buffer
from cdad_dist.data.shards import build_shards, load_manifest, parse_sample_key
from cdad_dist.data.stream import StreamConfig, concat_batches, split_batch_size, train_stream
from cdad_dist.errors import CheckpointError, ConfigError
from engine_utils import make_small_demo, micro_overrides
from test_shards import make_records

SPEC = {"demo/a": (12, 4), "demo/b": (12, 4)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replay")
    build_shards(make_records(root / "data", SPEC), root / "shards", samples_per_shard=5)
    return root / "shards"


def test_split_batch_size_is_proportional_and_gives_every_source_a_sample():
    assert split_batch_size(8, [0.75, 0.25]) == [6, 2]
    assert split_batch_size(8, [1.0]) == [8]
    assert split_batch_size(4, [0.95, 0.05]) == [3, 1]  # rounding alone would starve the small source
    assert sum(split_batch_size(7, [1, 1, 1])) == 7
    with pytest.raises(ConfigError):
        split_batch_size(4, [0.0, 0.0])


def test_concat_batches_joins_tensors_and_lists_in_source_order():
    a = {"image": torch.zeros(2, 3, 4, 4), "cls": ["x", "x"]}
    b = {"image": torch.ones(1, 3, 4, 4), "cls": ["y"]}
    out = concat_batches([a, b])
    assert out["image"].shape[0] == 3 and out["cls"] == ["x", "x", "y"] and float(out["image"][2].mean()) == 1.0
    with pytest.raises(ConfigError, match="different fields"):
        concat_batches([a, {"image": b["image"]}])


def test_buffer_keeps_a_seeded_subset_byte_for_byte_and_reads_back_as_a_shard_set(shards, tmp_path):
    out = tmp_path / "buffer"
    group = write_class_buffer(shards, "demo/a", 5, out, seed=3)
    assert group["count"] == 5 and not list(out.glob("*.tmp"))
    again = write_class_buffer(shards, "demo/a", 5, tmp_path / "again", seed=3)
    assert again["shards"][0]["sha256"] == group["shards"][0]["sha256"]  # same seed: the same bytes
    other = write_class_buffer(shards, "demo/a", 5, tmp_path / "other", seed=4)
    assert other["shards"][0]["sha256"] != group["shards"][0]["sha256"]
    write_class_buffer(shards, "demo/b", 20, out, seed=3)  # more than the class has: all 12 kept
    manifest = load_manifest(out)
    assert manifest["groups"]["demo/b/train"]["count"] == 12 and set(buffer_bytes(out)) == {"demo/a", "demo/b"}
    batch = next(iter(train_stream(out, ["demo/a"], cfg=StreamConfig(batch_size=5, image_size=16, seed=0))))
    keys = sorted(batch["key"])
    assert all(parse_sample_key(k)[1] == "a" for k in keys) and batch["cls"] == ["demo/a"] * 5
    assert [parse_sample_key(k)[3] for k in keys] == chosen_positions(12, 5, 3, "demo/a")


def test_replay_mixes_old_classes_into_every_batch_at_the_configured_ratio(shards, tmp_path):
    strategy = build_strategy({"strategy": "replay", "replay": {"per_class": 6, "ratio": 0.25}})
    strategy.bind(StrategyContext(run_dir=tmp_path, shards=str(shards)))
    strategy.plan_tasks([["demo/a"], ["demo/b"]])
    assert [s.classes for s in strategy.training_sources(0, ["demo/a"])] == [("demo/a",)]
    strategy.end_task(0, None, [], lambda b: None)
    sources = strategy.training_sources(1, ["demo/b"])
    assert [(s.classes, s.weight, s.name) for s in sources] == [(("demo/b",), 0.75, "task"),
                                                                (("demo/a",), 0.25, "replay")]
    sizes = split_batch_size(8, [s.weight for s in sources])
    streams = [iter(train_stream(s.shards or shards, list(s.classes), cfg=StreamConfig(batch_size=n, image_size=16)))
               for s, n in zip(sources, sizes)]
    seen = Counter(c for _ in range(4) for c in concat_batches([next(s) for s in streams])["cls"])
    assert seen == {"demo/b": 24, "demo/a": 8}  # 2 of every 8 samples are replayed, every batch
    summary = strategy.summary()
    assert summary["replay"]["classes"] == ["demo/a"] and summary["replay"]["bytes_per_class"]["demo/a"] > 0


def test_a_resumed_replay_run_refuses_a_missing_buffer(shards, tmp_path):
    strategy = build_strategy({"strategy": "cdad+replay"})
    strategy.bind(StrategyContext(run_dir=tmp_path, shards=str(shards)))
    state = {**strategy.state_dict(), "replay_classes": ["demo/a"]}
    fresh = build_strategy({"strategy": "cdad+replay"})
    fresh.bind(StrategyContext(run_dir=tmp_path / "elsewhere", shards=str(shards)))
    with pytest.raises(CheckpointError, match="replay buffer"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("strategy", ["replay", "cdad+replay"])
def test_replay_through_the_engine_trains_on_old_classes_and_reports_its_buffer(tmp_path, strategy, monkeypatch):
    """Two tasks through the real trainer: task 1's batches hold task 0's class at the ratio, the buffer is in the
    run directory, and results.json carries the strategy's summary (for cdad+replay: the bases' fill too)."""
    from cdad_dist.engine import trainer as trainer_mod

    demo = make_small_demo(tmp_path / "demo_data")
    seen: dict[int, Counter] = {}
    original = trainer_mod.ContinualTrainer.training_batches

    def recorded(self, t, start_step):
        for batch in original(self, t, start_step):
            seen.setdefault(t, Counter()).update(batch["cls"])
            yield batch

    monkeypatch.setattr(trainer_mod.ContinualTrainer, "training_batches", recorded)
    cfg = load_config(None, micro_overrides(tmp_path, demo, extra=[
        f"continual.strategy={strategy}", "continual.replay.per_class=4", "continual.replay.ratio=0.5"]))
    trainer_mod.train(cfg)
    assert set(seen[0]) == {"demo/carpet"}
    assert seen[1]["demo/carpet"] == seen[1]["demo/bottle"] > 0  # batch 4, ratio 0.5: 2 + 2 per batch
    run_dir = tmp_path / "runs" / "t"
    assert load_manifest(run_dir / "replay")["groups"]["demo/carpet/train"]["count"] == 4
    results = json.loads((run_dir / "report" / "results.json").read_text())
    summary = results["strategy_summary"]
    assert summary["replay"]["classes"] == ["demo/carpet", "demo/bottle"]
    if strategy == "cdad+replay":
        assert len(summary["fill_per_task"]) == 2 and 0 < summary["fill_fraction"] <= 1
    assert "## Strategy: " + strategy in (run_dir / "report" / "results.md").read_text()


def test_a_mixed_stream_resumed_at_step_k_continues_exactly_where_the_uninterrupted_one_was(shards, tmp_path):
    """Resume with two sources: each source skips its own share of the k finished batches (the engine's
    ``training_batches``), so batch k of the resumed stream equals batch k of the uninterrupted one."""
    from types import SimpleNamespace

    from cdad_dist.engine.trainer import ContinualTrainer

    strategy = build_strategy({"strategy": "replay", "replay": {"per_class": 6, "ratio": 0.25}})
    strategy.bind(StrategyContext(run_dir=tmp_path, shards=str(shards)))
    strategy.plan_tasks([["demo/a"], ["demo/b"]])
    strategy.end_task(0, None, [], lambda b: None)
    cfg = load_config(None, [f"data.shards={shards}", "data.batch_size=8", "data.shuffle_buffer=4"])
    trainer = SimpleNamespace(cfg=cfg, strategy=strategy, tasks=[["demo/a"], ["demo/b"]], image_size=16,
                              accelerator=SimpleNamespace(process_index=0, num_processes=1),
                              synthesizer=lambda: None)  # no segmentation head
    uninterrupted = ContinualTrainer.training_batches(trainer, 1, 0)
    expected = [next(uninterrupted) for _ in range(5)][3:]
    resumed = ContinualTrainer.training_batches(trainer, 1, 3)
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"] and torch.equal(got["perturbed"], want["perturbed"])
