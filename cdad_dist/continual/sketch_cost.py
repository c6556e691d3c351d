"""Predicted memory and compute of one layer's sketch, from shapes alone (no tensors are built).

`sketch: auto` picks each layer's kind with it, and `cdad plan` prints it. The formulas follow what the sketches
in `sketches.py` hold and compute:

- gram: the float64 d × d accumulator plus one block product in float32 (12·d² bytes); 2·d²·N multiply-adds
  over N columns, then one eigh (≈ 9·d³ flops with vectors, the LAPACK syevd count).
- isvd (buffered): the carried U·Σ (d × r), the buffer (d × b), the concatenation C (d × (r + b)) and its SVD's U
  (d × min(d, r + b)), in float32; ⌈N / b⌉ economy SVDs of d × n, n = min(d, r + b), each ≈ 4·d·n² + 8·n³ flops
  (Golub–Van Loan's count for U, Σ, Vᵀ by one-sided bidiagonalisation).

The carried rank r is not known before the capture; the model assumes r = rank_fraction · d (the continual
config's `plan_rank_fraction`, 0.25 by default: bases at γ = 0.999 keep 10–60 % of d on the layers measured so
far). Gram is the cheaper kind per column unless r is well below d / 8 (isvd's ≈ 16·d·r + 64·r² vs 2·d² at
buffer = r), so `auto` takes gram where its 12·d² bytes fit the per-layer budget, else isvd with the largest
buffer (≤ d) that fits: as few folds as the memory allows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

F32, F64 = 4, 8
# Columns assumed per layer when the caller cannot say (a capture pass sees far more columns than d: 64·d is
# the smallest ratio among the sd15 layers for the 264 images of MVTec setting 2's base task).
DEFAULT_COLUMNS_PER_D = 64


@dataclass(frozen=True)
class SketchCost:
    kind: str
    peak_bytes: int  # held at the sketch's peak, during the capture pass
    flops: float  # over the whole capture of `columns` columns, including the final decomposition
    folds: int  # SVDs (isvd) or eighs (gram)

    def to_dict(self) -> dict:
        return asdict(self)


def assumed_rank(d: int, rank_fraction: float) -> int:
    return max(1, min(d, round(rank_fraction * d)))


def gram_cost(d: int, columns: int) -> SketchCost:
    return SketchCost("gram", peak_bytes=(F64 + F32) * d * d, flops=2.0 * d * d * columns + 9.0 * d ** 3, folds=1)


def svd_flops(rows: int, cols: int) -> float:
    n = min(rows, cols)
    return 4.0 * rows * n * n + 8.0 * n ** 3


def isvd_peak_bytes(d: int, rank: int, buffer_columns: int) -> int:
    """Carried U·Σ (d × r) + buffer (d × b) + C = [U·Σ, buffer] + the SVD's U (d × min(d, r + b)), float32."""
    return F32 * d * (2 * rank + 2 * buffer_columns + min(d, rank + buffer_columns))


def isvd_cost(d: int, columns: int, buffer_columns: int, rank: int) -> SketchCost:
    folds = max(1, math.ceil(columns / buffer_columns))
    return SketchCost("isvd", peak_bytes=isvd_peak_bytes(d, rank, buffer_columns),
                      flops=folds * svd_flops(d, rank + buffer_columns), folds=folds)


def fitting_buffer(d: int, rank: int, budget_bytes: float) -> int:
    """The largest buffer ≤ d whose isvd peak fits the budget, and never below the carried rank: per column, a
    fold costs ≈ 4·d·(r + b)² / b, least at b = r and growing fast below it."""
    lo, hi = min(d, rank), d
    if isvd_peak_bytes(d, rank, hi) <= budget_bytes:
        return hi
    while lo < hi:  # peak grows with the buffer: bisect the largest fitting one
        mid = (lo + hi + 1) // 2
        if isvd_peak_bytes(d, rank, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class SketchChoice:
    kind: str
    buffer_columns: int | None  # isvd only
    costs: dict[str, SketchCost]

    @property
    def cost(self) -> SketchCost:
        return self.costs[self.kind]


def choose_sketch(d: int, budget_bytes: float, *, columns: int | None = None, rank_fraction: float = 0.25,
                  buffer_columns: int | None = None) -> SketchChoice:
    """The kind with the fewest flops among those whose peak fits the per-layer budget; if none fits, the one
    with the smallest peak. `buffer_columns` fixes isvd's buffer; None lets the budget size it."""
    n = columns if columns is not None else DEFAULT_COLUMNS_PER_D * d
    r = assumed_rank(d, rank_fraction)
    b = buffer_columns or fitting_buffer(d, r, budget_bytes)
    costs = {"gram": gram_cost(d, n), "isvd": isvd_cost(d, n, b, r)}
    fitting = [c for c in costs.values() if c.peak_bytes <= budget_bytes]
    best = min(fitting, key=lambda c: c.flops) if fitting else min(costs.values(), key=lambda c: c.peak_bytes)
    return SketchChoice(best.kind, b, costs)
