"""Launch recipes: the torchrun alternative really starts 2 ranks on CPU; accelerate configs are well-formed."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cdad_dist.engine.checkpoint import list_checkpoints
from dist_utils import free_port
from engine_utils import make_small_demo, micro_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["cpu-2proc.yaml", "1gpu.yaml", "8gpu.yaml", "multinode.yaml"])
def test_accelerate_configs_are_well_formed(name):
    cfg = yaml.safe_load((REPO / "launch" / name).read_text())
    assert cfg["distributed_type"] in ("MULTI_GPU", "NO")
    assert cfg["use_cpu"] is False  # `--cpu` / use_cpu starts ONE process on a CPU machine
    assert cfg["num_processes"] >= 1


@pytest.mark.distributed
def test_torchrun_script_runs_two_ranks_and_resumes(tmp_path):
    data = make_small_demo(tmp_path / "demo_data")
    args = []
    for item in micro_overrides(tmp_path, data, name="tr", extra=["tasks=0:1"]):
        args += ["--set", item]
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "launch" / "torchrun.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    refs = list_checkpoints(tmp_path / "runs" / "tr" / "checkpoints")
    assert refs and refs[-1].task_end
    assert (refs[-1].path / "random_states_1.pkl").exists()  # two ranks took part
