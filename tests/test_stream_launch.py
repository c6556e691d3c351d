"""Two ranks started by `accelerate launch` (the CPU recipe) stream disjoint samples that cover the task."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdad_dist.data.catalog import scan_folder
from cdad_dist.data.demo import make_demo_dataset
from cdad_dist.data.shards import build_shards
from dist_utils import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
def test_accelerate_launch_two_ranks_stream_disjoint_covering_samples(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", size=32, n_train=8, n_test_good=1, n_test_bad=1,
                             classes=["carpet", "nut"])
    records = scan_folder(root, "demo").records
    build_shards(records, tmp_path / "shards", image_size=32, samples_per_shard=4)
    classes = ["demo/carpet", "demo/nut"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu-2proc.yaml"),
           "--main_process_port", str(free_port()), str(REPO / "tests" / "scripts" / "stream_keys.py"),
           str(tmp_path / "shards"), str(tmp_path), ",".join(classes)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    keys0, keys1 = set(ranks[0]["keys"]), set(ranks[1]["keys"])
    assert not keys0 & keys1
    expected = {f"demo__{r.cls}__train__{i:06d}" for r in records if r.split == "train" for i in range(8)}
    assert keys0 | keys1 == expected
