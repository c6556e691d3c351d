"""The task loop end to end on a micro model: checkpoints, resume = uninterrupted, run-directory guard, 2 processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdad_dist.config import load_config
from cdad_dist.continual.store import BasisStore
from cdad_dist.engine.checkpoint import list_checkpoints, latest_checkpoint, verify_checkpoint
from cdad_dist.engine.trainer import train
from cdad_dist.errors import CheckpointError
from cdad_dist.faults import InjectedFault
from dist_utils import accelerate_launch_cmd, run_first_task_then_resume
from engine_utils import make_small_demo, micro_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_small_demo(tmp_path_factory.mktemp("demo") / "demo_data")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    return load_file(str(last.path / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_two_task_run_writes_checkpoints_report_and_matrix(tmp_path, demo_root):
    cfg = load_config(None, micro_overrides(tmp_path, demo_root))
    matrix = train(cfg)
    run_dir = tmp_path / "runs" / "t"
    refs = list_checkpoints(run_dir / "checkpoints")
    assert [(r.task, r.task_end) for r in refs if r.task_end] == [(0, True), (1, True)]
    for ref in refs:
        verify_checkpoint(ref.path)
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert results["tasks"] == [["demo/carpet"], ["demo/bottle"]]
    image_auroc = matrix["values"]["image_auroc"]
    assert set(image_auroc) == {"0", "1"} and set(image_auroc["1"]) == {"demo/carpet", "demo/bottle"}
    assert (run_dir / "report" / "results.md").read_text().strip()
    assert list((run_dir / "report" / "heatmaps").glob("*.png"))
    strategy_state = torch.load(refs[-1].path / "strategy.pt", weights_only=False)
    # the checkpoint references the bases of both tasks, written once under the run directory (not merely some
    # non-empty state)
    assert strategy_state["name"] == "cdad" and strategy_state["tasks_done"] == 2 and strategy_state["bases"] == {}
    bases = BasisStore.load(run_dir / strategy_state["bases_ref"]["file"])
    assert bases.task == 1 and any(U.shape[1] > 0 for U in bases.bases.values())
    summary = results["strategy_summary"]  # the strategy's summary reaches results.json and results.md
    assert 0 < summary["fill_fraction"] <= 1 and len(summary["fill_per_task"]) == 2
    assert "## Strategy: cdad" in (run_dir / "report" / "results.md").read_text()


def test_resume_mid_task_reproduces_uninterrupted_run(tmp_path, demo_root, monkeypatch):
    extra = ["train.checkpoint_every=2", "continual.strategy=naive"]
    train(load_config(None, micro_overrides(tmp_path, demo_root, name="full", extra=extra)))

    # The same run, crashing in task 1 right after its mid-task checkpoint at step 2 (of 3): the fault injection
    # of the SIGKILL tests, raising in-process instead of killing the test process.
    monkeypatch.setenv("CDAD_FAULT", "train:1:2:0:raise")
    cut_cfg = load_config(None, micro_overrides(tmp_path, demo_root, name="cut", extra=extra))
    with pytest.raises(InjectedFault):
        train(cut_cfg)
    monkeypatch.delenv("CDAD_FAULT")
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    (ckpts / ".tmp-task001-step0000003").mkdir()  # a half-written checkpoint must be ignored
    assert latest_checkpoint(ckpts).path.name == "task001-step0000002"
    train(load_config(None, micro_overrides(tmp_path, demo_root, name="cut", extra=extra)), resume=True)
    _assert_same_weights(_final_weights(tmp_path / "runs" / "full"), _final_weights(tmp_path / "runs" / "cut"))


def test_task_slices_continue_from_previous_task(tmp_path, demo_root):
    extra = ["continual.strategy=cdad"]
    whole = load_config(None, micro_overrides(tmp_path, demo_root, name="whole", extra=extra))
    train(whole)
    first = load_config(None, micro_overrides(tmp_path, demo_root, name="sliced", extra=extra + ["tasks=0:1"]))
    train(first)
    second = load_config(None, micro_overrides(tmp_path, demo_root, name="sliced", extra=extra + ["tasks=1:2"]))
    saved_config = (tmp_path / "runs" / "sliced" / "config.yaml").read_text()
    train(second, resume=True)  # `tasks` may change on resume (RESUMABLE_KEYS); config.yaml is the run's own
    assert (tmp_path / "runs" / "sliced" / "config.yaml").read_text() == saved_config
    _assert_same_weights(_final_weights(tmp_path / "runs" / "whole"), _final_weights(tmp_path / "runs" / "sliced"))


def test_run_directory_is_never_overwritten(tmp_path, demo_root):
    cfg = load_config(None, micro_overrides(tmp_path, demo_root, name="guard", extra=["tasks=0:1"]))
    train(cfg)
    run_dir = tmp_path / "runs" / "guard"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(load_config(None, micro_overrides(tmp_path, demo_root, name="guard", extra=["tasks=0:1"])))
    other = micro_overrides(tmp_path, demo_root, name="guard", extra=["model.amn_depth=2"])
    with pytest.raises(CheckpointError, match="model.amn_depth: 1 → 2"):
        train(load_config(None, other), resume=True)
    # every result-affecting key is compared, not only the model and strategy: named with both values
    other = micro_overrides(tmp_path, demo_root, name="guard", extra=["tasks=0:1", "train.lr=0.1", "eval.metrics.pro_fpr_limit=0.1"])
    with pytest.raises(CheckpointError, match=r"eval.metrics.pro_fpr_limit: 0.3 → 0.1; train.lr: 0.0003 → 0.1"):
        train(load_config(None, other), resume=True)
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_checkpoint_is_skipped_on_resume(tmp_path, demo_root):
    cfg = load_config(None, micro_overrides(tmp_path, demo_root, name="corrupt", extra=["continual.strategy=naive"]))
    train(cfg)
    ckpts = tmp_path / "runs" / "corrupt" / "checkpoints"
    newest = list_checkpoints(ckpts)[-1]
    with open(newest.path / "model.safetensors", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02\x03")
    messages: list[str] = []
    picked = latest_checkpoint(ckpts, log=messages.append)
    assert picked is not None and picked.path != newest.path
    assert any("checksum" in m for m in messages)


def _captured_images(run_dir: Path) -> list[int]:
    """Images the CDAD capture pass saw per task, over all ranks (from the saved strategy history)."""
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    return [h["images"] for h in torch.load(last.path / "strategy.pt", weights_only=False)["history"]]


@pytest.mark.parametrize("images, expected", [("3", 3), ("0.5", 8), ("1.0", 16)])
def test_capture_count_and_fraction_are_applied_once(tmp_path, demo_root, images, expected):
    """continual.capture.images through the trainer: a count of the task's images, or a fraction of each class's
    (8 training images per class, a two-class task). Applying a fraction twice would capture about a quarter."""
    overrides = micro_overrides(tmp_path, demo_root, name="cap", extra=[
        "sequence=[[demo/carpet, demo/bottle]]", f"continual.capture.images={images}", "train.base_steps=1",
        "eval.max_test_per_class=1"])
    train(load_config(None, overrides))
    assert _captured_images(tmp_path / "runs" / "cap") == [expected]


def _captured_columns(run_dir: Path) -> dict[str, int]:
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    layers = torch.load(last.path / "strategy.pt", weights_only=False)["history"][-1]["layers"]
    return {name: info["n_columns"] for name, info in layers.items()}


def test_synthetic_capture_adds_one_pass_per_image_without_a_head(tmp_path, demo_root):
    """continual.capture.synthetic through the trainer: the plan asks the engine for synthetic anomalies although
    the model has no head, and every protected layer sees a third pass (clean, NSA-perturbed, synthetic)."""
    columns = {}
    for synthetic in (False, True):
        name = f"syn-{synthetic}".lower()
        train(load_config(None, micro_overrides(tmp_path, demo_root, name=name, extra=[
            "sequence=[[demo/carpet]]", "continual.capture.images=2", "train.base_steps=1",
            "eval.max_test_per_class=1", f"continual.capture.synthetic={str(synthetic).lower()}"])))
        columns[synthetic] = _captured_columns(tmp_path / "runs" / name)
    assert columns[True].keys() == columns[False].keys() and columns[False]
    assert {n: 2 * c for n, c in columns[True].items()} == {n: 3 * c for n, c in columns[False].items()}


@pytest.mark.distributed
def test_two_process_cpu_launch_trains_and_resumes(tmp_path, demo_root):
    """`accelerate launch --config_file launch/cpu-2proc.yaml train.py` really runs 2 ranks, and resumes; the
    capture fraction is applied once over both ranks (half of each task's 8 training images)."""
    overrides = micro_overrides(tmp_path, demo_root, name="ddp", extra=["train.checkpoint_every=2",
                                                                        "continual.capture.images=0.5"])
    cmd = accelerate_launch_cmd(REPO / "launch" / "cpu-2proc.yaml", REPO / "train.py", overrides)
    _, second = run_first_task_then_resume(cmd, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "ddp"
    assert "resuming from task000" in second.stdout
    refs = list_checkpoints(run_dir / "checkpoints")
    assert [r.task for r in refs if r.task_end] == [0, 1]
    # Both ranks saved their RNG state: the run really had two processes.
    assert (refs[-1].path / "random_states_1.pkl").exists()
    assert _captured_images(run_dir) == [4, 4]


@pytest.mark.distributed
def test_two_process_replay_writes_its_buffer_once_and_resumes_with_it(tmp_path, demo_root):
    """Replay on 2 ranks: rank 0 writes the buffer after task 0 while rank 1 waits; the resumed run (both ranks
    check the buffer against the checkpoint's kept classes) trains task 1 with the replayed class."""
    overrides = micro_overrides(tmp_path, demo_root, name="replay2", extra=[
        "continual.strategy=replay", "continual.replay.per_class=5", "continual.replay.ratio=0.5"])
    cmd = accelerate_launch_cmd(REPO / "launch" / "cpu-2proc.yaml", REPO / "train.py", overrides)
    _, second = run_first_task_then_resume(cmd, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "replay2"
    assert "resuming from task000" in second.stdout
    manifest = json.loads((run_dir / "replay" / "manifest.json").read_text())
    assert {g: e["count"] for g, e in manifest["groups"].items()} == {"demo/carpet/train": 5, "demo/bottle/train": 5}
    summary = json.loads((run_dir / "report" / "results.json").read_text())["strategy_summary"]["replay"]
    assert summary["classes"] == ["demo/carpet", "demo/bottle"] and summary["bytes_total"] > 0
    refs = list_checkpoints(run_dir / "checkpoints")
    assert [r.task for r in refs if r.task_end] == [0, 1] and (refs[-1].path / "random_states_1.pkl").exists()


def test_init_from_another_runs_base_task(tmp_path, demo_root):
    """Several strategies can share one trained base task: weights and row 0 come from it, CDAD builds its bases."""
    base = micro_overrides(tmp_path, demo_root, name="base", extra=["continual.strategy=naive", "tasks=0:1"])
    train(load_config(None, base))
    base_dir = tmp_path / "runs" / "base"
    forked = micro_overrides(tmp_path, demo_root, name="forked",
                             extra=["continual.strategy=cdad", f"train.init_from={base_dir}"])
    matrix = train(load_config(None, forked))
    base_end = list_checkpoints(base_dir / "checkpoints")[-1]
    assert matrix["values"]["image_auroc"]["0"] == json.loads((base_end.path / "state.json").read_text())["matrix"][
        "values"]["image_auroc"]["0"]
    refs = list_checkpoints(tmp_path / "runs" / "forked" / "checkpoints")
    assert [r.task for r in refs if r.task_end] == [1]
    strategy_state = torch.load(refs[-1].path / "strategy.pt", weights_only=False)
    assert strategy_state["tasks_done"] == 2 and [h["task"] for h in strategy_state["history"]] == [0, 1]

    other_sequence = micro_overrides(tmp_path, demo_root, name="bad", extra=[
        f"train.init_from={base_dir}", "sequence=[[demo/bottle], [demo/carpet]]"])
    with pytest.raises(CheckpointError, match="not a proper prefix"):
        train(load_config(None, other_sequence))
    other_model = micro_overrides(tmp_path, demo_root, name="bad3", extra=[
        f"train.init_from={base_dir}", "model.amn_depth=2"])
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        train(load_config(None, other_model))
    with pytest.raises(CheckpointError, match="no task-end checkpoint"):
        train(load_config(None, micro_overrides(tmp_path, demo_root, name="bad2",
                                                extra=[f"train.init_from={tmp_path / 'nowhere'}"])))


def test_a_non_finite_map_is_recorded_and_the_run_goes_on(tmp_path, demo_root, monkeypatch):
    """A diverged evaluation (CDAD_FAULT_NAN poisons one map) warns naming the image, makes that class's metrics
    NaN for that evaluation, and loses nothing: both task-end checkpoints and the report are written."""
    from cdad_dist.eval.metrics import NonFiniteMapWarning

    monkeypatch.setenv("CDAD_FAULT_NAN", "0:0")
    overrides = micro_overrides(tmp_path, demo_root, name="nan")
    with pytest.warns(NonFiniteMapWarning, match=r"class 'demo/carpet': image 'demo__carpet__test__\d+': 64 of 1024 anomaly-map pixels are NaN"):
        train(load_config(None, overrides))
    run_dir = tmp_path / "runs" / "nan"
    assert [r.task for r in list_checkpoints(run_dir / "checkpoints") if r.task_end] == [0, 1]
    values = json.loads((run_dir / "report" / "results.json").read_text())["matrix"]["values"]
    assert all(values[m]["0"]["demo/carpet"] is None for m in values)  # that evaluation: NaN, stored as null
    assert values["pixel_auroc"]["1"]["demo/carpet"] is not None  # the next one is finite again


def test_an_out_of_range_task_slice_fails_before_the_run_directory_exists(tmp_path, demo_root):
    from cdad_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tasks='5:9': out of range for a sequence of 2 task\(s\)"):
        train(load_config(None, micro_overrides(tmp_path, demo_root, name="slice", extra=["tasks=5:9"])))
    assert not (tmp_path / "runs" / "slice").exists()


def test_a_failed_write_ends_with_one_line_naming_the_path_and_the_saved_checkpoint(tmp_path, demo_root, capsys):
    """The report folder turned into a file (as a full or read-only disk would fail a write): `train.py` exits 2
    with one `error:` line that names the path, the checkpoint that is safe, and --resume; no traceback."""
    from cdad_dist.cli import train_main

    train(load_config(None, micro_overrides(tmp_path, demo_root, name="wfail", extra=["tasks=0:1"])))
    report = tmp_path / "runs" / "wfail" / "report"
    import shutil
    shutil.rmtree(report)
    report.write_text("not a folder")
    argv = [a for o in micro_overrides(tmp_path, demo_root, name="wfail", extra=["tasks=1:2"]) for a in ("--set", o)]
    capsys.readouterr()
    assert train_main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert errors[0].startswith("error: cannot write ") and str(report) in errors[0]
    assert "task001" in errors[0] and "--resume" in errors[0]
