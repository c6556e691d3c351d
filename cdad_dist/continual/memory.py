"""Cross-task memory: merge a new task's feature sketch into the old orthonormal basis (GPM criterion).

Correct version (default): with old basis P (d×k) and the new task's factors B = U·Σ (B·Bᵀ ≈ X_t·X_tᵀ) and true
total energy E = ‖X_t‖²_F, the residual R = B − P·PᵀB is what the old basis misses. Leading left singular
vectors of R are appended until (‖PᵀB‖² + Σ_{i≤r} σ_i(R)²) / E ≥ γ, then [P, U_R] is re-orthonormalised by QR
(its span is unchanged, the first k columns still span P). Unlike the official code it appends singular vectors
of R (not raw residual columns) and uses the configured γ (not a hard-coded 0.5).

The store keeps the smaller of U and its complement V; ``gpm_merge_gram_compact`` merges a Gram sketch straight
into that form (with a stored V, one eigh of VᵀGV of size d − k instead of any d × d decomposition).

Paper version (``eq6_merge``): Eq. 6, Û_t = S&K([Û_{t-1}, X_t], γ) with an unscaled Û_{t-1}, for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cdad_dist.continual.sketches import SketchFactors, rank_for_energy, stable_eigh, stable_svd
from cdad_dist.continual.store import compact_form
from cdad_dist.errors import ConfigError


@dataclass
class MergeInfo:
    """What one merge did, for logs and the task history (plain data)."""

    d: int
    k_old: int
    k_new: int
    energy_total: float  # ‖X_t‖²_F (true total, incl. energy a sketch discarded)
    captured_by_old: float  # fraction of X_t's energy already inside span(P)
    captured: float  # fraction of X_t's energy inside the merged basis (≥ γ unless the sketch cannot reach it)
    n_columns: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def orthonormality_error(U: Tensor) -> float:
    """‖UᵀU − I‖₂ computed in float64."""
    U64 = U.detach().to(torch.float64)
    eye = torch.eye(U64.shape[1], dtype=torch.float64, device=U64.device)
    if U64.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(U64.mT @ U64 - eye, ord=2))


def _qr_keep_signs(M: Tensor) -> Tensor:
    """Orthonormal Q with span(Q[:, :j]) = span(M[:, :j]) for all j, signs chosen so that diag(R) > 0.

    With the sign fix, columns that are already orthonormal come back (almost) unchanged.
    """
    Q, R = torch.linalg.qr(M, mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return Q * signs.unsqueeze(0)


def gpm_merge(U_old: Tensor | None, factors: SketchFactors, gamma: float,
              out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, MergeInfo]:
    """Return the merged orthonormal basis (d × k_new, ``out_dtype``) and what the merge did. Computes in float64."""
    rank_for_energy(torch.ones(1), 1.0, gamma)  # validates gamma
    B = factors.scaled.detach().to(torch.float64)
    d = B.shape[0]
    total = float(factors.total_energy)
    if U_old is None or U_old.shape[1] == 0:
        S2 = factors.S.detach().to(torch.float64) ** 2
        k = rank_for_energy(S2, total, gamma)
        U = factors.U[:, :k].detach().to(torch.float64)
        if k > 0:
            U = _qr_keep_signs(U)  # removes the float32 round-off of an isvd factor
        captured = float(S2[:k].sum()) / total if total > 0 else 1.0
        info = MergeInfo(d, 0, k, total, 0.0, captured, factors.n_columns)
        return U.to(out_dtype), info
    if U_old.shape[0] != d:
        raise ConfigError(f"gpm_merge: old basis has d={U_old.shape[0]}, new task's sketch d={d}")
    if total <= 0 or B.shape[1] == 0:  # the new task brought no features: nothing to add
        return U_old.detach().to(out_dtype).clone(), MergeInfo(d, U_old.shape[1], U_old.shape[1], total, 1.0, 1.0,
                                                               factors.n_columns)
    P = U_old.detach().to(device=B.device, dtype=torch.float64)
    k_old = P.shape[1]
    coeff = P.mT @ B
    captured_old = float((coeff ** 2).sum())
    need = gamma * total - captured_old  # energy the residual directions must still contribute
    r, captured_add, Ur = 0, 0.0, None
    if need > 0 and k_old < d:
        R = B - P @ coeff
        R = R - P @ (P.mT @ R)  # second Gram-Schmidt pass: P may be orthonormal only to float32 accuracy
        Ur, Sr, _ = stable_svd(R)
        r = min(rank_for_energy(Sr ** 2, need, 1.0), d - k_old)  # smallest r with Σσ² ≥ need
        captured_add = float((Sr[:r] ** 2).sum())
    merged = P if r == 0 else _qr_keep_signs(torch.cat([P, Ur[:, :r]], dim=1))
    info = MergeInfo(d, k_old, k_old + r, total, captured_old / total, (captured_old + captured_add) / total,
                     factors.n_columns)
    return merged.to(out_dtype), info


def gpm_merge_gram(U_old: Tensor | None, G: Tensor, gamma: float, n_columns: int = 0,
                   out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, MergeInfo]:
    """``gpm_merge`` for an exact Gram matrix G = X·Xᵀ (d × d): one eigh of the residual Gram
    (I − PPᵀ)·G·(I − PPᵀ) instead of an eigh of G followed by an SVD of the residual factor."""
    rank_for_energy(torch.ones(1), 1.0, gamma)
    G = G.detach().to(torch.float64)
    d = G.shape[0]
    total = float(torch.trace(G))
    if U_old is not None and U_old.shape[0] != d:
        raise ConfigError(f"gpm_merge: old basis has d={U_old.shape[0]}, new task's Gram matrix d={d}")
    k_old = 0 if U_old is None else int(U_old.shape[1])
    if total <= 0:  # the new task brought no features: nothing to add
        U = U_old if U_old is not None else G.new_zeros(d, 0)
        return U.detach().to(out_dtype).clone(), MergeInfo(d, k_old, k_old, total, 1.0, 1.0, n_columns)
    if k_old == 0:
        residual, captured_old, P = G, 0.0, None
    else:
        P = U_old.detach().to(device=G.device, dtype=torch.float64)
        GP = G @ P
        captured_old = float((P * GP).sum())  # trace(Pᵀ G P)
        A = G - P @ GP.mT  # (I − PPᵀ)·G
        residual = A - (A @ P) @ P.mT  # (I − PPᵀ)·G·(I − PPᵀ)
        residual = 0.5 * (residual + residual.mT)  # exact symmetry for eigh
    need = gamma * total - captured_old
    r, captured_add, Ur = 0, 0.0, None
    if need > 0 and k_old < d:
        evals, evecs = stable_eigh(residual)
        evals, Ur = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        r = min(rank_for_energy(evals, need, 1.0), d - k_old)
        captured_add = float(evals[:r].sum())
    if r == 0:
        merged = P if P is not None else G.new_zeros(d, 0)
    elif P is None:
        merged = Ur[:, :r]
    else:
        merged = _qr_keep_signs(torch.cat([P, Ur[:, :r]], dim=1))
    info = MergeInfo(d, k_old, k_old + r, total, captured_old / total, (captured_old + captured_add) / total,
                     n_columns)
    return merged.to(out_dtype).contiguous(), info


def gpm_merge_gram_complement(V_old: Tensor, G: Tensor, gamma: float,
                              n_columns: int = 0) -> tuple[Tensor, MergeInfo]:
    """``gpm_merge_gram`` for an old basis given by its complement V (d × r, span(V) = span(U_old)⊥).

    The residual Gram (I − UUᵀ)·G·(I − UUᵀ) is V·H·Vᵀ with H = VᵀGV (r × r), so one eigh of H gives both the
    appended directions (V times its leading eigenvectors) and the new complement (V times the others), exactly
    orthonormal, without forming U or any d × d decomposition. Returns the new complement (float64).
    """
    rank_for_energy(torch.ones(1), 1.0, gamma)
    G = G.detach().to(torch.float64)
    d, r = V_old.shape
    if G.shape[0] != d:
        raise ConfigError(f"gpm_merge: old complement has d={d}, new task's Gram matrix d={G.shape[0]}")
    total = float(torch.trace(G))
    V = V_old.detach().to(device=G.device, dtype=torch.float64)
    if r > 0:
        V = _qr_keep_signs(V)  # the stored V may be orthonormal only to float32 accuracy
    if total <= 0 or r == 0:  # no new features, or nothing left to add
        return V, MergeInfo(d, d - r, d - r, total, 1.0, 1.0, n_columns)
    H = V.mT @ G @ V
    H = 0.5 * (H + H.mT)
    captured_old = total - float(torch.trace(H))
    need = gamma * total - captured_old
    r_add, captured_add = 0, 0.0
    evecs = None
    if need > 0:
        evals, evecs = stable_eigh(H)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        r_add = min(rank_for_energy(evals, need, 1.0), r)
        captured_add = float(evals[:r_add].sum())
    V_new = V if r_add == 0 else (V @ evecs[:, r_add:]).contiguous()
    info = MergeInfo(d, d - r, d - r + r_add, total, captured_old / total, (captured_old + captured_add) / total,
                     n_columns)
    return V_new, info


def gpm_merge_gram_compact(old: Tensor | None, old_is_complement: bool, G: Tensor, gamma: float,
                           n_columns: int = 0) -> tuple[Tensor, bool, MergeInfo]:
    """``gpm_merge_gram`` from and to the store's smaller form (see ``store.compact_form``).

    ``old`` is U, or V when ``old_is_complement``. Returns (U or V in float64, is_complement, info). A complement
    stays a complement (k only grows); the first task takes its complement straight from the eigenvectors of G.
    """
    d = G.shape[0]
    if old is not None and old_is_complement:
        V, info = gpm_merge_gram_complement(old, G, gamma, n_columns)
        return V, True, info
    if old is None or old.shape[1] == 0:
        G64 = G.detach().to(torch.float64)
        total = float(torch.trace(G64))
        if total <= 0:
            return G64.new_zeros(d, 0), False, MergeInfo(d, 0, 0, total, 1.0, 1.0, n_columns)
        evals, evecs = stable_eigh(0.5 * (G64 + G64.mT))
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        k = rank_for_energy(evals, total, gamma)
        info = MergeInfo(d, 0, k, total, 0.0, float(evals[:k].sum()) / total, n_columns)
        if 2 * k > d:
            return evecs[:, k:].contiguous(), True, info
        return evecs[:, :k].contiguous(), False, info
    U, info = gpm_merge_gram(old, G, gamma, n_columns, out_dtype=torch.float64)
    stored, is_complement = compact_form(U)
    return stored, is_complement, info


def eq6_merge(U_old: Tensor | None, X: Tensor, gamma: float, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Paper Eq. 6: Û_t = S&K([Û_{t-1}, X_t], γ) with the unscaled old basis (comparison only).

    ``X`` is the new task's feature matrix or, with streaming, its paper-iSVD basis. The energy of each old
    column is 1, so the γ truncation drops old directions whenever X_t carries much more energy.
    """
    rank_for_energy(torch.ones(1), 1.0, gamma)
    M = X.detach().to(torch.float64)
    if U_old is not None and U_old.shape[1] > 0:
        M = torch.cat([U_old.detach().to(device=M.device, dtype=torch.float64), M], dim=1)
    if M.shape[1] == 0:
        return M.to(out_dtype)
    U, S, _ = stable_svd(M)
    k = rank_for_energy(S ** 2, float((S ** 2).sum()), gamma)
    return U[:, :k].to(out_dtype)
