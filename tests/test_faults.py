"""Kill -9 and resume, on 2 CPU processes: no finished work is lost and the result is bit-identical.

One job is killed (SIGKILL, see `cdad_dist/faults.py`) during training, then its resumed job is killed during the
basis capture, then that one during evaluation; a last `--resume` finishes the run. Its final bases, accuracy
matrix and weights must equal those of an uninterrupted run with the same seed, bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdad_dist.engine.checkpoint import latest_checkpoint, list_checkpoints
from dist_utils import accelerate_launch_cmd
from engine_utils import make_small_demo, micro_overrides

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _launch(tmp: Path, demo: Path, name: str, *, fault: str | None = None, resume: bool = False):
    overrides = micro_overrides(tmp, demo, name=name, extra=["train.checkpoint_every=2", "continual.strategy=cdad"])
    cmd = accelerate_launch_cmd(REPO / "launch" / "cpu-2proc.yaml", REPO / "train.py", overrides)
    if resume:
        cmd.append("--resume")
    env = {k: v for k, v in os.environ.items() if k != "CDAD_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["CDAD_FAULT"] = fault
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.monotonic() - start


def _final(run_dir: Path) -> tuple[dict, dict, dict]:
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    assert last.task_end and last.task == 1, last
    strategy = torch.load(last.path / "strategy.pt", weights_only=False)
    state = json.loads((last.path / "state.json").read_text())
    assert strategy["bases"] == {}  # the checkpoint references the task's basis file instead of a copy
    bases = load_file(str(run_dir / strategy["bases_ref"]["file"]))
    return bases, state["matrix"], load_file(str(last.path / "model.safetensors"))


def test_sigkill_in_training_capture_and_evaluation_then_resume_is_bit_exact(tmp_path):
    demo = make_small_demo(tmp_path / "demo_data")
    reference, _ = _launch(tmp_path, demo, "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    expected_resume_point = {"train:1:2": "task001-step0000002", "capture:1:0": "task001-step0000003",
                             "eval:1:0": "task001-step0000003"}
    for i, (fault, resume_point) in enumerate(expected_resume_point.items()):
        killed, seconds = _launch(tmp_path, demo, "killed", fault=fault, resume=i > 0)
        assert killed.returncode != 0, f"{fault}: the job was not killed"
        assert f"CDAD_FAULT: rank 0 kills itself ({fault.split(':')[0]}" in killed.stdout
        # The surviving rank does not hang: the launcher ends the job as soon as rank 0 dies.
        assert seconds < 300, f"{fault}: the job took {seconds:.0f} s to end after a rank died"
        assert latest_checkpoint(ckpts).path.name == resume_point, fault
    finished, _ = _launch(tmp_path, demo, "killed", resume=True)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ref_bases, ref_matrix, ref_weights = _final(tmp_path / "runs" / "reference")
    bases, matrix, weights = _final(tmp_path / "runs" / "killed")
    assert matrix == ref_matrix
    assert bases.keys() == ref_bases.keys() and bases
    assert all(torch.equal(bases[k], ref_bases[k]) for k in bases)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
