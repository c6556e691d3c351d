"""Per-class anomaly-detection metrics, streaming and mergeable across ranks, independent of batch order.

Image level (exact): AUROC and AP from torchmetrics on every image score of the class (a few hundred floats).

Pixel level (exact up to a relative score resolution of ``2**-(pixel_key_bits - 9)``): every pixel score is
turned into an integer *key*, the top ``pixel_key_bits`` bits of an order-preserving encoding of its float32
bit pattern (:func:`float_keys`). Keys are a floating-point grid: equally fine relative to each score's own
magnitude, so heavy tails, one outlier pixel of 1e6 or per-image scales of 10^±3 cost no resolution elsewhere
(the round-1 window grid lost all resolution on such maps). The state is a sparse histogram: the sorted distinct
keys seen and three integer rows of counts per key (normal pixels, anomalous pixels, region weight), so every
update and merge is integer addition: the state, and therefore every metric, is bit-identical whatever the
batch order, the batch size or the number of ranks. At 32 bits every distinct float32 score is its own
threshold and the pixel metrics are exact (up to torchmetrics' float32 rates, 1e-7); the default 22 bits (13 mantissa bits, 1.2e-4 relative) keeps the
state small (a few 10^4 keys for a class) and lies within 0.01 points of exact on the adversarial maps of
``tests/test_metrics_adversarial.py``. At ``compute()`` torchmetrics' ``BinaryAUROC`` /
``BinaryAveragePrecision`` receive the exact confusion matrices ``key >= k`` for every distinct key ``k``
through their public ``merge_state`` (a threshold per key; torchmetrics' own binned mode needs the thresholds
before the first update, and a class's score range is only known after its last batch).

AUPRO (written by hand: anomalib's AUPRO was wrong until its v2.3, issues #1651 and #3718): the MVTec AD
reference definition: FPR over all normal pixels of the class; PRO = mean, over every connected ground-truth
region (8-connectivity, ``scipy.ndimage.label``) of every image, of the fraction of the region's pixels above
the threshold; thresholds shared across images; the (FPR, PRO) curve integrated with the trapezoid rule up to
FPR = ``pro_fpr_limit`` (linear interpolation at the limit) and divided by the limit. Since the mean overlap
is a sum over regions, each anomalous pixel adds the fixed-point weight ``round(2**40 / |its region|)`` to the
third row (integers again, so order-free); the weight above a key divided by ``2**40 * regions`` is PRO there.
No map is kept.

Non-finite maps (a diverged model) do not raise: the image is named in a :class:`NonFiniteMapWarning` with its
count of NaN/inf pixels, counted, and the class's metrics are NaN, so the run finishes and its report says why.
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

from cdad_dist.errors import CdadError, ConfigError

METRIC_NAMES: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
"""Keys of :meth:`ClassMetricAccumulator.compute`, in report order."""

IMAGE_METRICS = ("image_auroc", "image_ap")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro")

_NEG_ROW, _POS_ROW, _PRO_ROW = 0, 1, 2  # normal count, anomalous count, region-weighted anomalous
_PRO_ONE = 2**40  # fixed-point 1.0 of the region weights: integer sums are exact and order-free


class DegenerateMetricWarning(UserWarning):
    """A metric is undefined for a class (e.g. no anomalous image); its value is NaN."""


class NonFiniteMapWarning(UserWarning):
    """An anomaly map or image score held NaN/inf (named in the message); its class's metrics are NaN."""


@dataclass
class MetricConfig:
    """Options of the per-class metrics.

    pixel_key_bits: bits of the pixel-score keys (module doc): 32 = exact on float32 maps; each bit fewer
        halves the relative resolution (22: 1.2e-4) and, on smooth maps, roughly the number of distinct keys.
    pro_fpr_limit: FPR up to which the PRO curve is integrated (the MVTec AD standard is 0.3).
    pro_connectivity: 8 (the MVTec AD reference, a 3×3 structuring element) or 4.
    mask_threshold: ground-truth mask values above it are anomalous.
    """

    pixel_key_bits: int = 22
    pro_fpr_limit: float = 0.3
    pro_connectivity: int = 8
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 12 <= self.pixel_key_bits <= 32:
            raise ConfigError(f"eval.metrics.pixel_key_bits must be in 12..32, got {self.pixel_key_bits}")
        if not 0.0 < self.pro_fpr_limit <= 1.0:
            raise ConfigError(f"eval.metrics.pro_fpr_limit must be in (0, 1], got {self.pro_fpr_limit}")
        if self.pro_connectivity not in (4, 8):
            raise ConfigError(f"eval.metrics.pro_connectivity must be 4 or 8, got {self.pro_connectivity}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ConfigError(f"eval.metrics.mask_threshold must be in [0, 1), got {self.mask_threshold}")


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
# keys and the sparse histogram
# ----------------------------------------------------------------------------------------------------------------
def float_keys(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Order-preserving int64 keys of float scores: the top ``bits`` bits of the float32 pattern, remapped so
    that integer order is float order (negative patterns reversed, -0.0 == +0.0). Finite inputs only."""
    v = values.detach().reshape(-1).to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    raw = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the unsigned bit pattern
    ordered = torch.where(raw >= 0x80000000, 0xFFFFFFFF - raw, raw + 0x80000000)
    return ordered >> (32 - bits)


class _KeyHistogram:
    """Integer counts per distinct key: ``keys`` sorted unique (n), ``counts`` rows × n (int64)."""

    def __init__(self, rows: int) -> None:
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.counts = torch.zeros(rows, 0, dtype=torch.int64)

    def add(self, keys: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Add int64 ``weights`` of pixels with ``keys`` into histogram ``rows`` (all of the same length)."""
        if keys.numel() == 0:
            return
        uniq, inverse = torch.unique(keys, return_inverse=True)
        n_rows = self.counts.shape[0]
        batch = torch.zeros(n_rows * uniq.numel(), dtype=torch.int64)
        batch.index_add_(0, rows * uniq.numel() + inverse, weights)
        self.add_histogram(uniq, batch.view(n_rows, -1))

    def add_histogram(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Merge another sparse histogram (sorted unique ``keys``, rows × n ``counts``); integer, so exact."""
        if keys.numel() == 0:
            return
        merged, inverse = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        out = torch.zeros(self.counts.shape[0], merged.numel(), dtype=torch.int64)
        out.index_add_(1, inverse, torch.cat([self.counts, counts], 1))
        self.keys, self.counts = merged, out


# ----------------------------------------------------------------------------------------------------------------
# the accumulator
# ----------------------------------------------------------------------------------------------------------------
class ClassMetricAccumulator:
    """Streaming metrics of one class: ``update`` per batch, ``compute`` once; mergeable across ranks.

    Distributed use: each rank updates its own accumulator with its share of the class's test images; then
    the caller gathers ``state_tensors()`` of every rank (e.g. ``torch.distributed.all_gather_object`` or
    ``accelerate.utils.gather_object``) and merges them (``merge`` or :meth:`from_states`). The merged state is
    identical, integer for integer, to a single accumulator fed every batch, whatever the order.

    Pixel state lives on the CPU (maps are moved there in ``update``), so it is independent of the device.
    """

    def __init__(self, cls_name: str, cfg: MetricConfig | None = None) -> None:
        self.cls_name = cls_name
        self.cfg = cfg or MetricConfig()
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._hist = _KeyHistogram(rows=3)
        self._n_regions = 0
        self._n_nonfinite = 0
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
        maps = maps.detach().to("cpu", torch.float32)
        scores = scores.to("cpu", torch.float64)
        masks = resize_masks_nearest(masks.detach().cpu(), tuple(maps.shape[-2:]), self.cfg.mask_threshold)
        return scores, maps[:, 0], labels_f.to(torch.int64), masks[:, 0].bool()

    def _finite_images(self, scores: torch.Tensor, maps: torch.Tensor, names) -> torch.Tensor:
        """Which images of the batch are finite; each other one is named in a warning and counted."""
        bad_pixels = (~torch.isfinite(maps)).flatten(1).sum(1)
        finite = (bad_pixels == 0) & torch.isfinite(scores)
        for i in torch.nonzero(~finite).flatten().tolist():
            name = repr(str(names[i])) if names is not None else f"{i} of the batch"
            what = (f"{int(bad_pixels[i])} of {maps[i].numel()} anomaly-map pixels are NaN/inf"
                    if bad_pixels[i] else "its image score is NaN/inf")
            warnings.warn(f"class {self.cls_name!r}: image {name}: {what}; the class's metrics will be NaN",
                          NonFiniteMapWarning, stacklevel=3)
        self._n_nonfinite += int((~finite).sum())
        return finite

    def update(self, scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
               names: list[str] | None = None) -> None:
        """Add a batch: image scores (B), anomaly maps (B×1×H×W), labels (B, 0/1), masks (B×1×h×w, any size:
        resized to the map size with nearest neighbour); ``names`` (B image keys) name non-finite images."""
        scores, maps, labels, masks = self._check_batch(scores, maps, labels, masks)
        finite = self._finite_images(scores, maps, names)
        self._scores.append(scores)
        self._labels.append(labels)
        if not bool(finite.all()):
            maps, masks = maps[finite], masks[finite]
        keys = float_keys(maps, self.cfg.pixel_key_bits)
        rows = torch.where(masks, _POS_ROW, _NEG_ROW).reshape(-1)
        region_weight, n_regions = self._region_weights(masks)
        region_weight = region_weight.reshape(-1)
        anomalous = region_weight > 0
        # every pixel counts once in the normal/anomalous rows; anomalous ones once more, with their region weight
        self._hist.add(
            torch.cat([keys, keys[anomalous]]),
            torch.cat([rows, torch.full((int(anomalous.sum()),), _PRO_ROW, dtype=torch.int64)]),
            torch.cat([torch.ones_like(keys), region_weight[anomalous]]),
        )
        self._n_regions += n_regions

    def _region_weights(self, masks: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per pixel round(2**40 / size of its connected GT region) (0 for normal pixels), and the region count."""
        out = np.zeros(masks.shape, dtype=np.int64)
        total = 0
        for i, mask in enumerate(masks.numpy()):
            if not mask.any():
                continue
            labelled, n = ndimage.label(mask, structure=self._structure)
            sizes = np.bincount(labelled.ravel(), minlength=n + 1)
            inverse = np.zeros(n + 1, dtype=np.int64)
            inverse[1:] = np.rint(_PRO_ONE / sizes[1:]).astype(np.int64)
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

    @property
    def n_nonfinite_images(self) -> int:
        """Images whose map or score held NaN/inf (their class's metrics are NaN)."""
        return self._n_nonfinite

    @property
    def n_keys(self) -> int:
        """Distinct pixel-score keys held (the state's size is 4 int64 per key)."""
        return int(self._hist.keys.numel())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state as CPU tensors (for a gather); :meth:`merge` takes the same dict back."""
        return {
            "image_scores": torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64),
            "image_labels": torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.int64),
            "pixel_keys": self._hist.keys.clone(),
            "pixel_counts": self._hist.counts.clone(),
            "pixel_key_bits": torch.tensor(self.cfg.pixel_key_bits, dtype=torch.int64),
            "n_regions": torch.tensor(self._n_regions, dtype=torch.int64),
            "nonfinite_images": torch.tensor(self._n_nonfinite, dtype=torch.int64),
        }

    def merge(self, other: ClassMetricAccumulator | dict[str, torch.Tensor]) -> None:
        """Merge another rank's accumulator (or its ``state_tensors()``) into this one; exact."""
        state = other.state_tensors() if isinstance(other, ClassMetricAccumulator) else other
        needed = {"image_scores", "image_labels", "pixel_keys", "pixel_counts", "pixel_key_bits", "n_regions",
                  "nonfinite_images"}
        missing = needed - set(state)
        if missing:
            raise CdadError(f"class {self.cls_name!r}: metric state lacks keys {sorted(missing)}")
        bits = int(state["pixel_key_bits"])
        if bits != self.cfg.pixel_key_bits:
            raise CdadError(f"class {self.cls_name!r}: cannot merge metric states with pixel_key_bits {bits} "
                            f"and {self.cfg.pixel_key_bits}")
        self._scores.append(state["image_scores"].to(torch.float64).cpu())
        self._labels.append(state["image_labels"].to(torch.int64).cpu())
        self._n_regions += int(state["n_regions"])
        self._n_nonfinite += int(state["nonfinite_images"])
        self._hist.add_histogram(state["pixel_keys"].to(torch.int64).cpu(), state["pixel_counts"].to(torch.int64).cpu())

    @classmethod
    def from_states(
        cls, cls_name: str, states: list[dict[str, torch.Tensor]], cfg: MetricConfig | None = None
    ) -> ClassMetricAccumulator:
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
        if self._n_nonfinite:
            _warn(self.cls_name, f"{self._n_nonfinite} of {self.n_images} images had NaN/inf anomaly maps or scores")
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
        n_neg, n_pos = int(counts[_NEG_ROW].sum()), int(counts[_POS_ROW].sum())
        if n_neg == 0 or n_pos == 0:
            _warn(self.cls_name, "pixel metrics need both normal and anomalous pixels")
            return {}
        # above[r, j] = pixels of row r whose key is >= the j-th smallest key; one more column of 0 (above all)
        above = torch.flip(torch.cumsum(torch.flip(counts, [1]), 1), [1])
        above = torch.cat([above, torch.zeros(above.shape[0], 1, dtype=above.dtype)], 1)
        tp, fp = above[_POS_ROW], above[_NEG_ROW]
        confmat = torch.stack([torch.stack([n_neg - fp, fp], -1), torch.stack([n_pos - tp, tp], -1)], -2)
        # one threshold per key; only their order matters to torchmetrics' curve, not their values
        thresholds = torch.linspace(0.0, 1.0, confmat.shape[0], dtype=torch.float64).float()
        return {
            "pixel_auroc": _binned_metric(BinaryAUROC(thresholds=thresholds), confmat),
            "pixel_ap": _binned_metric(BinaryAveragePrecision(thresholds=thresholds), confmat),
            "pixel_aupro": self._aupro(above, n_neg),
        }

    def _aupro(self, above: torch.Tensor, n_neg: int) -> float:
        pro = (above[_PRO_ROW].double() / (_PRO_ONE * self._n_regions)).numpy()
        fpr = (above[_NEG_ROW].double() / n_neg).numpy()
        # keys descending = FPR ascending; the extra column gives (0, 0), the smallest key (1, 1)
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
