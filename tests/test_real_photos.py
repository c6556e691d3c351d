"""The real-photo check dataset: disjoint train/test regions, exact masks, determinism, layout."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

from cdad_dist.data import real_photos as rp  # noqa: E402
from cdad_dist.data.catalog import scan_dataset  # noqa: E402
from cdad_dist.errors import ConfigError  # noqa: E402


def test_train_and_test_blocks_never_overlap():
    for cls in rp.REAL_CLASSES:
        shape = rp.load_photo(cls).shape[:2]
        covered = {}
        for split in ("train", "test"):
            crop, corners, block = rp._blocks(shape, split)
            grid = np.zeros(shape, bool)
            for y, x in corners:
                grid[y:y + block, x:x + block] = True
            covered[split] = grid
            assert crop <= block
        assert not (covered["train"] & covered["test"]).any(), cls
        assert covered["train"].any() and covered["test"].any()


@pytest.mark.parametrize("defect", rp.DEFECTS)
def test_defects_change_pixels_only_inside_their_mask(defect):
    photo = rp.load_photo("rocket")  # mostly flat sky: the hardest case for a visible blur
    for index in range(3):
        normal, image, mask = rp.render_sample("rocket", defect, size=64, index=index, photo=photo)
        inside = mask.astype(bool)
        lo, hi = rp.AREA_RANGE
        assert lo <= inside.mean() <= hi
        diff = np.abs(image.astype(int) - normal.astype(int)).max(2)
        assert (diff[~inside] == 0).all()
        assert diff[inside].mean() / 255 > 0.02  # visible


def test_grey_photos_are_three_equal_channels():
    img = rp.load_photo("camera")
    assert img.shape[2] == 3 and np.array_equal(img[..., 0], img[..., 2])


def test_samples_are_seeded_per_image():
    a = rp.render_sample("coins", "stain", size=48, index=2)
    b = rp.render_sample("coins", "stain", size=48, index=2)
    c = rp.render_sample("coins", "stain", size=48, index=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_dataset_layout_scans_as_a_folder_dataset(tmp_path):
    root = rp.make_real_dataset(tmp_path / "real", size=32, n_train=3, n_test_good=2, n_test_bad=5,
                                classes=["coffee", "camera"])
    catalog = scan_dataset("folder", root, name="real")
    by_split = {}
    for r in catalog.records:
        by_split.setdefault((r.qualified_class, r.split), []).append(r)
    assert len(by_split[("real/coffee", "train")]) == 3
    assert len(by_split[("real/camera", "test")]) == 7
    assert {r.defect for r in by_split[("real/coffee", "test")]} == {"good", *rp.DEFECTS}
    with pytest.raises(Exception, match="already exists"):
        rp.make_real_dataset(tmp_path / "real", size=32, n_train=1, classes=["coffee"])


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="classes"):
        rp.make_real_dataset(tmp_path, classes=["lena"])
    with pytest.raises(ConfigError, match="size"):
        rp.make_real_dataset(tmp_path, size=8)
