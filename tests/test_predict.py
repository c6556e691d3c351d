"""`cdad predict` on a micro run: heat maps + scores files, unreadable images skipped, thresholds, task choice."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdad_dist.cli import main
from cdad_dist.config import load_config
from cdad_dist.engine.trainer import train
from cdad_dist.errors import CdadError, CheckpointError
from cdad_dist.eval.predict import LoadedRun, calibrate_threshold, collect_images, load_run, predict
from engine_utils import make_small_demo, micro_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-task micro run (tasks 0 and 1) and its demo data root."""
    tmp = tmp_path_factory.mktemp("predict")
    demo = make_small_demo(tmp / "demo_data")
    extra = ["continual.strategy=naive", "eval.heatmap_images=0"]
    train(load_config(None, micro_overrides(tmp, demo, name="p", extra=extra)))
    return tmp / "runs" / "p", demo


@pytest.fixture(scope="module")
def latest(trained) -> LoadedRun:
    return load_run(trained[0])


@pytest.fixture()
def inputs(tmp_path, trained) -> Path:
    """A folder of 4 carpet test images, one corrupt .png, one truncated .JPG and a non-image file."""
    _, demo = trained
    folder = tmp_path / "inputs"
    shutil.copytree(demo / "carpet" / "test", folder / "carpet")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ok_jpg = cv2.imencode(".jpg", np.full((20, 20, 3), 128, np.uint8))[1].tobytes()
    (folder / "cut.JPG").write_bytes(ok_jpg[: len(ok_jpg) // 2])
    (folder / "notes.txt").write_text("not an image")
    return folder


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_maps_and_scores_written_and_unreadable_images_skipped(tmp_path, latest, inputs, capsys):
    out = tmp_path / "out"
    result = predict(latest, [inputs], out)
    good = sorted(p for p in (inputs / "carpet").rglob("*.png"))
    assert len(good) == 4 and result["n_images"] == 6 and result["n_scored"] == 4 and result["n_errors"] == 2
    assert result["checkpoint"].startswith("task001-") and result["checkpoint"].endswith("-end")
    by_path = {r["path"]: r for r in result["results"]}
    for p in good:
        row = by_path[str(p)]
        assert row["error"] is None and np.isfinite(row["score"]) and row["anomalous"] is None
        png = cv2.imread(str(out / row["map"]))
        assert png is not None and png.shape[0] > 100 and png.shape[1] > 200  # a real figure, not a bare map
    for bad in ("broken.png", "cut.JPG"):
        row = by_path[str(inputs / bad)]
        assert row["score"] is None and row["map"] is None and bad in row["error"]
    assert str(inputs / "notes.txt") not in by_path
    err = capsys.readouterr().err
    assert "broken.png" in err and "cut.JPG" in err
    rows = _read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in result["results"]]
    assert all(r["anomalous"] == "" for r in rows)
    assert json.loads((out / "scores.json").read_text())["results"] == result["results"]
    # Heat-map names keep the folder layout, so same-named files of different defect folders do not collide.
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.png"))
    assert len(maps) == 4 and all(m.startswith("inputs/carpet/") for m in maps)


def test_threshold_decisions_are_deterministic_and_cli_writes_them(tmp_path, trained, latest, inputs):
    run_dir, _ = trained
    first = predict(latest, [inputs / "carpet"], tmp_path / "a")
    scores = sorted(r["score"] for r in first["results"])
    threshold = (scores[1] + scores[2]) / 2
    assert main(["predict", "--run", str(run_dir), "--threshold", repr(threshold), str(inputs / "carpet"),
                 "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert second["threshold"] == threshold and second["threshold_source"] == "given"
    assert [r["score"] for r in second["results"]] == [r["score"] for r in first["results"]]  # seeded noise
    decisions = [r["anomalous"] for r in second["results"]]
    assert decisions == [r["score"] > threshold for r in first["results"]] and sum(decisions) == 2
    csv_rows = _read_csv(tmp_path / "b" / "scores.csv")
    assert [r["anomalous"] for r in csv_rows] == [str(d).lower() for d in decisions]


def test_calibrated_threshold_is_the_quantile_of_normal_scores(tmp_path, trained, latest):
    _, demo = trained
    normal = sorted((demo / "carpet" / "train" / "good").glob("*.png"))[:4]
    top = calibrate_threshold(latest, normal, quantile=1.0)
    calibrated = predict(latest, normal, tmp_path / "cal", calibration_images=normal, quantile=1.0)
    assert top == pytest.approx(max(r["score"] for r in calibrated["results"]), rel=1e-6)
    assert np.quantile([r["score"] for r in calibrated["results"]], 0.5) == pytest.approx(
        calibrate_threshold(latest, normal, quantile=0.5), rel=1e-6)
    assert calibrated["threshold"] == pytest.approx(top, rel=1e-6)
    assert calibrated["threshold_source"].startswith("calibrated")
    assert not any(r["anomalous"] for r in calibrated["results"])  # nothing scores above the normal maximum


def test_task_choice_and_bad_tasks(tmp_path, trained, latest, inputs, capsys):
    run_dir, _ = trained
    old = predict(run_dir, [inputs / "carpet"], tmp_path / "t0", task="0")
    new = predict(latest, [inputs / "carpet"], tmp_path / "t1")
    assert old["task"] == 0 and new["task"] == 1
    assert [r["score"] for r in old["results"]] != [r["score"] for r in new["results"]]  # other weights
    with pytest.raises(CheckpointError, match=r"no task-end checkpoint for task 7; finished tasks: \[0, 1\]") as err:
        predict(run_dir, [inputs], tmp_path / "x", task=7)
    assert str(run_dir) in str(err.value)
    with pytest.raises(CheckpointError, match="'latest' or a task index"):
        load_run(run_dir, task="newest")
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--task", "9", str(inputs), "--out", str(tmp_path / "y")]) == 2
    assert str(run_dir) in capsys.readouterr().err
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", empty / "config.yaml")
    with pytest.raises(CheckpointError, match="no task-end checkpoint") as err:
        load_run(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_run(tmp_path)


def test_damaged_weights_are_an_error(tmp_path, trained):
    run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = sorted(copy.glob("checkpoints/task001-*-end/model.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_run(copy)
    assert load_run(copy, task=0).checkpoint.task == 0  # the other task's weights are intact


def test_collect_images_suffixes_order_and_name_clashes(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ("a/x/1.PNG", "a/2.JpEg", "a/3.bmp", "a/4.TIFF", "a/5.tif", "a/skip.gif", "b/1.PNG"):
        (tmp_path / rel).write_bytes(b"")
    images = collect_images([tmp_path / "a", tmp_path / "b" / "1.PNG", tmp_path / "b" / "1.PNG"])
    assert [p.path.name for p in images] == ["2.JpEg", "3.bmp", "4.TIFF", "5.tif", "1.PNG", "1.PNG", "1.PNG"]
    assert [p.name for p in images] == ["a/2.png", "a/3.png", "a/4.png", "a/5.png", "a/x/1.png", "1.png", "1-2.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdadError, match="no image files"):
        predict(tmp_path, [tmp_path / "empty"], tmp_path / "out")


def test_image_unreadable_when_its_map_is_drawn_is_reported(tmp_path, latest, inputs, monkeypatch):
    import cdad_dist.eval.predict as predict_module

    victim = sorted((inputs / "carpet").rglob("*.png"))[0]
    real, reads = predict_module.read_rgb, []

    def flaky(path):  # the file disappears between scoring (first read) and drawing its map (second read)
        reads.append(Path(path))
        if Path(path) == victim and reads.count(victim) > 1:
            raise CdadError(f"{path}: gone")
        return real(path)

    monkeypatch.setattr(predict_module, "read_rgb", flaky)
    result = predict(latest, [inputs / "carpet"], tmp_path / "o")
    row = next(r for r in result["results"] if r["path"] == str(victim))
    assert row["score"] is not None and row["map"] is None and "heat map" in row["error"]
    assert sum(r["map"] is not None for r in result["results"]) == 3 and result["n_errors"] == 1


def test_a_score_does_not_depend_on_the_other_images_of_the_call(tmp_path, latest, trained):
    """The issue's case: one image scored alone and among others got different scores (noise was per batch)."""
    _, demo = trained
    folder = demo / "carpet" / "test"
    files = sorted(p for p in folder.rglob("*.png"))
    alone = predict(latest, [files[0]], tmp_path / "alone", log=lambda m: None)["results"][0]["score"]
    together = predict(latest, [folder], tmp_path / "all", batch_size=3, log=lambda m: None)["results"]
    mine = [r["score"] for r in together if Path(r["path"]).resolve() == files[0].resolve()]
    assert mine == [pytest.approx(alone, rel=1e-5)]


def test_maps_are_drawn_at_the_images_own_size_and_a_reused_out_keeps_no_stale_maps(tmp_path, latest):
    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir()
    cv2.imwrite(str(wide), np.random.default_rng(0).integers(0, 255, (40, 160, 3), dtype=np.uint8))
    square = tmp_path / "in" / "square.png"
    cv2.imwrite(str(square), np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "out"
    predict(latest, [wide, square], out, threshold=0.5, log=lambda m: None)
    wide_png, square_png = cv2.imread(str(out / "maps" / "wide.png")), cv2.imread(str(out / "maps" / "square.png"))
    assert wide_png.shape[1] == square_png.shape[1] and wide_png.shape[0] < 0.7 * square_png.shape[0]
    (out / "maps" / "mine.txt").write_text("a user's file")
    predict(latest, [tmp_path / "in"], out, log=lambda m: None)  # maps now under maps/in/
    assert (out / "maps" / "in" / "wide.png").is_file() and not (out / "maps" / "wide.png").exists()
    predict(latest, [square], out, log=lambda m: None)  # the same --out, fewer images
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["mine.txt", "square.png"]  # no empty maps/in/
    assert [r["map"] for r in json.loads((out / "scores.json").read_text())["results"]] == ["maps/square.png"]


def test_calibration_with_too_few_images_for_its_quantile_warns(latest, trained):
    _, demo = trained
    said = []
    calibrate_threshold(latest, [demo / "carpet" / "train"], 0.99, log=said.append)
    assert len(said) == 1 and "cannot resolve quantile 0.99" in said[0] and "at least 100" in said[0]
    said.clear()
    calibrate_threshold(latest, [demo / "carpet" / "train"], 0.5, log=said.append)
    assert said == []


def test_predict_help_describes_every_option(capsys):
    from cdad_dist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None))
    predict_parser = sub.choices["predict"]
    undocumented = [a.dest for a in predict_parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    assert {"--device", "--batch-size"} <= {o for a in predict_parser._actions for o in a.option_strings}


def test_bench_inference_scores_a_held_out_draw_given_by_its_shards(tmp_path, trained):
    """`cdad bench inference --run R --test-shards S`: the run's classes, S's test images (another draw, another
    count per class), the run's own shards untouched; a class S lacks is an error naming it."""
    import cdad_dist.bench.inference as bench
    from cdad_dist.data.demo import make_demo_dataset

    run_dir, _ = trained
    held = make_demo_dataset(tmp_path / "held", size=32, n_train=1, n_test_good=3, n_test_bad=2, seed=5,
                             classes=["carpet", "bottle"])
    assert main(["shards", "build", "--dataset", "demo", "--root", str(held), "--out", str(tmp_path / "s")]) == 0
    cfg = bench.InferenceBenchConfig(ddim_steps=2, repeats=1, batch_size=4, count_presets=(), seg_head=False)
    result = bench.run(False, tmp_path / "out", cfg=cfg, run_dir=run_dir, test_shards=tmp_path / "s",
                       log=lambda *_: None)
    assert result["classes"] == ["demo/carpet", "demo/bottle"] and result["n_images"] == 10  # 5 per class here
    assert result["test_shards"] == str(tmp_path / "s")
    own = bench.run(False, tmp_path / "own", cfg=cfg, run_dir=run_dir, log=lambda *_: None)
    assert own["n_images"] == 8 and own["test_shards"] is None  # the run's own test set: 4 per class
    only_carpet = make_demo_dataset(tmp_path / "one", size=32, n_train=1, n_test_good=1, n_test_bad=1,
                                    classes=["carpet"])
    assert main(["shards", "build", "--dataset", "demo", "--root", str(only_carpet), "--out",
                 str(tmp_path / "s1")]) == 0
    with pytest.raises(CdadError, match="bottle"):
        bench.run(False, tmp_path / "out1", cfg=cfg, run_dir=run_dir, test_shards=tmp_path / "s1",
                  log=lambda *_: None)
