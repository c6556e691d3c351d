"""NSA-style patch perturbation."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cdad_dist.data.demo import render_sample
from cdad_dist.data.perturb import MIN_PATCH_SIDE, NSAConfig, NSAPerturber, PatchSpec
from cdad_dist.errors import ConfigError, DatasetError


def pair(cls: str = "wood", size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    target = render_sample(cls, "good", split="train", index=0, size=size)[1]
    source = render_sample(cls, "good", split="train", index=1, size=size)[1]
    return target, source


def boxes_mask(hw: tuple[int, int], patches: list[PatchSpec]) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    for p in patches:
        m[p.dst_y : p.dst_y + p.dst_h, p.dst_x : p.dst_x + p.dst_w] = 1
    return m


@pytest.mark.parametrize("blend", ["poisson", "paste"])
def test_mask_and_pixels_are_consistent(blend: str) -> None:
    target, source = pair()
    pert = NSAPerturber(NSAConfig(probability=1.0, blend=blend))
    rng = np.random.default_rng(0)
    for _ in range(40):
        out, mask = pert(target, source, rng)
        assert out.dtype == np.uint8 and out.shape == target.shape
        assert mask.dtype == np.uint8 and mask.shape == target.shape[:2] and set(np.unique(mask)) <= {0, 1}
        assert mask.any()
        diff = np.abs(out.astype(int) - target.astype(int)).max(axis=2)
        near = cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool)
        assert (diff[~near] == 0).all()
        assert (diff[mask == 0] == 0).all()  # our blend copies back only the patch boxes
        assert diff[mask == 1].mean() > 3  # wood phases differ between images: the patch shows


def test_union_mask_and_paste_copies_source() -> None:
    target, source = pair("grid", 64)
    patches = [PatchSpec(0, 0, 10, 12, 50, 40, 10, 12), PatchSpec(30, 30, 20, 20, 0, 0, 26, 26)]
    pert = NSAPerturber(NSAConfig(blend="paste"))
    out, mask = pert.apply(target, source, patches)
    assert np.array_equal(mask, boxes_mask((64, 64), patches))
    assert np.array_equal(out[50:60, 40:52], source[0:10, 0:12])
    resized = cv2.resize(source[30:50, 30:50], (26, 26), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out[0:26, 0:26], resized)


def test_poisson_at_image_borders_and_corners() -> None:
    target, source = pair("carpet", 64)
    patches = [
        PatchSpec(0, 0, 20, 20, 0, 0, 20, 20),  # top-left corner
        PatchSpec(40, 40, 24, 24, 40, 40, 24, 24),  # bottom-right corner
        PatchSpec(0, 0, 64, 4, 0, 60, 64, 4),  # full-height strip on the right edge
    ]
    out, mask = NSAPerturber(NSAConfig(blend="poisson")).apply(target, source, patches)
    diff = np.abs(out.astype(int) - target.astype(int)).max(axis=2)
    assert np.array_equal(mask, boxes_mask((64, 64), patches))
    assert (diff[mask == 0] == 0).all()
    # inside, where source and target differ, the patch content arrived
    for p in patches[:2]:
        box = (slice(p.dst_y, p.dst_y + p.dst_h), slice(p.dst_x, p.dst_x + p.dst_w))
        src_vs_tgt = np.abs(source[p.src_y : p.src_y + p.src_h, p.src_x : p.src_x + p.src_w].astype(int) - target[box])
        assert src_vs_tgt.mean() > 5 and diff[box].mean() > 5


def test_probability_zero_and_one() -> None:
    target, source = pair()
    rng = np.random.default_rng(1)
    never = NSAPerturber(NSAConfig(probability=0.0))
    for _ in range(30):
        out, mask = never(target, source, rng)
        assert np.array_equal(out, target) and out is not target and mask.sum() == 0
    always = NSAPerturber(NSAConfig(probability=1.0))
    assert all(always(target, source, rng)[1].any() for _ in range(30))
    half = NSAPerturber(NSAConfig(probability=0.5, blend="paste"))
    hits = sum(bool(half(target, source, rng)[1].any()) for _ in range(400))
    assert 150 < hits < 250


def test_patch_count_distribution() -> None:
    pert = NSAPerturber(NSAConfig())
    rng = np.random.default_rng(2)
    counts = np.bincount([pert.num_patches(rng) for _ in range(8000)], minlength=6)
    assert counts[0] == 0 and counts[5] == 0
    freq = counts[1:5] / counts.sum()
    # first patch always, three more independently with p=0.5: Binomial(3, 0.5) + 1
    assert np.allclose(freq, [1 / 8, 3 / 8, 3 / 8, 1 / 8], atol=0.02)
    one = NSAPerturber(NSAConfig(max_patches=1))
    assert {one.num_patches(rng) for _ in range(50)} == {1}


def test_patch_size_bounds() -> None:
    cfg = NSAConfig()
    pert = NSAPerturber(cfg)
    rng = np.random.default_rng(3)
    th, tw, sh, sw = 200, 150, 180, 160
    lo, hi = cfg.half_width_range
    src_h, dst_h = [], []
    for _ in range(3000):
        p = pert._sample_one((th, tw), (sh, sw), rng)
        assert 0 <= p.src_y and p.src_y + p.src_h <= sh and 0 <= p.src_x and p.src_x + p.src_w <= sw
        assert 0 <= p.dst_y and p.dst_y + p.dst_h <= th and 0 <= p.dst_x and p.dst_x + p.dst_w <= tw
        assert round(2 * lo * th) - 1 <= p.src_h <= min(sh, round(2 * hi * th)) + 1
        assert round(2 * lo * tw) - 1 <= p.src_w <= round(2 * hi * tw) + 1
        assert max(MIN_PATCH_SIDE, round(2 * lo * th)) <= p.dst_h <= round(2 * hi * th)
        assert 0.7 * p.src_h - 1 <= p.dst_h <= 1.3 * p.src_h + 1
        src_h.append(p.src_h)
        dst_h.append(p.dst_h)
    # half-widths are uniform over the range: the sizes cover it
    assert min(src_h) < 2 * 0.06 * th and max(src_h) > 2 * 0.37 * th
    assert np.mean(np.array(dst_h) != np.array(src_h)) > 0.5  # resize is on
    no_resize = NSAPerturber(NSAConfig(resize=False))
    p = no_resize._sample_one((64, 64), (64, 64), rng)
    assert (p.src_h, p.src_w) == (p.dst_h, p.dst_w)


def test_deterministic_for_a_seed() -> None:
    target, source = pair("pill", 64)
    pert = NSAPerturber(NSAConfig(probability=0.7))
    a = [pert(target, source, np.random.default_rng(11)) for _ in range(3)]
    assert all(np.array_equal(a[0][0], x[0]) and np.array_equal(a[0][1], x[1]) for x in a)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(10):
        x, y = pert(target, source, rng1), pert(target, source, rng2)
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_different_sizes_and_tiny_images() -> None:
    rng = np.random.default_rng(4)
    pert = NSAPerturber(NSAConfig(probability=1.0))
    target = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)
    for _ in range(20):
        out, mask = pert(target, source, rng)
        assert out.shape == target.shape and mask.shape == (50, 70) and mask.any()
    tiny = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out, mask = pert(tiny, tiny[::-1].copy(), rng)
    assert out.shape == (6, 6, 3) and mask.any()


def test_bad_inputs_and_config() -> None:
    pert = NSAPerturber()
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(DatasetError, match="target"):
        pert(np.zeros((8, 8), np.uint8), good, np.random.default_rng(0))
    with pytest.raises(DatasetError, match="source"):
        pert(good, good.astype(np.float32), np.random.default_rng(0))
    for kw, key in [
        ({"probability": 1.5}, "probability"),
        ({"max_patches": 0}, "max_patches"),
        ({"half_width_range": (0.3, 0.1)}, "half_width_range"),
        ({"resize_range": (1.1, 1.3)}, "resize_range"),
        ({"blend": "mix"}, "blend"),
        ({"resize_range": [0.7, 1.0, 1.3]}, "resize_range"),
    ]:
        with pytest.raises(ConfigError, match=key):
            NSAConfig(**kw)
    assert NSAConfig(half_width_range=[0.1, 0.2]).half_width_range == (0.1, 0.2)
