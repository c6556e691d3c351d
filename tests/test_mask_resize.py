"""Ground-truth masks resized with the images: centre-aligned, and no defect region lost (data/images.resize_mask)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cdad_dist.data.images import resize_mask


def _components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


@pytest.mark.parametrize("source", [1024, 900, 700])
def test_every_small_defect_survives_downsampling(source):
    rng = np.random.default_rng(source)
    mask = np.zeros((source, source), np.uint8)
    spacing = source // 16  # far enough apart that no two specks can meet at 256 px
    for gy in range(1, 15):
        for gx in range(1, 15):
            y, x = gy * spacing + rng.integers(0, spacing // 2), gx * spacing + rng.integers(0, spacing // 2)
            mask[y:y + 3, x:x + 3] = 255  # 3×3: under one output pixel at 1024 → 256
    out = resize_mask(mask, (256, 256))
    assert _components(mask) == 14 * 14
    assert _components(out) == 14 * 14
    assert out.sum() <= 4 * 14 * 14  # a speck becomes at most 2×2 output pixels, not a blob
    if source == 1024:  # sampling every 4th pixel, the old resize loses many of them
        nearest = cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST)
        assert _components(nearest) < 14 * 14


def test_a_thin_scratch_stays_a_connected_line():
    mask = np.zeros((1024, 1024), np.uint8)
    cv2.line(mask, (100, 130), (900, 870), 1, thickness=2)  # ~0.5 output px wide at 256
    out = resize_mask(mask, (256, 256))
    assert _components(out) == 1
    length = np.hypot(800, 740) / 4  # in output pixels
    assert out.sum() >= 0.8 * length


def _centroid_offsets(resize, rng, n=60) -> np.ndarray:
    """Output-minus-input centroid (in input pixels, pixel-centre coordinates) of random rectangles."""
    offsets = []
    for _ in range(n):
        mask = np.zeros((1024, 1024), np.uint8)
        y, x = rng.integers(50, 900, 2)
        h, w = rng.integers(12, 80, 2)
        mask[y:y + h, x:x + w] = 1
        out = resize(mask)
        ys_in, xs_in = np.nonzero(mask)
        ys_out, xs_out = np.nonzero(out)
        offsets.append([(ys_out.mean() + 0.5) * 4 - (ys_in.mean() + 0.5),
                        (xs_out.mean() + 0.5) * 4 - (xs_in.mean() + 0.5)])
    return np.array(offsets)


def test_downsampled_masks_stay_centre_aligned_with_the_image():
    ours = _centroid_offsets(lambda m: resize_mask(m, (256, 256)), np.random.default_rng(0))
    top_left = _centroid_offsets(lambda m: cv2.resize(m, (256, 256), interpolation=cv2.INTER_NEAREST),
                                 np.random.default_rng(0))
    assert np.abs(ours.mean(0)).max() < 0.3  # no systematic shift (input pixels)
    assert np.abs(ours).max() <= 2.0  # at most half an output pixel per rectangle
    assert (top_left.mean(0) > 1.0).all()  # INTER_NEAREST takes each cell's top-left pixel: ~1.5 px off


def test_upsampling_is_pixel_centre_nearest_and_same_size_is_binarised():
    mask = np.array([[0, 7], [255, 0]], np.uint8)
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], np.uint8)
    assert np.array_equal(resize_mask(mask, (4, 4)), expected)
    assert np.array_equal(resize_mask(mask, (2, 2)), np.array([[0, 1], [1, 0]], np.uint8))
    assert resize_mask(np.zeros((64, 48), np.uint8), (16, 12)).sum() == 0
    assert resize_mask(np.ones((64, 48), np.uint8), (16, 12)).all()
