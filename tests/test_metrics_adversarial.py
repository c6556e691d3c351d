"""Pixel metrics on the inputs that broke the round-1 grid, against exact sklearn / an exact AUPRO reference.

Heavy tails, one huge outlier pixel, per-image scales of 10^±3, shuffled batch order and 1/2/4 ranks: the binned
metrics must stay within 0.05 points of exact and be identical (bit for bit) across orders and rank counts.
"""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from cdad_dist.eval.metrics import (
    PIXEL_METRICS,
    ClassMetricAccumulator,
    DegenerateMetricWarning,
    MetricConfig,
    NonFiniteMapWarning,
    float_keys,
    trapezoid_to_limit,
)

POINTS = 0.05 / 100  # the tolerance: 0.05 metric points


def _masks(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    masks = torch.zeros(n, 1, size, size)
    for i in range(n // 2, n):
        for _ in range(2):
            y, x = torch.randint(0, size - 12, (2,), generator=gen).tolist()
            h, w = torch.randint(2, 12, (2,), generator=gen).tolist()
            masks[i, 0, y:y + h, x:x + w] = 1
    return masks


def _case(kind: str, n: int = 12, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(kind))
    masks = _masks(gen, n, size)
    noise = torch.randn(n, 1, size, size, generator=gen)
    if kind == "lognormal":  # heavy right tail over several decades
        maps = torch.exp(2.0 * noise + 1.2 * masks)
    elif kind == "outlier":  # one pixel of 1e6 among scores of order 1
        maps = 1.0 + noise.abs() + 1.0 * masks
        maps[0, 0, 0, 0] = 1e6
    elif kind == "scales":  # every image on its own scale, 10^-3 … 10^3
        scale = 10.0 ** torch.linspace(-3, 3, n).view(n, 1, 1, 1)
        maps = scale * (1.0 + noise.abs() + 0.8 * masks)
    else:
        raise ValueError(kind)
    return maps.float(), masks


def _exact(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> dict[str, float]:
    """sklearn AUROC / AP on every pixel, and the MVTec AUPRO with every distinct score as a threshold."""
    p, g = maps.flatten().double().numpy(), masks.flatten().numpy() > 0.5
    m, gt = maps[:, 0].double().numpy(), masks[:, 0].numpy() > 0.5
    comps = []
    for mi, gi in zip(m, gt):
        lab, k = ndimage.label(gi, structure=np.ones((3, 3)))
        comps += [np.sort(mi[lab == j]) for j in range(1, k + 1)]
    normal = np.sort(m[~gt])
    thresholds = np.unique(m)[::-1]
    fpr = np.concatenate([[0.0], (normal.size - np.searchsorted(normal, thresholds)) / normal.size])
    pro_per = np.stack([(c.size - np.searchsorted(c, thresholds)) / c.size for c in comps])
    pro = np.concatenate([[0.0], pro_per.mean(0)])
    return {"pixel_auroc": roc_auc_score(g, p), "pixel_ap": average_precision_score(g, p),
            "pixel_aupro": trapezoid_to_limit(fpr, pro, limit) / limit}


def _accumulate(maps, masks, order, ranks: int = 1, batch: int = 1, cfg: MetricConfig | None = None):
    labels = (masks.flatten(1).amax(1) > 0).long()
    scores = maps.flatten(1).amax(1)
    accs = [ClassMetricAccumulator("t/adv", cfg) for _ in range(ranks)]
    for j, start in enumerate(range(0, len(order), batch)):
        idx = list(order[start:start + batch])
        accs[j % ranks].update(scores[idx], maps[idx], labels[idx], masks[idx])
    states = [pickle.loads(pickle.dumps(a.state_tensors())) for a in accs]  # what a gather does
    merged = ClassMetricAccumulator.from_states("t/adv", states, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        return merged.compute(), merged.state_tensors()


@pytest.mark.parametrize("kind", ["lognormal", "outlier", "scales"])
def test_pixel_metrics_are_exact_to_five_hundredths_of_a_point_on_adversarial_maps(kind):
    maps, masks = _case(kind)
    exact = _exact(maps, masks)
    got, _ = _accumulate(maps, masks, range(maps.shape[0]))
    for name in PIXEL_METRICS:
        assert abs(got[name] - exact[name]) <= POINTS, (kind, name, got[name], exact[name])


@pytest.mark.parametrize("kind", ["lognormal", "outlier", "scales"])
def test_pixel_metrics_are_identical_across_batch_order_batch_size_and_rank_count(kind):
    maps, masks = _case(kind)
    n = maps.shape[0]
    reference, ref_state = _accumulate(maps, masks, range(n))
    rng = np.random.default_rng(7)
    for ranks, batch in ((1, 5), (2, 1), (2, 3), (4, 2), (4, 1)):
        order = rng.permutation(n)
        got, state = _accumulate(maps, masks, order, ranks=ranks, batch=batch)
        assert got == reference, (ranks, batch)  # bit for bit, not approximately
        assert torch.equal(state["pixel_keys"], ref_state["pixel_keys"])
        assert torch.equal(state["pixel_counts"], ref_state["pixel_counts"])


def test_thirty_two_key_bits_are_exact_on_float32_maps():
    maps, masks = _case("lognormal", n=6, size=32)
    exact = _exact(maps, masks)
    got, _ = _accumulate(maps, masks, range(6), cfg=MetricConfig(pixel_key_bits=32))
    # torchmetrics turns the integer confusion matrices into rates in float32: exact up to its rounding
    assert got["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=1e-6)
    assert got["pixel_ap"] == pytest.approx(exact["pixel_ap"], abs=1e-6)
    assert got["pixel_aupro"] == pytest.approx(exact["pixel_aupro"], abs=1e-9)


def test_keys_preserve_float_order_across_signs_zeros_and_extremes():
    values = torch.tensor([-3e38, -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 1.0000001, 3e38])
    keys = float_keys(values, 32)
    assert bool((keys[1:] >= keys[:-1]).all())
    assert int(keys[4]) == int(keys[5])  # -0.0 and +0.0 are the same score
    assert len(set(keys.tolist())) == values.numel() - 1
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(torch.argsort(float_keys(shuffled, 32), stable=True),
                       torch.argsort(shuffled + 0.0, stable=True))


def test_a_non_finite_map_is_recorded_by_name_and_makes_the_class_nan_without_raising():
    maps, masks = _case("outlier", n=4, size=16)
    maps[1, 0, 3, :5] = float("nan")
    acc = ClassMetricAccumulator("t/nan")
    labels = (masks.flatten(1).amax(1) > 0).long()
    with pytest.warns(NonFiniteMapWarning, match=r"t/nan.*cls/test/good/001.*5 of 256"):
        acc.update(maps.flatten(1).nan_to_num(0).amax(1), maps, labels, masks,
                   names=[f"cls/test/good/{i:03d}" for i in range(4)])
    assert acc.n_nonfinite_images == 1 and acc.n_images == 4
    merged = ClassMetricAccumulator.from_states("t/nan", [acc.state_tensors(), ClassMetricAccumulator("t/nan").state_tensors()])
    with pytest.warns(DegenerateMetricWarning, match="NaN/inf"):
        result = merged.compute()
    assert all(np.isnan(v) for v in result.values())


def test_key_bits_are_configurable_and_validated():
    from cdad_dist.errors import CdadError
    with pytest.raises(CdadError, match="pixel_key_bits"):
        MetricConfig(pixel_key_bits=40)
    maps, masks = _case("scales", n=4, size=16)
    a = ClassMetricAccumulator("t/bits", MetricConfig(pixel_key_bits=16))
    b = ClassMetricAccumulator("t/bits")
    with pytest.raises(CdadError, match="pixel_key_bits 22 and 16"):
        labels = (masks.flatten(1).amax(1) > 0).long()
        b.update(maps.flatten(1).amax(1), maps, labels, masks)
        a.merge(b)


def test_map_dtype_does_not_change_the_metrics():
    """bf16 / fp16 maps (autocast evaluation) and fp64 maps give the metrics of the same values in float32."""
    maps, masks = _case("lognormal", n=6, size=24)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = maps.clamp(max=6e4).to(dtype)  # fp16 range
        reference, _ = _accumulate(low.float(), masks, range(6))
        got, _ = _accumulate(low, masks, range(6))
        assert got == reference, dtype
