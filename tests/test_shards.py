"""Tests of cdad_dist.data.shards: build -> verify, determinism, resume, bad inputs, damaged shards."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdad_dist.data.catalog import SampleRecord
from cdad_dist.data.shards import (MANIFEST_FORMAT, PARTIAL_MANIFEST_NAME, build_shards, iter_shard_samples, load_manifest,
                                   manifest_classes, task_shards, verify_shards)
from cdad_dist.data.images import read_rgb, resize_mask
from cdad_dist.errors import DatasetError, ShardError

# Images of each class live in their own intensity band so tests can tell a class from its pixels.
CLASS_BANDS = {"a": 0, "b": 80, "c": 160, "d": 200}


def make_records(root: Path, spec: dict[str, tuple[int, int]], *, size: tuple[int, int] = (24, 20),
                 seed: int = 0) -> list[SampleRecord]:
    """Write a tiny dataset: spec maps "dataset/class" -> (n_train, n_test); every other test image is anomalous
    with a rectangular mask. Returns the records (train all normal)."""
    rng = np.random.default_rng(seed)
    h, w = size
    records = []
    for qc, (n_train, n_test) in spec.items():
        dataset, cls = qc.split("/")
        band = CLASS_BANDS.get(cls, 0)
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / dataset / cls / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(band, band + 50, size=(h, w, 3), dtype=np.uint8)
                path = folder / f"{i:03d}.png"
                cv2.imwrite(str(path), img)
                label = int(split == "test" and i % 2 == 1)
                mask_path = None
                if label:
                    mask = np.zeros((h, w), np.uint8)
                    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                    mask[y:y + 5, x:x + 6] = 255
                    mask_path = folder / f"{i:03d}_mask.png"
                    cv2.imwrite(str(mask_path), mask)
                records.append(SampleRecord(dataset, cls, split, label, "scratch" if label else "good", str(path),
                                            None if mask_path is None else str(mask_path)))
    return records


SPEC = {"demo/a": (7, 4), "demo/b": (5, 2), "other/c": (3, 3)}


@pytest.fixture()
def records(tmp_path: Path) -> list[SampleRecord]:
    return make_records(tmp_path / "data", SPEC)


def _stats(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.glob("*.tar"))}


def test_build_verify_round_trip(records, tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(records, out, image_size=16, samples_per_shard=3)
    assert manifest == load_manifest(out)
    assert manifest["format"] == MANIFEST_FORMAT == 2 and manifest["image_size"] == 16
    assert manifest_classes(manifest) == ["demo/a", "demo/b", "other/c"]
    a_train = manifest["groups"]["demo/a/train"]
    assert a_train["count"] == 7 and [s["count"] for s in a_train["shards"]] == [3, 3, 1]
    assert [s["name"] for s in a_train["shards"]] == [f"demo__a__train-{i:05d}.tar" for i in range(3)]
    assert {g: v["count"] for g, v in manifest["groups"].items()} == {
        "demo/a/train": 7, "demo/a/test": 4, "demo/b/train": 5, "demo/b/test": 2, "other/c/train": 3,
        "other/c/test": 3}
    assert not (out / PARTIAL_MANIFEST_NAME).exists() and not list(out.glob("*.tmp"))
    report = verify_shards(out)
    assert report.ok and report.shards_checked == 10 and report.samples_checked == 24

    by_path = {r.image_path: r for r in records}
    seen = 0
    for entry in manifest["groups"]["demo/a/test"]["shards"]:
        for s in iter_shard_samples(out / entry["name"]):
            assert sorted(k for k in s if not k.startswith("__")) == ["image.png", "mask.png", "meta.json"]
            meta = json.loads(s["meta.json"])
            rec = by_path[meta["source"]]
            assert s["__key__"] == f"demo__a__test__{seen:06d}"
            assert (meta["dataset"], meta["class"], meta["split"], meta["label"], meta["defect"]) == (
                "demo", "a", "test", rec.label, rec.defect)
            image = cv2.cvtColor(cv2.imdecode(np.frombuffer(s["image.png"], np.uint8), cv2.IMREAD_COLOR),
                                 cv2.COLOR_BGR2RGB)
            mask = cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            want = cv2.resize(read_rgb(rec.image_path), (16, 16), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(image, want)
            assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
            if rec.label == 0:
                assert mask.max() == 0
            else:
                src = cv2.imread(rec.mask_path, cv2.IMREAD_GRAYSCALE)
                np.testing.assert_array_equal(mask, resize_mask(src, (16, 16)) * 255)  # aligned with the image
                assert mask.max() == 255
            seen += 1
    assert seen == 4


def test_full_resolution_and_jpeg(records, tmp_path):
    manifest = build_shards(records, tmp_path / "s", image_format="jpg", samples_per_shard=100)
    assert manifest["image_size"] is None
    entry = manifest["groups"]["demo/b/train"]["shards"][0]
    sample = next(iter_shard_samples(tmp_path / "s" / entry["name"]))
    assert "image.jpg" in sample
    assert cv2.imdecode(np.frombuffer(sample["image.jpg"], np.uint8), cv2.IMREAD_COLOR).shape == (24, 20, 3)
    assert verify_shards(tmp_path / "s").ok


def test_same_input_gives_identical_bytes(records, tmp_path):
    m1 = build_shards(records, tmp_path / "one", image_size=16, samples_per_shard=2)
    # other record order and two worker processes: same shard bytes
    m2 = build_shards(list(reversed(records)), tmp_path / "two", image_size=16, samples_per_shard=2, num_workers=2)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.tar")) and len(names) == 14
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n
    assert m1["groups"] == m2["groups"]
    with tarfile.open(tmp_path / "one" / names[0]) as tf:
        members = tf.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "cdad", 0o444)}
        assert [m.name.split(".", 1)[1] for m in members[:3]] == ["image.png", "mask.png", "meta.json"]


def test_default_shard_size_from_byte_budget(records, tmp_path):
    one = build_shards(records, tmp_path / "one", image_size=16)
    assert all(len(g["shards"]) == 1 for g in one["groups"].values())  # 1 GB budget: one shard per group
    tiny = build_shards(records, tmp_path / "tiny", image_size=16, shard_bytes=1)
    assert all(s["count"] == 1 for g in tiny["groups"].values() for s in g["shards"])
    with tarfile.open(tmp_path / "one" / one["groups"]["demo/a/train"]["shards"][0]["name"]) as tf:
        # bytes one sample takes in a tar: a 512-byte header per member plus its data padded to 512
        sample_bytes = sum(512 + -(-m.size // 512) * 512 for m in tf.getmembers()) / 7
    four = build_shards(records, tmp_path / "four", image_size=16, shard_bytes=4 * sample_bytes)
    spp = four["groups"]["demo/a/train"]["samples_per_shard"]
    assert 3 <= spp <= 5
    assert [s["count"] for s in four["groups"]["demo/a/train"]["shards"]][0] == spp


def test_resume_reuses_finished_groups(records, tmp_path):
    out = tmp_path / "s"
    half = [r for r in records if r.dataset == "demo"]
    build_shards(half, out, samples_per_shard=2)
    before = _stats(out)
    manifest = build_shards(records, out, samples_per_shard=2, num_workers=2)
    after = _stats(out)
    assert set(before) < set(after)
    assert {n: after[n] for n in before} == before  # not rewritten: same inode and mtime
    assert set(manifest["groups"]) == {f"{qc}/{sp}" for qc in SPEC for sp in ("train", "test")}
    assert verify_shards(out).ok


def test_resume_after_interrupted_build(records, tmp_path):
    out = tmp_path / "s"
    bad = next(r for r in records if r.dataset == "other" and r.split == "train")
    good_bytes = Path(bad.image_path).read_bytes()
    Path(bad.image_path).write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=bad.image_path):
        build_shards(records, out, samples_per_shard=2)
    assert not (out / "manifest.json").exists()
    partial = json.loads((out / PARTIAL_MANIFEST_NAME).read_text())
    finished = sorted(partial["shards"])
    # one process writes the groups in name order: everything before the bad group's first shard is finished
    assert len(finished) == 12 and not any(n.startswith("other__c__train") for n in finished)
    assert not list(out.glob("*.tmp"))
    before = _stats(out)
    Path(bad.image_path).write_bytes(good_bytes)  # fixed: the second run only writes what is missing
    build_shards(records, out, samples_per_shard=2)
    after = _stats(out)
    assert {n: after[n] for n in finished} == {n: before[n] for n in finished}
    assert not (out / PARTIAL_MANIFEST_NAME).exists()
    assert verify_shards(out).ok


def test_resume_rewrites_changed_or_damaged_shards(records, tmp_path):
    out = tmp_path / "s"
    m1 = build_shards(records, out, samples_per_shard=2)
    first = m1["groups"]["demo/a/train"]["shards"]
    edited = next(r for r in records if r.dataset == "demo" and r.cls == "b" and r.split == "train")
    img = cv2.imread(edited.image_path)
    cv2.imwrite(edited.image_path, 255 - img)
    (out / first[1]["name"]).write_bytes(b"garbage")
    before = _stats(out)
    m2 = build_shards(records, out, samples_per_shard=2)
    after = _stats(out)
    b_first = m2["groups"]["demo/b/train"]["shards"][0]["name"]
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {first[1]["name"], b_first}
    assert m2["groups"]["demo/a/train"]["shards"][1]["sha256"] == first[1]["sha256"]
    assert m2["groups"]["demo/b/train"]["shards"][0]["sha256"] != m1["groups"]["demo/b/train"]["shards"][0]["sha256"]
    assert verify_shards(out).ok


def test_bad_image_skipped_and_counted(records, tmp_path):
    bad = next(r for r in records if r.cls == "b" and r.split == "train")
    data = Path(bad.image_path).read_bytes()
    Path(bad.image_path).write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(DatasetError, match=bad.image_path):
        build_shards(records, tmp_path / "strict", samples_per_shard=3)
    manifest = build_shards(records, tmp_path / "lenient", samples_per_shard=3, skip_bad=True)
    assert [s["image_path"] for s in manifest["skipped"]] == [bad.image_path]
    assert manifest["groups"]["demo/b/train"]["count"] == 4
    assert verify_shards(tmp_path / "lenient").ok


def test_bad_inputs_named(tmp_path):
    recs = make_records(tmp_path / "d", {"demo/a": (1, 2)})
    anomalous = next(r for r in recs if r.label == 1)
    cv2.imwrite(anomalous.mask_path, np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=anomalous.mask_path):
        build_shards(recs, tmp_path / "s1", samples_per_shard=2)
    odd = SampleRecord("my__set", "a", "train", 0, "good", recs[0].image_path, None)
    with pytest.raises(DatasetError, match="my__set"):
        build_shards([odd], tmp_path / "s2")
    missing = SampleRecord("demo", "a", "train", 0, "good", str(tmp_path / "nope.png"), None)
    with pytest.raises(DatasetError, match="nope.png"):
        build_shards([missing], tmp_path / "s3")


def test_verify_names_truncated_and_corrupt_shards(records, tmp_path):
    out = tmp_path / "s"
    manifest = build_shards(records, out, samples_per_shard=3)
    cut = manifest["groups"]["demo/a/train"]["shards"][0]["name"]
    flipped = manifest["groups"]["other/c/test"]["shards"][0]["name"]
    data = (out / cut).read_bytes()
    (out / cut).write_bytes(data[: len(data) // 2])
    data = bytearray((out / flipped).read_bytes())
    data[1500] ^= 0xFF  # inside the first image's bytes
    (out / flipped).write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        verify_shards(out)
    assert cut in str(err.value) and flipped in str(err.value)
    report = verify_shards(out, strict=False)
    assert set(report.problems) == {cut, flipped}
    assert any("size" in p for p in report.problems[cut])
    assert any("sha256" in p for p in report.problems[flipped])
    (out / cut).unlink()
    assert "missing" in verify_shards(out, strict=False).problems[cut]


def test_manifest_errors(records, tmp_path):
    with pytest.raises(ShardError, match="manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 7, "groups": {}}))
    with pytest.raises(ShardError, match="format"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "groups": {}}))  # round 1's shards
    with pytest.raises(ShardError, match="format is 1, expected 2 .*older.*delete the shard folder"):
        load_manifest(tmp_path)
    manifest = build_shards(records, tmp_path / "s", samples_per_shard=4)
    with pytest.raises(ShardError, match=r"'demo/zzz'.*" + str(tmp_path / "s")):
        task_shards(manifest, ["demo/a", "demo/zzz"], "train", tmp_path / "s")
    assert [qc for qc, _ in task_shards(manifest, ["other/c", "demo/a"], "train", tmp_path / "s")] == [
        "other/c", "demo/a", "demo/a"]
