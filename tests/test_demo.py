"""The generated demo dataset: layout, determinism, exact masks, visibility of defects, speed."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdad_dist.data.catalog import scan_folder
from cdad_dist.data.demo import (
    AREA_RANGE,
    DEFECTS,
    DEMO_CLASSES,
    INFO_FILE,
    OBJECT_CLASSES,
    TEXTURE_CLASSES,
    make_demo_dataset,
    render_sample,
)
from cdad_dist.data.images import read_mask, read_rgb
from cdad_dist.errors import ConfigError, DatasetError

SMALL = dict(size=64, n_train=4, n_test_good=2, n_test_bad=5)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_classes() -> None:
    assert len(DEMO_CLASSES) >= 6 and len(TEXTURE_CLASSES) == 3 and len(OBJECT_CLASSES) == 3
    assert set(DEMO_CLASSES) == set(TEXTURE_CLASSES) | set(OBJECT_CLASSES)


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    assert tree_hash(a) == tree_hash(b)
    assert tree_hash(a) != tree_hash(c)
    # a class subset renders the very same files
    d = make_demo_dataset(tmp_path / "d", seed=3, classes=["nut"], **SMALL)
    assert tree_hash(d / "nut") == tree_hash(a / "nut")


def test_layout_counts_and_scan(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", n_test_bad=7, **{k: v for k, v in SMALL.items() if k != "n_test_bad"})
    cat = scan_folder(root, "demo")
    assert cat.skipped == []
    assert cat.classes() == [f"demo/{c}" for c in sorted(DEMO_CLASSES)]
    for cls in DEMO_CLASSES:
        train = cat.select([cls], "train")
        test = cat.select([cls], "test")
        assert len(train) == 4 and len(test) == 2 + 7
        bad = [r for r in test if r.label == 1]
        assert len(bad) == 7
        # defects cycle through all kinds
        assert sorted({r.defect for r in bad}) == sorted(DEFECTS)
        for r in train + test:
            img = read_rgb(r.image_path)
            assert img.shape == (64, 64, 3)
            if r.label:
                m = read_mask(r.mask_path)
                assert m.shape == (64, 64) and AREA_RANGE[0] <= m.mean() <= AREA_RANGE[1]
                raw = cv2.imread(r.mask_path, cv2.IMREAD_UNCHANGED)
                assert raw.ndim == 2 and set(np.unique(raw)) == {0, 255}
            else:
                assert r.mask_path is None and r.defect == "good"
    info = json.loads((root / INFO_FILE).read_text())
    assert info["size"] == 64 and info["classes"] == list(DEMO_CLASSES)


@pytest.mark.parametrize("cls", DEMO_CLASSES)
def test_defects_change_pixels_only_inside_exact_mask(cls: str) -> None:
    for defect in DEFECTS:
        for index in range(3):
            normal, image, mask = render_sample(cls, defect, size=96, index=index, seed=1)
            diff = np.abs(image.astype(int) - normal.astype(int)).max(axis=2)
            inside = mask.astype(bool)
            assert AREA_RANGE[0] <= inside.mean() <= AREA_RANGE[1], (cls, defect, index)
            assert (diff[~inside] == 0).all(), (cls, defect, index)
            # clearly visible: most masked pixels change a lot (grid lines can already be dark under a dark defect)
            assert (diff[inside] > 40).mean() > 0.8, (cls, defect, index)
            assert diff[inside].mean() > 80, (cls, defect, index)
    normal, image, mask = render_sample(cls, "good", size=96)
    assert np.array_equal(normal, image) and mask.sum() == 0


def test_normal_images_share_an_appearance_per_class() -> None:
    """Nearest class centroid on 8x8 thumbnails recognises every held-out normal image: classes are distinct
    and each class's normal look is stable under its jitter."""

    def thumb(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()

    centroids = {
        c: np.mean([thumb(render_sample(c, "good", split="train", index=i, size=64)[1]) for i in range(10)], axis=0)
        for c in DEMO_CLASSES
    }
    for c in DEMO_CLASSES:
        for i in range(5):
            t = thumb(render_sample(c, "good", split="test", index=i, size=64)[1])
            nearest = min(centroids, key=lambda k: float(np.linalg.norm(centroids[k] - t)))
            assert nearest == c
    # but normal images are not identical copies
    a = render_sample("grid", "good", split="train", index=0)[1]
    b = render_sample("grid", "good", split="train", index=1)[1]
    assert np.abs(a.astype(int) - b).mean() > 5


def test_default_size_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = make_demo_dataset(tmp_path / "full")
    took = time.perf_counter() - start
    assert took < 30, f"demo generation took {took:.1f}s"
    pngs = list(root.rglob("*.png"))
    assert len(pngs) == 6 * (60 + 15 + 15 + 15)  # images + masks
    assert read_rgb(root / "pill" / "train" / "good" / "059.png").shape == (128, 128, 3)


def test_existing_class_and_bad_arguments(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "x", classes=["grid"], **SMALL)
    with pytest.raises(DatasetError, match="grid"):
        make_demo_dataset(root, classes=["grid"], **SMALL)
    stale = root / "grid" / "train" / "good" / "999.png"
    stale.write_bytes(b"old")
    make_demo_dataset(root, classes=["grid"], overwrite=True, **SMALL)
    assert not stale.exists()
    with pytest.raises(ConfigError, match="marble"):
        make_demo_dataset(tmp_path / "y", classes=["marble"])
    with pytest.raises(ConfigError, match="size"):
        make_demo_dataset(tmp_path / "y", size=16)
    with pytest.raises(ConfigError, match="n_test_bad"):
        make_demo_dataset(tmp_path / "y", n_test_bad=-1)
    with pytest.raises(ConfigError, match="defect"):
        render_sample("grid", "melted")
