"""Per-class anomaly-detection metrics, streaming and mergeable across ranks.

Image level (exact): AUROC and AP from torchmetrics on every image score of the class (a few hundred floats).

Pixel level (binned, bounded memory): every pixel score is counted in a histogram on a *dyadic* grid: bin ``j``
at level ``k`` is ``[j * 2**k, (j + 1) * 2**k)``, and a window of ``bins`` consecutive bins is kept. When a batch
falls outside the window, the level grows and neighbouring bins merge; because dyadic grids nest, this is
exact, the result does not depend on the order of the batches, and histograms from different ranks merge into
exactly the histogram one rank would have built. (torchmetrics' binned metrics need the score range before the
first update; a class's range is only known after its last batch, hence this grid.) At ``compute()`` the
window edges ``e_0 < ... < e_bins`` are normalised into [0, 1] by the window's min/max, i.e. ``j / bins``, and
torchmetrics' ``BinaryAUROC`` / ``BinaryAveragePrecision`` with those thresholds receive the exact confusion
matrices ``score >= e_j`` through their public ``merge_state``. The data always spans at least half the
window, so the resolution is at least ``bins / 2`` thresholds over the class's own min..max.

AUPRO (written by hand: anomalib's AUPRO was wrong until its v2.3, issues #1651 and #3718): the MVTec AD
reference definition: FPR over all normal pixels of the class; PRO = mean, over every connected ground-truth
region (8-connectivity, ``scipy.ndimage.label``) of every image, of the fraction of the region's pixels above
the threshold; thresholds shared across images; the (FPR, PRO) curve integrated with the trapezoid rule up to
FPR = ``pro_fpr_limit`` (linear interpolation at the limit) and divided by the limit. Choice for bounded
memory: binned thresholds, the same dyadic edges as above. Since the mean overlap is a sum over regions, each
anomalous pixel is counted with weight ``1 / |its region|`` in one more histogram row; the weighted count above
``e_j`` divided by the number of regions is PRO(e_j). So the state is 3 rows × bins, whatever the number of
regions, and no map is kept.

No AUROC flipping anywhere: an inverted predictor scores ≈ 0. Degenerate classes (no anomalous or no normal
image / pixel) give NaN for the affected metrics with a :class:`DegenerateMetricWarning`, never an exception.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from cdad_dist.errors import CdadError

METRIC_NAMES: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
"""Keys of :meth:`ClassMetricAccumulator.compute`, in report order."""

IMAGE_METRICS = ("image_auroc", "image_ap")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro")

_NEG_ROW, _POS_ROW, _PRO_ROW = 0, 1, 2  # normal count, anomalous count, region-weighted anomalous
_MAX_LEVEL_STEPS = 4096  # guards the level search against a non-finite range (validated earlier anyway)


class DegenerateMetricWarning(UserWarning):
    """A metric is undefined for a class (e.g. no anomalous image); its value is NaN."""


@dataclass
class MetricConfig:
    """Options of the per-class metrics.

    pixel_bins: histogram window size; the binned pixel AUROC/AP/AUPRO use ``pixel_bins + 1`` thresholds and
        at least ``pixel_bins / 2`` of them lie inside the class's score range.
    pro_fpr_limit: FPR up to which the PRO curve is integrated (the MVTec AD standard is 0.3).
    pro_connectivity: 8 (the MVTec AD reference, a 3×3 structuring element) or 4.
    mask_threshold: ground-truth mask values above it are anomalous.
    """

    pixel_bins: int = 4096
    pro_fpr_limit: float = 0.3
    pro_connectivity: int = 8
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.pixel_bins < 16:
            raise CdadError(f"metrics.pixel_bins must be >= 16, got {self.pixel_bins}")
        if not 0.0 < self.pro_fpr_limit <= 1.0:
            raise CdadError(f"metrics.pro_fpr_limit must be in (0, 1], got {self.pro_fpr_limit}")
        if self.pro_connectivity not in (4, 8):
            raise CdadError(f"metrics.pro_connectivity must be 4 or 8, got {self.pro_connectivity}")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def resize_masks_nearest(masks: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Resize ground-truth masks B×1×h×w to ``size`` with nearest neighbour and binarise them to {0, 1}.

    Nearest (``nearest-exact``, pixel-centre aligned like PIL/OpenCV) and not bilinear, so the ground truth is
    neither dilated nor blurred (the official code's bilinear + ``> 0`` dilates MVTec masks).
    """
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise CdadError(f"masks must be B×1×H×W, got shape {tuple(masks.shape)}")
    masks = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=tuple(size), mode="nearest-exact")
    return (masks > threshold).float()


def trapezoid_to_limit(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) for x in [x[0], x_max], trapezoid rule, y linearly interpolated at ``x_max``.

    ``x`` must be ascending (repeated values allowed: vertical steps). Same semantics as the MVTec AD reference
    ``trapezoid`` (written here because that code is not a package).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = x <= x_max
    area = float(np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep])))
    if keep.all() or not keep.any():
        return area
    i = int(np.argmax(~keep))  # first point beyond the limit; x[i - 1] <= x_max < x[i]
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    y_lim = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return area + 0.5 * (y0 + y_lim) * (x_max - x0)


def _warn(cls_name: str, what: str) -> None:
    warnings.warn(f"class {cls_name!r}: {what}; the metric is NaN", DegenerateMetricWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# dyadic histogram
# ----------------------------------------------------------------------------------------------------------------
class _DyadicHistogram:
    """Weighted counts of float scores, ``rows`` groups × ``bins`` bins on a power-of-two grid (module doc).

    Counts are float64 (integer counts stay exact up to 2**53)."""

    def __init__(self, bins: int, rows: int) -> None:
        self.bins = bins
        self.level: int | None = None  # bin width is 2**level
        self.start = 0  # absolute index of the window's first bin
        self.counts = torch.zeros(rows, bins, dtype=torch.float64)

    # --- grid arithmetic -------------------------------------------------------------------------------------
    @staticmethod
    def _index(values: torch.Tensor, level: int) -> torch.Tensor:
        return torch.floor(values * (2.0 ** (-level))).to(torch.int64)

    @staticmethod
    def _scalar_index(value: float, level: int) -> int:
        return math.floor(value * 2.0 ** (-level))

    def _lowest_level(self, lo: float, hi: float) -> int:
        """A level the data [lo, hi] cannot need to go below; also keeps |index| < 2**52 (float64 precision)."""
        mag, span = max(abs(lo), abs(hi)), hi - lo
        if mag == 0:
            return -60
        level = math.floor(math.log2(mag)) - 50
        if span > 0:
            return max(level, math.floor(math.log2(span / self.bins)) - 1)
        return max(level, math.floor(math.log2(mag)) - 30)

    def _fit(self, windows: list[tuple[int, int]], lo: float | None, hi: float | None, level: int) -> tuple[int, int]:
        """Finest (level', start) with level' >= level whose window holds every (level, start) window given and
        the scores [lo, hi]."""
        for new_level in range(level, level + _MAX_LEVEL_STEPS):
            ends: list[int] = []
            for w_level, w_start in windows:
                steps = min(new_level - w_level, 63)
                ends += [w_start >> steps, (w_start + self.bins - 1) >> steps]
            if lo is not None:
                ends += [self._scalar_index(lo, new_level), self._scalar_index(hi, new_level)]
            if max(ends) - min(ends) + 1 <= self.bins:
                return new_level, min(ends)
        raise CdadError("score range too wide for the pixel histogram (non-finite scores?)")

    def _regrid(self, level: int, start: int) -> None:
        """Move the counts to a coarser-or-equal grid (level, start); exact because dyadic bins nest."""
        if self.level is None or (level == self.level and start == self.start):
            self.level, self.start = level, start
            return
        steps = min(level - self.level, 63)
        old_abs = torch.arange(self.bins, dtype=torch.int64) + self.start
        new_rel = (old_abs >> steps) - start
        if new_rel.min() < 0 or new_rel.max() >= self.bins:
            raise AssertionError("internal: regrid window does not cover the old window")
        new = torch.zeros_like(self.counts)
        new.index_add_(1, new_rel, self.counts)
        self.counts, self.level, self.start = new, level, start

    def ensure_range(self, lo: float, hi: float) -> None:
        """Grow the window (coarsening if needed) so that [lo, hi] falls inside it."""
        level = self._lowest_level(lo, hi)
        if self.level is None:
            self.level, self.start = self._fit([], lo, hi, level)
            return
        self._regrid(*self._fit([(self.level, self.start)], lo, hi, max(level, self.level)))

    def add(self, values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Add float64 ``values`` with ``weights`` into histogram rows ``rows`` (all of the same length)."""
        if values.numel() == 0:
            return
        self.ensure_range(float(values.min()), float(values.max()))
        rel = self._index(values, self.level) - self.start
        flat = rows * self.bins + rel
        n_rows = self.counts.shape[0]
        hist = torch.bincount(flat, weights=weights, minlength=n_rows * self.bins)
        self.counts += hist.view(n_rows, self.bins)

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` window edges in score units (float64)."""
        j = np.arange(self.start, self.start + self.bins + 1, dtype=np.float64)
        return j * 2.0 ** self.level

    # --- merging ---------------------------------------------------------------------------------------------
    def common_grid(self, other: "_DyadicHistogram") -> tuple[int, int]:
        """The finest (level, start) whose window holds both windows."""
        windows = [(self.level, self.start), (other.level, other.start)]
        return self._fit(windows, None, None, max(self.level, other.level))


# ----------------------------------------------------------------------------------------------------------------
# the accumulator
# ----------------------------------------------------------------------------------------------------------------
class ClassMetricAccumulator:
    """Streaming metrics of one class: ``update`` per batch, ``compute`` once; mergeable across ranks.

    Distributed use: each rank updates its own accumulator with its share of the class's test images; then
    the caller gathers ``state_tensors()`` of every rank (e.g. ``torch.distributed.all_gather_object`` or
    ``accelerate.utils.gather_object``) and merges them (``merge`` or :meth:`from_states`). The merged result
    is identical to a single accumulator fed every batch, whatever the order.

    Pixel state lives on the CPU (maps are moved there in ``update``), so it is independent of the device.
    """

    def __init__(self, cls_name: str, cfg: MetricConfig | None = None) -> None:
        self.cls_name = cls_name
        self.cfg = cfg or MetricConfig()
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._hist = _DyadicHistogram(self.cfg.pixel_bins, rows=3)
        self._n_regions = 0
        self._structure = np.ones((3, 3), dtype=int) if self.cfg.pro_connectivity == 8 else None

    # --- update ----------------------------------------------------------------------------------------------
    def _check_batch(self, scores, maps, labels, masks) -> tuple[torch.Tensor, ...]:
        where = f"class {self.cls_name!r}"
        if maps.dim() == 3:
            maps = maps.unsqueeze(1)
        if maps.dim() != 4 or maps.shape[1] != 1:
            raise CdadError(f"{where}: maps must be B×1×H×W, got shape {tuple(maps.shape)}")
        b = maps.shape[0]
        scores = torch.as_tensor(scores).detach().reshape(-1)
        labels = torch.as_tensor(labels).detach().reshape(-1)
        if scores.numel() != b or labels.numel() != b or masks.shape[0] != b:
            raise CdadError(
                f"{where}: batch sizes differ: scores {scores.numel()}, maps {b}, labels {labels.numel()}, "
                f"masks {masks.shape[0]}"
            )
        labels_f = labels.to("cpu", torch.float64)
        if not bool(((labels_f == 0) | (labels_f == 1)).all()):
            raise CdadError(f"{where}: labels must be 0 (normal) or 1 (anomalous), got {labels.tolist()}")
        maps = maps.detach().to("cpu", torch.float64)
        scores = scores.to("cpu", torch.float64)
        if not bool(torch.isfinite(maps).all()) or not bool(torch.isfinite(scores).all()):
            raise CdadError(f"{where}: anomaly maps or scores contain NaN/inf")
        masks = resize_masks_nearest(masks.detach().cpu(), tuple(maps.shape[-2:]), self.cfg.mask_threshold)
        return scores, maps[:, 0], labels_f.to(torch.int64), masks[:, 0].bool()

    def update(self, scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: image scores (B), anomaly maps (B×1×H×W), labels (B, 0/1), masks (B×1×h×w, any size:
        resized to the map size with nearest neighbour)."""
        scores, maps, labels, masks = self._check_batch(scores, maps, labels, masks)
        self._scores.append(scores)
        self._labels.append(labels)
        values = maps.reshape(-1)
        rows = torch.where(masks, _POS_ROW, _NEG_ROW).reshape(-1)
        region_weight, n_regions = self._region_weights(masks)
        region_weight = region_weight.reshape(-1)
        anomalous = region_weight > 0
        # every pixel counts once in the normal/anomalous rows; anomalous ones once more, weighted 1/|region|
        self._hist.add(
            torch.cat([values, values[anomalous]]),
            torch.cat([rows, torch.full((int(anomalous.sum()),), _PRO_ROW, dtype=torch.int64)]),
            torch.cat([torch.ones_like(values), region_weight[anomalous]]),
        )
        self._n_regions += n_regions

    def _region_weights(self, masks: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per pixel 1 / size of its connected GT region (0 for normal pixels), and the number of regions."""
        out = np.zeros(masks.shape, dtype=np.float64)
        total = 0
        for i, mask in enumerate(masks.numpy()):
            if not mask.any():
                continue
            labelled, n = ndimage.label(mask, structure=self._structure)
            sizes = np.bincount(labelled.ravel(), minlength=n + 1).astype(np.float64)
            inverse = np.zeros(n + 1)
            inverse[1:] = 1.0 / sizes[1:]
            out[i] = inverse[labelled]
            total += n
        return torch.from_numpy(out), total

    # --- state / merge ---------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return int(sum(s.numel() for s in self._scores))

    @property
    def n_regions(self) -> int:
        """Connected ground-truth regions seen so far."""
        return self._n_regions

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state as CPU tensors (for a gather); :meth:`merge` takes the same dict back."""
        level = self._hist.level
        return {
            "image_scores": torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64),
            "image_labels": torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.int64),
            "pixel_counts": self._hist.counts.clone(),
            "pixel_grid": torch.tensor(
                [0 if level is None else 1, 0 if level is None else level, self._hist.start, self._hist.bins],
                dtype=torch.int64,
            ),
            "n_regions": torch.tensor(self._n_regions, dtype=torch.int64),
        }

    def merge(self, other: "ClassMetricAccumulator | dict[str, torch.Tensor]") -> None:
        """Merge another rank's accumulator (or its ``state_tensors()``) into this one; exact."""
        state = other.state_tensors() if isinstance(other, ClassMetricAccumulator) else other
        missing = {"image_scores", "image_labels", "pixel_counts", "pixel_grid", "n_regions"} - set(state)
        if missing:
            raise CdadError(f"class {self.cls_name!r}: metric state lacks keys {sorted(missing)}")
        has_grid, level, start, bins = (int(v) for v in state["pixel_grid"].tolist())
        if bins != self._hist.bins:
            raise CdadError(
                f"class {self.cls_name!r}: cannot merge metric states with pixel_bins {bins} and {self._hist.bins}"
            )
        self._scores.append(state["image_scores"].to(torch.float64).cpu())
        self._labels.append(state["image_labels"].to(torch.int64).cpu())
        self._n_regions += int(state["n_regions"])
        if not has_grid:
            return
        incoming = _DyadicHistogram(bins, rows=3)
        incoming.level, incoming.start = level, start
        incoming.counts = state["pixel_counts"].to(torch.float64).cpu().clone()
        if self._hist.level is None:
            self._hist.level, self._hist.start = level, start
        else:
            grid = self._hist.common_grid(incoming)
            self._hist._regrid(*grid)
            incoming._regrid(*grid)
        self._hist.counts = self._hist.counts + incoming.counts

    @classmethod
    def from_states(
        cls, cls_name: str, states: list[dict[str, torch.Tensor]], cfg: MetricConfig | None = None
    ) -> "ClassMetricAccumulator":
        """One accumulator from the gathered states of every rank."""
        acc = cls(cls_name, cfg)
        for state in states:
            acc.merge(state)
        return acc

    # --- compute ---------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, float]:
        """All of :data:`METRIC_NAMES` as floats (NaN, with a warning, where undefined for this class)."""
        out = {name: math.nan for name in METRIC_NAMES}
        if self.n_images == 0:
            _warn(self.cls_name, "no image was evaluated")
            return out
        out.update(self._image_metrics())
        out.update(self._pixel_metrics())
        return out

    def _image_metrics(self) -> dict[str, float]:
        scores = torch.cat(self._scores)
        labels = torch.cat(self._labels)
        n_pos = int(labels.sum())
        if n_pos == 0 or n_pos == labels.numel():
            _warn(self.cls_name, "image metrics need both normal and anomalous images")
            return {}
        # Exact metrics. Scores are min/max-normalised into [0, 1] (order-preserving, float64) because
        # torchmetrics applies a sigmoid to scores outside [0, 1], which would tie large scores in float32.
        span = scores.max() - scores.min()
        preds = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
        auroc = BinaryAUROC(thresholds=None)(preds, labels)
        ap = BinaryAveragePrecision(thresholds=None)(preds, labels)
        return {"image_auroc": float(auroc), "image_ap": float(ap)}

    def _pixel_metrics(self) -> dict[str, float]:
        counts = self._hist.counts
        n_neg, n_pos = round(float(counts[_NEG_ROW].sum())), round(float(counts[_POS_ROW].sum()))
        if n_neg == 0 or n_pos == 0:
            _warn(self.cls_name, "pixel metrics need both normal and anomalous pixels")
            return {}
        # above[r, j] = number of pixels of row r with score >= e_j, j = 0..bins (the last is 0)
        above = torch.flip(torch.cumsum(torch.flip(counts, [1]), 1), [1])
        above = torch.cat([above, torch.zeros(above.shape[0], 1, dtype=above.dtype)], 1)
        tp, fp = above[_POS_ROW].round().long(), above[_NEG_ROW].round().long()
        confmat = torch.stack([torch.stack([n_neg - fp, fp], -1), torch.stack([n_pos - tp, tp], -1)], -2)
        thresholds = torch.linspace(0.0, 1.0, self._hist.bins + 1)  # the edges, normalised by the window
        return {
            "pixel_auroc": _binned_metric(BinaryAUROC(thresholds=thresholds), confmat),
            "pixel_ap": _binned_metric(BinaryAveragePrecision(thresholds=thresholds), confmat),
            "pixel_aupro": self._aupro(above, n_neg),
        }

    def _aupro(self, above: torch.Tensor, n_neg: int) -> float:
        pro = (above[_PRO_ROW] / self._n_regions).numpy()
        fpr = (above[_NEG_ROW] / n_neg).numpy()
        # thresholds descending = FPR ascending; the last edge gives (0, 0), the first (1, 1)
        limit = self.cfg.pro_fpr_limit
        return float(trapezoid_to_limit(fpr[::-1], pro[::-1], limit) / limit)


def _binned_metric(metric: BinaryAUROC | BinaryAveragePrecision, confmat: torch.Tensor) -> float:
    """Evaluate a binned torchmetrics metric on a ready confusion-matrix state (thresholds × 2 × 2)."""
    # an empty update marks the metric as updated (no spurious "compute before update" warning) and adds 0
    metric.update(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    metric.merge_state({"confmat": confmat})
    return float(metric.compute())


def compute_class_metrics(
    cls_name: str,
    scores: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    cfg: MetricConfig | None = None,
) -> dict[str, float]:
    """One-shot convenience: the metrics of one class from all its images at once."""
    acc = ClassMetricAccumulator(cls_name, cfg)
    acc.update(scores, maps, labels, masks)
    return acc.compute()


def metric_state_to_python(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Plain-Python copy of a state (lists), e.g. for JSON debugging dumps."""
    return {k: v.tolist() for k, v in state.items()}
