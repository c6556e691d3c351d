"""The `cdad` command on the demo data and on a small fake VisA tree built from rows of the official CSV."""
from __future__ import annotations

import json

from cdad_dist.cli import main
from fake_datasets import make_fake_visa


def test_demo_data_then_shards_build_and_verify(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--size", "32"]) == 0
    assert main(["shards", "build", "--dataset", "folder", "--name", "demo", "--root", str(tmp_path / "demo"),
                 "--out", str(tmp_path / "shards"), "--size", "32", "--samples-per-shard", "32"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert "demo/carpet/train" in manifest["groups"] and "demo/pill/test" in manifest["groups"]
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 0
    # A corrupt byte in one shard is named by verify, which then fails.
    shard = tmp_path / "shards" / manifest["groups"]["demo/nut/test"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 1
    assert shard.name in capsys.readouterr().out


def test_visa_shards_from_official_csv_rows(tmp_path):
    root = make_fake_visa(tmp_path / "visa")
    assert main(["shards", "build", "--dataset", "visa", "--root", str(root), "--out", str(tmp_path / "shards"),
                 "--size", "32", "--samples-per-shard", "4"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert all(key.startswith("visa/") for key in manifest["groups"])
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 0


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["shards", "build", "--dataset", "mvtec", "--root", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "s")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_train_help_describes_train_py_and_lists_every_config_section(capsys):
    import dataclasses

    import pytest as _pytest

    from cdad_dist.cli import train_main
    from cdad_dist.config import RunConfig

    with _pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: train.py") and "accelerate launch" in text and "embedded demo" in text
    for f in dataclasses.fields(RunConfig):
        assert f"  {f.name}" in text, f.name
    assert "pixel_key_bits" not in text and "metrics" in text  # sections list their keys, one level deep


def test_bench_samples_must_be_whole_numbers_of_at_least_two(tmp_path, capsys):
    """Refused before anything is trained or loaded, with one line naming the option."""
    assert main(["bench", "inference", "--samples", "4,x", "--out", str(tmp_path)]) == 2
    assert "--samples takes comma-separated whole numbers" in capsys.readouterr().err
    assert main(["bench", "inference", "--samples", "1", "--out", str(tmp_path)]) == 2
    assert "--samples takes whole numbers >= 2" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors"))
