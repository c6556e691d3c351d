"""Per-class metrics: hand-computed values, keyed vs exact, AUPRO reference cases, streaming/merge invariance.

The adversarial cases (heavy tails, outliers, per-image scales, 1/2/4 ranks) are in test_metrics_adversarial.py.
"""
from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from cdad_dist.errors import CdadError
from cdad_dist.eval.metrics import (
    METRIC_NAMES,
    ClassMetricAccumulator,
    DegenerateMetricWarning,
    MetricConfig,
    compute_class_metrics,
    resize_masks_nearest,
    trapezoid_to_limit,
)


def _pixels(values, mask):
    """A 1-image batch from two 2-D lists: map values and mask."""
    return torch.tensor(values, dtype=torch.float32)[None, None], torch.tensor(mask, dtype=torch.float32)[None, None]


def _quiet_compute(acc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        return acc.compute()


# ------------------------------------------------------------------------------------------------ hand computations
def test_one_pixel_images_match_hand_computation():
    # scores 0.1, 0.4 normal; 0.35, 0.8 anomalous: 3 of 4 pairs ranked right -> AUROC 0.75;
    # AP = 0.5 * 1 (at 0.8) + 0.5 * 2/3 (at 0.35) = 0.8333; PRO curve: (0,0),(0,.5),(.5,.5),(.5,1),(1,1) -> 0.5
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    maps = scores.view(4, 1, 1, 1)
    masks = labels.float().view(4, 1, 1, 1)
    r = compute_class_metrics("t/one_px", scores, maps, labels, masks)
    assert r["image_auroc"] == pytest.approx(0.75, abs=1e-7)
    assert r["image_ap"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["pixel_auroc"] == pytest.approx(0.75, abs=1e-7)
    assert r["pixel_ap"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["pixel_aupro"] == pytest.approx(0.5, abs=1e-9)
    assert set(r) == set(METRIC_NAMES)


def test_pixel_metrics_and_aupro_on_hand_made_mask():
    # two regions: A = both pixels 0.9; B = 0.9 and 0.2. Normal pixels: one 0.8, seven 0.
    # AUROC: (3*8 + 1*7) / 32. AP: 0.75*1 + 0.25*0.8 = 0.95.
    # PRO curve: (0,0),(0,.75),(.125,.75),(.125,1),(1,1) -> (0.125*0.75 + 0.175*1)/0.3
    values = [[0.9, 0.9, 0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.9, 0.2]]
    mask = [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    maps, masks = _pixels(values, mask)
    acc = ClassMetricAccumulator("t/hand")
    acc.update(torch.tensor([0.9]), maps, torch.tensor([1]), masks)
    r = _quiet_compute(acc)  # image metrics are undefined with a single image
    assert acc.n_regions == 2
    assert r["pixel_auroc"] == pytest.approx(31 / 32, abs=1e-7)
    assert r["pixel_ap"] == pytest.approx(0.95, abs=1e-6)
    assert r["pixel_aupro"] == pytest.approx((0.125 * 0.75 + 0.175) / 0.3, abs=1e-12)


@pytest.mark.filterwarnings("ignore::cdad_dist.eval.metrics.DegenerateMetricWarning")  # one image only
def test_aupro_interpolates_at_the_fpr_limit():
    # one 4-pixel region (0.15, 0.25, 0.3, 0.45); normal pixels 0.1, 0.2, 0.3, 0.4 (the tie at 0.3 makes
    # FPR and PRO move together: a sloped segment (.25,.25) -> (.5,.5) crossing FPR 0.3, PRO(0.3) = 0.3)
    maps, masks = _pixels([[0.1, 0.2, 0.3, 0.4], [0.15, 0.25, 0.3, 0.45]], [[0, 0, 0, 0], [1, 1, 1, 1]])
    r = compute_class_metrics("t/interp", torch.tensor([1.0]), maps, torch.tensor([1]), masks)
    assert r["pixel_aupro"] == pytest.approx((0.25 * 0.25 + 0.05 * (0.25 + 0.3) / 2) / 0.3, abs=1e-12)

    # four more normal pixels below everything (FPR steps of 1/8): curve (0,.25), (.125,.25), (.25,.5),
    # (.25,.75), (.375,.75): PRO(0.3) = .75 on a flat segment
    maps, masks = _pixels(
        [[0.1, 0.2, 0.3, 0.4], [-1.0, -1.0, -1.0, -1.0], [0.15, 0.25, 0.3, 0.45]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]],
    )
    r = compute_class_metrics("t/interp8", torch.tensor([1.0]), maps, torch.tensor([1]), masks)
    area = 0.125 * 0.25 + 0.125 * (0.25 + 0.5) / 2 + 0.05 * 0.75
    assert r["pixel_aupro"] == pytest.approx(area / 0.3, abs=1e-12)


def test_trapezoid_to_limit():
    x, y = np.array([0.0, 0.2, 0.6, 1.0]), np.array([0.0, 0.4, 0.8, 1.0])
    # up to 0.3: 0.5*0.2*0.4 + 0.1*(0.4 + 0.5)/2
    assert trapezoid_to_limit(x, y, 0.3) == pytest.approx(0.04 + 0.045)
    assert trapezoid_to_limit(x, y, 1.0) == pytest.approx(np.trapezoid(y, x))
    assert trapezoid_to_limit(x, y, 0.2) == pytest.approx(0.04)


def test_connectivity_is_eight_by_default():
    # two pixels touching at a corner: one region with 8-connectivity, two with 4-connectivity
    maps, masks = _pixels([[1.0, 0.0], [0.0, 1.0]], [[1, 0], [0, 1]])
    acc8, acc4 = ClassMetricAccumulator("t/c8"), ClassMetricAccumulator("t/c4", MetricConfig(pro_connectivity=4))
    for acc in (acc8, acc4):
        acc.update(torch.tensor([1.0]), maps, torch.tensor([1]), masks)
    assert (acc8.n_regions, acc4.n_regions) == (1, 2)


# ------------------------------------------------------------------------------------------------ keyed vs exact
def _smooth_case(seed: int, n: int = 16, size: int = 250):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n // 2, n):  # half the images anomalous: a few rectangles each
        for _ in range(3):
            side = max(6, size // 6)
            y, x = torch.randint(0, size - side, (2,), generator=gen).tolist()
            h, w = torch.randint(2, side, (2,), generator=gen).tolist()
            masks[i, 0, y : y + h, x : x + w] = 1
    noise = torch.randn(n, 1, size, size, generator=gen)
    maps = 3.0 + noise + 1.5 * masks + 0.3 * noise**2  # skewed, continuous
    labels = (masks.flatten(1).amax(1) > 0).long()
    return maps, masks, labels


def test_keyed_pixel_metrics_match_exact_on_a_million_pixels():
    maps, masks, labels = _smooth_case(0)
    assert maps.numel() == 1_000_000
    acc = ClassMetricAccumulator("t/keyed")
    for i in range(0, maps.shape[0], 4):
        acc.update(maps[i : i + 4].amax((1, 2, 3)), maps[i : i + 4], labels[i : i + 4], masks[i : i + 4])
    r = acc.compute()
    p = maps.flatten().double()
    preds = (p - p.min()) / (p.max() - p.min())
    target = masks.flatten().long()
    exact_auroc = float(BinaryAUROC()(preds, target))
    exact_ap = float(BinaryAveragePrecision()(preds, target))
    assert abs(r["pixel_auroc"] - exact_auroc) < 5e-4  # 0.05 points
    assert abs(r["pixel_ap"] - exact_ap) < 5e-4  # 0.05 points
    assert 0.7 < exact_auroc < 0.99  # a non-trivial case


def _exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Independent reference: every distinct score is a threshold (score >= t), numpy only."""
    comps = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        comps += [np.sort(m[lab == k]) for k in range(1, n + 1)]
    normal = np.sort(maps[masks == 0])
    thresholds = np.unique(maps)[::-1]
    fpr = [0.0] + [(normal.size - np.searchsorted(normal, t)) / normal.size for t in thresholds]
    pro = [0.0] + [np.mean([(c.size - np.searchsorted(c, t)) / c.size for c in comps]) for t in thresholds]
    return trapezoid_to_limit(np.array(fpr), np.array(pro), limit) / limit


def test_keyed_aupro_matches_an_exact_reference():
    maps, masks, labels = _smooth_case(1, n=8, size=64)
    acc = ClassMetricAccumulator("t/pro")
    acc.update(maps.amax((1, 2, 3)), maps, labels, masks)
    keyed = acc.compute()["pixel_aupro"]
    exact = _exact_aupro(maps[:, 0].double().numpy(), masks[:, 0].numpy())
    assert abs(keyed - exact) < 5e-4
    assert 0.05 < exact < 0.95


# ------------------------------------------------------------------------------------------------ predictors
def _predictor_case(kind: str):
    maps, masks, labels = _smooth_case(2, n=12, size=64)
    gen = torch.Generator().manual_seed(5)
    if kind == "perfect":
        maps = masks + 0.1 * torch.rand(masks.shape, generator=gen)
        scores = labels.float() + 0.1 * torch.rand(labels.shape, generator=gen)
    elif kind == "random":
        maps = torch.rand(masks.shape, generator=gen)
        scores = torch.rand(labels.shape, generator=gen)
    else:  # inverted: low where anomalous
        maps = -(masks + 0.1 * torch.rand(masks.shape, generator=gen))
        scores = -(labels.float() + 0.1 * torch.rand(labels.shape, generator=gen))
    return compute_class_metrics(f"t/{kind}", scores, maps, labels, masks)


def test_perfect_predictor():
    r = _predictor_case("perfect")
    for name in METRIC_NAMES:
        assert r[name] == pytest.approx(1.0, abs=1e-6), name


def test_random_predictor():
    r = _predictor_case("random")
    assert abs(r["pixel_auroc"] - 0.5) < 0.02
    assert 0.1 < r["image_auroc"] < 0.9  # 12 images: loose
    assert r["pixel_aupro"] < 0.3  # random PRO stays near FPR itself (0.15 on average below FPR 0.3)


def test_inverted_predictor_is_not_flipped():
    r = _predictor_case("inverted")
    assert r["image_auroc"] == pytest.approx(0.0, abs=1e-6)
    assert r["pixel_auroc"] == pytest.approx(0.0, abs=1e-3)
    assert r["pixel_aupro"] == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------ streaming / merge
def test_merge_is_exact_and_order_independent():
    maps, masks, labels = _smooth_case(3, n=8, size=48)
    maps[5:] = maps[5:] * 40.0 + 100.0  # later batches far outside the first range: forces regridding
    maps[0] = 2.0  # first batch constant: zero-width range
    scores = maps.amax((1, 2, 3))

    single = ClassMetricAccumulator("t/merge")
    for i in range(8):
        single.update(scores[i : i + 1], maps[i : i + 1], labels[i : i + 1], masks[i : i + 1])

    rank0, rank1 = ClassMetricAccumulator("t/merge"), ClassMetricAccumulator("t/merge")
    for i in (7, 2, 4, 0):
        rank0.update(scores[i : i + 1], maps[i : i + 1], labels[i : i + 1], masks[i : i + 1])
    for i in (1, 6, 3, 5):
        rank1.update(scores[i : i + 1], maps[i : i + 1], labels[i : i + 1], masks[i : i + 1])
    # what a gather does: states travel pickled
    states = [pickle.loads(pickle.dumps(a.state_tensors())) for a in (rank1, rank0)]
    merged = ClassMetricAccumulator.from_states("t/merge", states)

    a, b = single.compute(), merged.compute()
    for name in METRIC_NAMES:
        assert a[name] == pytest.approx(b[name], abs=1e-12), name
    assert merged.n_images == 8 and merged.n_regions == single.n_regions
    sa, sb = single.state_tensors(), merged.state_tensors()
    assert torch.equal(sa["pixel_keys"], sb["pixel_keys"])
    assert torch.equal(sa["pixel_counts"], sb["pixel_counts"])  # integers: equal, not close


def test_merge_with_an_empty_rank_and_key_bits_mismatch():
    maps, masks, labels = _smooth_case(4, n=4, size=32)
    acc = ClassMetricAccumulator("t/empty")
    acc.update(maps.amax((1, 2, 3)), maps, labels, masks)
    before = acc.compute()
    acc.merge(ClassMetricAccumulator("t/empty").state_tensors())
    assert acc.compute() == before
    empty = ClassMetricAccumulator("t/empty")
    empty.merge(acc)
    assert empty.compute() == before
    with pytest.raises(CdadError, match="pixel_key_bits"):
        ClassMetricAccumulator("t/empty", MetricConfig(pixel_key_bits=16)).merge(acc.state_tensors())


def test_state_is_bounded_by_the_key_grid_not_by_pixels_or_regions():
    # 14 bits keep 5 mantissa bits: at most 32 keys per octave, whatever the number of pixels or regions
    acc = ClassMetricAccumulator("t/bounded", MetricConfig(pixel_key_bits=14))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        masks = (torch.rand(2, 1, 64, 64, generator=gen) < 0.2).float()  # thousands of tiny regions
        maps = 1.0 + torch.rand(2, 1, 64, 64, generator=gen)  # one octave, [1, 2)
        acc.update(torch.rand(2, generator=gen), maps, torch.tensor([1, 1]), masks)
    assert acc.n_regions > 1000
    assert acc.n_keys == 32
    assert acc.state_tensors()["pixel_counts"].shape == (3, 32)


# ------------------------------------------------------------------------------------------------ degenerate / errors
def test_degenerate_classes_give_nan_with_warning():
    maps = torch.rand(3, 1, 8, 8)
    normal_masks = torch.zeros(3, 1, 8, 8)
    acc = ClassMetricAccumulator("t/all_normal")
    acc.update(maps.amax((1, 2, 3)), maps, torch.zeros(3, dtype=torch.long), normal_masks)
    with pytest.warns(DegenerateMetricWarning, match="t/all_normal"):
        r = acc.compute()
    assert all(math.isnan(r[name]) for name in METRIC_NAMES)

    with pytest.warns(DegenerateMetricWarning, match="no image"):
        r = ClassMetricAccumulator("t/empty").compute()
    assert all(math.isnan(v) for v in r.values())

    # anomalous images only: image metrics NaN, pixel metrics defined
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:4, 2:4] = 1
    acc = ClassMetricAccumulator("t/all_anomalous")
    acc.update(torch.rand(2), masks + 0.01 * torch.rand(2, 1, 8, 8), torch.ones(2, dtype=torch.long), masks)
    with pytest.warns(DegenerateMetricWarning):
        r = acc.compute()
    assert math.isnan(r["image_auroc"]) and r["pixel_auroc"] == pytest.approx(1.0)


def test_bad_inputs_raise_cdad_errors():
    acc = ClassMetricAccumulator("t/bad")
    maps, masks = torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    with pytest.raises(CdadError, match="pixel_key_bits"):
        MetricConfig(pixel_key_bits=8)
    with pytest.raises(CdadError, match="batch sizes"):
        acc.update(torch.rand(3), maps, torch.tensor([0, 1]), masks)
    with pytest.raises(CdadError, match="labels"):
        acc.update(torch.rand(2), maps, torch.tensor([0, 2]), masks)
    with pytest.raises(CdadError, match="B×1×H×W"):
        acc.update(torch.rand(2), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), masks)
    with pytest.raises(CdadError):
        MetricConfig(pro_fpr_limit=0.0)


def test_masks_are_resized_with_nearest_neighbour():
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, None]
    up = resize_masks_nearest(mask, (4, 4))
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(up[0, 0], expected)
    soft = torch.full((1, 1, 6, 6), 0.7)  # e.g. a mask read as 0..1 floats after an interpolating resize
    down = resize_masks_nearest(soft, (3, 3))
    assert set(down.unique().tolist()) == {1.0}
    # update() resizes masks to the map size itself
    acc = ClassMetricAccumulator("t/resize")
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, :2, 2:] = 1.0
    acc.update(torch.tensor([1.0]), maps, torch.tensor([1]), torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))
    assert _quiet_compute(acc)["pixel_auroc"] == pytest.approx(1.0)
