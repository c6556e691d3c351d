"""A very small run configuration for engine tests: a micro model on a small demo dataset, a few steps per task."""
from __future__ import annotations

from pathlib import Path

from cdad_dist.data.demo import make_demo_dataset

MICRO_OVERRIDES = [
    "model.image_size=32",
    "model.block_out_channels=[32, 32]",
    "model.attention_head_dim=2",
    "model.cross_attention_dim=16",
    "model.context_tokens=4",
    "model.amn_depth=1",
    "model.amn_heads=2",
    "model.amn_neighbour=3",
    "model.amn_local_channels=[4, 4, 8, 8, 8, 8, 16]",
    "data.batch_size=4",
    "data.samples_per_shard=4",
    "data.shard_image_size=32",
    "train.base_steps=4",
    "train.incremental_steps=3",
    "train.warmup_steps=0",
    "train.log_every=2",
    "eval.reconstruction.steps=2",
    "eval.max_test_per_class=4",
    "eval.batch_size=4",
    "eval.heatmap_images=1",
    "continual.capture.images=4",
    "continual.capture.ddim_steps=2",
    "sequence=[[demo/carpet], [demo/bottle]]",
]


def make_small_demo(root: Path) -> Path:
    return make_demo_dataset(root, size=32, n_train=8, n_test_good=2, n_test_bad=2, classes=["carpet", "bottle"])


def micro_overrides(tmp: Path, data_root: Path, name: str = "t", extra: list[str] | None = None) -> list[str]:
    return MICRO_OVERRIDES + [
        f"name={name}",
        f"output_dir={tmp / 'runs'}",
        f"data.root={data_root}",
        f"data.shards={tmp / 'shards'}",
    ] + list(extra or [])
