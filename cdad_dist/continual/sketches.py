"""Streaming sketches of one protected layer's input features X (d × Λ, columns arrive in blocks d × m).

Every sketch has the same interface — ``update(block)``, ``merge(other)``, ``basis(gamma)``, ``factors()`` — and a
memory footprint that depends on d (and the block size) but not on the number of blocks, so any number of images
can be sketched. Three kinds:

- ``gram``: exact X·Xᵀ accumulated in float64; one ``eigh`` at the end. Cross-rank merge is a plain sum.
- ``isvd``: carries B = U·Σ (the scaled left factor). Because the carried factor keeps its energy, a new block
  cannot wash out old directions the way an unscaled Û does, and sketches from different ranks merge with the
  same code as blocks. Intermediate truncation is looser than the final γ (``carry_gamma``) and the discarded
  energy is kept, so ``basis(γ)`` measures the energy fraction against the true total.
- ``isvd_paper``: the paper's Eq. 9–11 / Alg. 1 recursion Û ← S&K([Û, M_i], γ) with unscaled Û, kept only to
  reproduce the paper for comparison (it is biased towards the last blocks).

Sketches also track ``peak_nbytes``: the bytes of the tensors they hold or allocate at their peak (from shapes),
which the memory-bound test and the benchmark use.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from cdad_dist.continual.registry import SKETCH_REGISTRY
from cdad_dist.errors import ConfigError

SKETCH_KINDS = ("auto", *SKETCH_REGISTRY)  # "auto": the cost model's choice among the registered kinds


def full_precision():
    """Autocast off (CPU and CUDA) for sketch arithmetic. The capture pass runs the model under the run's mixed
    precision, and autocast would otherwise move the block products X·Xᵀ to bf16 (bases of the wrong rank) or
    fp16 (Gram entries above 65504 overflow to inf); sketches pick their own dtypes."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def stable_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD that survives LAPACK's gesdd giving up ("failed to converge"), which happens on CPU for
    ill-conditioned float32 blocks of real activations: retried in float64, results cast back."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return U.to(matrix.dtype), S.to(matrix.dtype), Vh.to(matrix.dtype)


def stable_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition (ascending, as ``torch.linalg.eigh``) that survives LAPACK's syevd giving up
    ("failed to converge"), seen on Gram matrices of random-weight SD layers with many near-equal eigenvalues:
    retried through the SVD, which for a symmetric PSD matrix gives the same eigenpairs."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
        return S.flip(0), U.flip(1)


def rank_for_energy(energies: Tensor, total: float, gamma: float) -> int:
    """Smallest k with sum(energies[:k]) ≥ gamma·total (energies sorted descending); len(energies) if never.

    This is the paper's Eq. 9 rule. (Its Algorithm 1, ``(cumsum(ratio) < th).sum()``, returns one column fewer.)
    """
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"continual.gamma must be in [0, 1], got {gamma}")
    n = int(energies.numel())
    if n == 0 or gamma <= 0.0 or total <= 0.0:
        return 0
    cumulative = torch.cumsum(energies.detach().to(torch.float64).cpu(), dim=0)
    target = torch.tensor([gamma * float(total)], dtype=torch.float64)
    k = int(torch.searchsorted(cumulative, target).item()) + 1
    return min(k, n)


@dataclass
class SketchFactors:
    """B = U·diag(S) with B·Bᵀ ≈ X·Xᵀ; ``total_energy`` = ‖X‖²_F including what truncation discarded."""

    U: Tensor  # d × r, orthonormal columns
    S: Tensor  # r, descending singular values of X restricted to span(U)
    total_energy: float
    n_columns: int

    @property
    def scaled(self) -> Tensor:
        return self.U * self.S.to(self.U.dtype).unsqueeze(0)


def _bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _svd_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of the economy SVD outputs U (rows×p), S (p), Vh (p×cols) of a rows × cols matrix, p = min."""
    p = min(rows, cols)
    return itemsize * (rows * p + p + p * cols)


class Sketch(ABC):
    """Common interface of all sketches of a d-dimensional input space."""

    kind: str = "?"
    # How the reducer combines the ranks' sketches of a layer: "sum" adds their payloads elementwise (a reduce to
    # the owner, then ``set_payload``); "merge" folds them into the owner's along a binary tree of sends
    # (``merge_payload``). The reducer reads only this, never the sketch's type.
    reduction: str = "merge"

    def __init__(self, d: int, device: torch.device | str | None = None) -> None:
        if d < 1:
            raise ConfigError(f"{type(self).__name__}: input dimension d must be >= 1, got {d}")
        self.d = int(d)
        self.device = torch.device(device) if device is not None else None
        self.n_columns = 0
        self.peak_nbytes = 0

    # -- streaming -------------------------------------------------------------------------------------------
    def update(self, block: Tensor) -> None:
        """Add the columns of ``block`` (d × m) to the sketch."""
        block = self._check_block(block)
        if block.shape[1] == 0:
            return
        with full_precision():
            self._update(block)
        self.n_columns += int(block.shape[1])

    def merge(self, other: Sketch) -> None:
        """Fold another sketch of the same kind and d (another rank's, another block range's) into this one."""
        if type(other) is not type(self) or other.d != self.d:
            raise ConfigError(
                f"cannot merge {type(other).__name__}(d={other.d}) into {type(self).__name__}(d={self.d})")
        matrix, scalars = other.to_payload()
        self.merge_payload(matrix, scalars)

    # -- communication (reducer) -----------------------------------------------------------------------------
    @abstractmethod
    def to_payload(self) -> tuple[Tensor, Tensor]:
        """(matrix, float64 scalars) that describe the sketch completely; shapes depend only on d and rank."""

    @abstractmethod
    def merge_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        """Merge another sketch given by its payload."""

    # -- results ---------------------------------------------------------------------------------------------
    @abstractmethod
    def factors(self) -> SketchFactors:
        """The sketch as B = U·diag(S) plus the true total energy."""

    def basis(self, gamma: float) -> Tensor:
        """Orthonormal d × k basis: the smallest leading k directions holding ≥ γ of the total energy."""
        f = self.factors()
        k = rank_for_energy(f.S.to(torch.float64) ** 2, f.total_energy, gamma)
        return f.U[:, :k]

    def energy_fraction(self, k: int) -> float:
        """Fraction of the total energy held by the leading k directions of the sketch."""
        f = self.factors()
        if f.total_energy <= 0:
            return 1.0
        return float((f.S[:k].to(torch.float64) ** 2).sum()) / f.total_energy

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the tensors the sketch holds between updates."""

    def finalise_cost(self, world: int) -> float:
        """Relative cost of merging ``world`` payloads and decomposing (balances layer owners across ranks)."""
        return float(self.d) ** 2 * max(1, self.factors().U.shape[1]) * world

    def set_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        """Replace the state by a reduced payload (only sketches with ``reduction = "sum"``)."""
        raise NotImplementedError(f"{type(self).__name__} is merged, not summed")

    @abstractmethod
    def clone_empty(self) -> Sketch:
        """A new, empty sketch with the same kind, d, options and device."""

    @abstractmethod
    def release(self) -> None:
        """Drop the held tensors (a rank that handed its sketch to another one); the sketch is empty after."""

    # -- helpers ---------------------------------------------------------------------------------------------
    def _check_block(self, block: Tensor) -> Tensor:
        if block.dim() != 2 or block.shape[0] != self.d:
            raise ConfigError(
                f"{type(self).__name__}: block must be d × m with d={self.d}, got shape {tuple(block.shape)}")
        block = block.detach()
        if self.device is None:
            self.device = block.device
        return block

    def _note_peak(self, nbytes: int) -> None:
        self.peak_nbytes = max(self.peak_nbytes, int(nbytes))


class GramSketch(Sketch):
    """X·Xᵀ accumulated in float64. Memory 8·d² bytes; merge = sum; result = one eigh (cached)."""

    kind = "gram"
    reduction = "sum"

    def __init__(self, d: int, device: torch.device | str | None = None) -> None:
        super().__init__(d, device)
        self._G: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None

    def _gram(self) -> Tensor:
        if self._G is None:
            self._G = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device or "cpu")
        return self._G

    def _update(self, block: Tensor) -> None:
        """G += X·Xᵀ. One block's product is formed in the block's precision (float32 for float32 activations:
        a float64 GEMM costs 2–4× more on CPUs and the product of one block, a sum of a few thousand terms, is
        exact to ~1e-6 relative), and blocks are summed in float64, where the error would otherwise grow."""
        G = self._gram()
        block = block.to(G.device)
        if block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        G.add_(block @ block.mT)
        # Held: G and the block's d × d product (before it is added).
        self._note_peak(_bytes(G) + self.d * self.d * block.element_size())
        self._eig = None

    def gram(self) -> Tensor:
        """X·Xᵀ (d × d, float64); zeros before the first update."""
        return self._gram()

    def to_payload(self) -> tuple[Tensor, Tensor]:
        scalars = torch.tensor([float(self.n_columns)], dtype=torch.float64)
        return self._gram(), scalars

    def merge_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        G = self._gram()
        G.add_(matrix.to(device=G.device, dtype=torch.float64))
        self.n_columns += int(round(float(scalars[0])))
        self._eig = None

    def set_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        """Replace the state, e.g. with the cross-rank sum after a reduce."""
        self._G = matrix.to(device=self.device or matrix.device, dtype=torch.float64)
        self.n_columns = int(round(float(scalars[0])))
        self._eig = None

    def finalise_cost(self, world: int) -> float:
        return float(self.d) ** 3  # one eigh of d × d, whatever the number of ranks

    def _eigh(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            G = self._gram()
            evals, evecs = stable_eigh(G)  # ascending
            self._note_peak(_bytes(G) * 2 + _bytes(evals))
            evals = evals.flip(0).clamp_min(0.0)
            self._eig = (evals, evecs.flip(1))
        return self._eig

    def factors(self) -> SketchFactors:
        evals, evecs = self._eigh()
        total = float(torch.trace(self._gram()))
        # Directions whose eigenvalue is at round-off level of the largest one carry no information.
        keep = int((evals > evals[0] * self.d * torch.finfo(torch.float64).eps).sum()) if total > 0 else 0
        return SketchFactors(evecs[:, :keep], evals[:keep].sqrt(), total, self.n_columns)

    def nbytes(self) -> int:
        return _bytes(self._G)

    @classmethod
    def from_options(cls, d: int, options: SketchOptions, device=None) -> GramSketch:
        return cls(d, device=device)

    def clone_empty(self) -> GramSketch:
        other = GramSketch(self.d, device=self.device)
        other._chunk_cols = self._chunk_cols
        return other

    def release(self) -> None:
        self._G, self._eig, self.n_columns = None, None, 0


# The carried truncation drops at most this fraction of what the final γ drops: carry γ = 1 − (1 − γ)·fraction.
# Different fold points (one stream vs a rank tree, another buffer size) then move the γ-basis by little: on the
# layer-ownership test's net at γ = 0.999 the largest principal angle between the 2-rank and the 1-process basis
# is 1.2e-2 rad at a fraction of 1/10 (1.5e-2 from the exact Gram basis), 2.8e-4 at 1/100 (6e-4 from exact), and
# 2.2e-5 at 1/1000 (docs/benchmarks.md "Layer ownership").
CARRY_TAIL_FRACTION = 0.01


def default_carry_gamma(gamma: float) -> float:
    """The iSVD carry γ used when none is configured (``continual.isvd_carry_gamma: null``)."""
    return 1.0 - (1.0 - gamma) * CARRY_TAIL_FRACTION


class IsvdSketch(Sketch):
    """Incremental SVD carrying U and Σ (B = U·Σ); the energy it discards stays ≤ (1 − carry_gamma) of the total
    (unless ``max_rank`` forces more), so ``basis(γ)`` with γ < carry_gamma can always reach γ of the true total.

    The update is an exact SVD of [U·Σ, M_i] (frequent-directions style without the shrinkage), so merging two
    sketches and adding a block are the same operation. Incoming blocks are buffered until ``buffer_columns``
    columns (default d) are pending and then folded together: one SVD of d × (r + buffer) per buffer instead of
    one per hook call (a deep SD layer sees 64·B columns per call against d up to 23040, so per-call folding
    costs hundreds of SVDs per layer). Buffers larger than ``chunk_columns`` are folded in column chunks to bound
    the working set at about 2·d·(r + chunk) entries.
    """

    kind = "isvd"

    def __init__(self, d: int, carry_gamma: float = default_carry_gamma(0.999), max_rank: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 chunk_columns: int | None = None, buffer_columns: int | None = None) -> None:
        super().__init__(d, device)
        if not 0.0 < carry_gamma <= 1.0:
            raise ConfigError(f"IsvdSketch: carry_gamma must be in (0, 1], got {carry_gamma}")
        if max_rank is not None and max_rank < 1:
            raise ConfigError(f"IsvdSketch: max_rank must be >= 1 or None, got {max_rank}")
        self.carry_gamma = float(carry_gamma)
        self.max_rank = min(int(max_rank), self.d) if max_rank is not None else self.d
        self.dtype = dtype
        self.chunk_columns = int(chunk_columns) if chunk_columns else max(2 * self.d, 4096)
        if buffer_columns is not None and buffer_columns < 1:
            raise ConfigError(f"IsvdSketch: buffer_columns must be >= 1 or None, got {buffer_columns}")
        self.buffer_columns = int(buffer_columns) if buffer_columns else self.d
        self._pending: list[Tensor] = []
        self._pending_columns = 0
        self.folds = 0  # SVDs computed so far (the benchmark reports them)
        self._U: Tensor | None = None
        self._S: Tensor | None = None
        self.discarded = 0.0  # energy dropped by carry truncation (float64 Python float)

    @property
    def rank(self) -> int:
        return 0 if self._S is None else int(self._S.numel())

    def _scaled(self) -> Tensor | None:
        if self._U is None:
            return None
        return self._U * self._S.unsqueeze(0)

    def _fold(self, matrix: Tensor) -> None:
        """U, Σ ← truncated SVD of [U·Σ, matrix]. (The caller's block itself is not counted in peak_nbytes.)

        The truncation budget is cumulative: the energy discarded over *all* folds stays ≤ (1 − carry_gamma) of
        the total seen so far. (A per-fold budget would let the loss grow with the number of blocks: n folds at
        1e-4 each drop n·1e-4, more than the 1e-3 that γ = 0.999 allows after ten blocks.)
        """
        matrix = matrix.to(device=self.device, dtype=self.dtype)
        scaled = self._scaled()
        C = matrix if scaled is None else torch.cat([scaled, matrix], dim=1)
        U, S, Vh = stable_svd(C)
        self.folds += 1
        self._note_peak(self.nbytes() + _bytes(C, U, S, Vh) + (_bytes(scaled) if scaled is not None else 0))
        del Vh, C, scaled
        energies = (S.to(torch.float64) ** 2).cpu()
        allowed = (1.0 - self.carry_gamma) * (float(energies.sum()) + self.discarded) - self.discarded
        tail = torch.cat([energies.flip(0).cumsum(0).flip(0), energies.new_zeros(1)])  # tail[k] = Σ_{i≥k}
        k = int(torch.nonzero(tail <= max(allowed, 0.0))[0])  # smallest k whose dropped tail fits the budget
        k = min(k, self.max_rank, int((S > 0).sum()))
        self.discarded += float(energies[k:].sum())
        self._U, self._S = U[:, :k].contiguous(), S[:k].contiguous()

    def _update(self, block: Tensor) -> None:
        self._pending.append(block.to(device=self.device, dtype=self.dtype))
        self._pending_columns += int(block.shape[1])
        self._note_peak(self.nbytes())
        if self._pending_columns >= self.buffer_columns:
            self._flush()

    def _flush(self) -> None:
        """Fold the buffered columns (every read of the sketch flushes first, so results never miss any)."""
        if not self._pending:
            return
        pending = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, dim=1)
        self._pending, self._pending_columns = [], 0
        with full_precision():
            for start in range(0, pending.shape[1], self.chunk_columns):
                self._fold(pending[:, start:start + self.chunk_columns])

    def to_payload(self) -> tuple[Tensor, Tensor]:
        self._flush()
        scaled = self._scaled()
        if scaled is None:
            scaled = torch.zeros(self.d, 0, dtype=self.dtype, device=self.device or "cpu")
        return scaled, torch.tensor([self.discarded, float(self.n_columns)], dtype=torch.float64)

    def merge_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        self._flush()
        self.discarded += float(scalars[0])  # first, so that the fold's budget sees the other side's losses
        if matrix.shape[1] > 0:
            with full_precision():
                self._fold(matrix)
        self.n_columns += int(round(float(scalars[1])))

    def factors(self) -> SketchFactors:
        self._flush()
        if self._U is None:
            empty = torch.zeros(self.d, 0, dtype=self.dtype, device=self.device or "cpu")
            return SketchFactors(empty, torch.zeros(0, dtype=self.dtype, device=empty.device), 0.0, self.n_columns)
        kept = float((self._S.to(torch.float64) ** 2).sum())
        return SketchFactors(self._U, self._S, kept + self.discarded, self.n_columns)

    def nbytes(self) -> int:
        return _bytes(self._U, self._S, *self._pending)

    @classmethod
    def from_options(cls, d: int, options: SketchOptions, device=None) -> IsvdSketch:
        carry = options.carry_gamma if options.carry_gamma is not None else default_carry_gamma(options.gamma)
        buffer = options.buffer_columns
        if buffer is None and options.kind == "auto":
            buffer = options.choice(d).buffer_columns
        return cls(d, carry_gamma=carry, max_rank=options.max_rank, dtype=options.dtype, device=device,
                   chunk_columns=options.chunk_columns, buffer_columns=buffer)

    def clone_empty(self) -> IsvdSketch:
        return IsvdSketch(self.d, carry_gamma=self.carry_gamma, max_rank=self.max_rank, dtype=self.dtype,
                          device=self.device, chunk_columns=self.chunk_columns, buffer_columns=self.buffer_columns)

    def release(self) -> None:
        self._U, self._S, self.discarded, self.n_columns = None, None, 0.0, 0
        self._pending, self._pending_columns = [], 0


class IsvdPaperSketch(Sketch):
    """The paper's iSVD (Eq. 9–11, Alg. 1): Û ← S&K([Û, M_i], γ) with an *unscaled* Û. Comparison only.

    The carried Û has energy 1 per column while a block has ‖M_i‖²_F, so the γ truncation drops old directions
    that later blocks do not share; the energies it reports are therefore not those of X.
    """

    kind = "isvd_paper"

    def __init__(self, d: int, gamma: float = 0.999, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(d, device)
        rank_for_energy(torch.ones(1), 1.0, gamma)  # validates gamma
        self.gamma = float(gamma)
        self.dtype = dtype
        self._U: Tensor | None = None

    @classmethod
    def from_options(cls, d: int, options: SketchOptions, device=None) -> IsvdPaperSketch:
        return cls(d, gamma=options.gamma, dtype=options.dtype, device=device)

    def _fold(self, matrix: Tensor) -> None:
        matrix = matrix.to(device=self.device, dtype=self.dtype)
        C = matrix if self._U is None else torch.cat([self._U, matrix], dim=1)
        U, S, Vh = stable_svd(C)
        self._note_peak(self.nbytes() + _bytes(C, U, S, Vh))
        energies = S.to(torch.float64) ** 2
        k = rank_for_energy(energies, float(energies.sum()), self.gamma)
        self._U = U[:, :k].contiguous()

    def _update(self, block: Tensor) -> None:
        self._fold(block)

    def to_payload(self) -> tuple[Tensor, Tensor]:
        U = self._U if self._U is not None else torch.zeros(self.d, 0, dtype=self.dtype,
                                                               device=self.device or "cpu")
        return U, torch.tensor([float(self.n_columns)], dtype=torch.float64)

    def merge_payload(self, matrix: Tensor, scalars: Tensor) -> None:
        if matrix.shape[1] > 0:
            self._fold(matrix)
        self.n_columns += int(round(float(scalars[0])))

    def factors(self) -> SketchFactors:
        """Û with unit weights: the paper's recursion keeps no energies (see the class docstring)."""
        U = self._U if self._U is not None else torch.zeros(self.d, 0, dtype=self.dtype,
                                                               device=self.device or "cpu")
        S = torch.ones(U.shape[1], dtype=U.dtype, device=U.device)
        return SketchFactors(U, S, float(U.shape[1]), self.n_columns)

    def basis(self, gamma: float) -> Tensor:
        """Û as truncated during streaming (with the γ given at construction; ``gamma`` is not re-applied)."""
        return self.factors().U

    def nbytes(self) -> int:
        return _bytes(self._U)

    def clone_empty(self) -> IsvdPaperSketch:
        return IsvdPaperSketch(self.d, gamma=self.gamma, dtype=self.dtype, device=self.device)

    def release(self) -> None:
        self._U, self.n_columns = None, 0


@dataclass
class SketchOptions:
    """How ``make_sketch`` builds a sketch (the continual config fills it)."""

    kind: str = "auto"
    gamma: float = 0.999
    memory_budget_mb: float = 256.0  # per layer: auto's cost model keeps each sketch's peak within it
    carry_gamma: float | None = None  # isvd; None = default_carry_gamma(γ) = 1 - (1-γ)/100
    max_rank: int | None = None  # isvd
    chunk_columns: int | None = None  # isvd
    buffer_columns: int | None = None  # isvd; None: d for `isvd`, sized to the budget by `auto`
    rank_fraction: float = 0.25  # auto: the carried rank / d its cost model assumes
    dtype: torch.dtype = torch.float32  # isvd / isvd_paper compute dtype

    def choice(self, d: int, columns: int | None = None):
        """The cost model's choice for an `auto` layer of input dimension d (see ``sketch_cost``)."""
        from cdad_dist.continual.sketch_cost import choose_sketch

        return choose_sketch(d, self.memory_budget_mb * (1 << 20), columns=columns,
                             rank_fraction=self.rank_fraction, buffer_columns=self.buffer_columns)

    def resolved_kind(self, d: int) -> str:
        if self.kind not in SKETCH_KINDS:
            raise ConfigError(f"continual.sketch must be one of {SKETCH_KINDS}, got {self.kind!r}")
        if self.kind != "auto":
            return self.kind
        return self.choice(d).kind


def make_sketch(d: int, options: SketchOptions, device: torch.device | str | None = None) -> Sketch:
    """Build the sketch ``options`` asks for a layer with input dimension d (the class from the registry)."""
    from cdad_dist.continual.registry import SKETCH_REGISTRY, resolve

    return resolve(SKETCH_REGISTRY, options.resolved_kind(d), "continual.sketch").from_options(d, options, device)
