"""Cross-task GPM merge and the basis store."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cdad_dist.continual.memory import eq6_merge, gpm_merge, gpm_merge_gram, orthonormality_error
from cdad_dist.continual.sketches import GramSketch, IsvdSketch
from cdad_dist.continual.store import BasisStore, task_file_name
from cdad_dist.errors import CheckpointError, ConfigError

GAMMA = 0.999


def task_features(d: int, n: int, seed: int, rank: int, shared: torch.Tensor | None = None) -> torch.Tensor:
    """Features of one task: a random rank-`rank` subspace with decaying energy, optionally plus a shared part."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    s = torch.exp(-torch.arange(rank, dtype=torch.float64) / 4)
    X = (Q * s) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    X += 1e-3 * torch.randn(d, n, generator=g, dtype=torch.float64)
    if shared is not None:
        X += shared @ torch.randn(shared.shape[1], n, generator=g, dtype=torch.float64)
    return X


def gram_of(X: torch.Tensor) -> GramSketch:
    sketch = GramSketch(X.shape[0])
    sketch.update(X)
    return sketch


def fraction_in(U: torch.Tensor, X: torch.Tensor) -> float:
    return float(((U.double().mT @ X.double()) ** 2).sum() / (X.double() ** 2).sum())


def test_gpm_merge_stays_orthonormal_and_reaches_gamma_over_tasks():
    d = 80
    U = None
    tasks = [task_features(d, 3000, seed=s, rank=12) for s in range(4)]
    for t, X in enumerate(tasks):
        sketch = gram_of(X) if t % 2 == 0 else IsvdSketch(d)
        if t % 2:
            for block in X.float().chunk(6, dim=1):
                sketch.update(block)
        U_new, info = gpm_merge(U, sketch.factors(), GAMMA)
        assert U_new.dtype == torch.float32
        assert orthonormality_error(U_new) < 1e-5
        if U is not None:  # the old span is kept exactly (old columns first, same span)
            residual = U.double() - U_new.double() @ (U_new.double().mT @ U.double())
            assert float(residual.norm()) < 1e-5
            assert info.k_old == U.shape[1]
        assert info.k_new == U_new.shape[1]
        assert fraction_in(U_new, X) >= GAMMA - 1e-4  # the new task's energy criterion
        assert info.captured == pytest.approx(fraction_in(U_new, X), abs=1e-4)
        U = U_new
    # every earlier task is still captured to γ by the final basis
    for X in tasks:
        assert fraction_in(U, X) >= GAMMA - 1e-4


def test_gpm_merge_adds_the_fewest_directions():
    d = 60
    X0, X1 = task_features(d, 2000, 0, rank=10), task_features(d, 2000, 1, rank=10)
    U0, _ = gpm_merge(None, gram_of(X0).factors(), GAMMA)
    U1, info = gpm_merge(U0, gram_of(X1).factors(), GAMMA)
    r = info.k_new - info.k_old
    assert r > 0
    fewer = U1[:, : U1.shape[1] - 1]  # dropping the last added direction falls below γ
    assert fraction_in(fewer, X1) < GAMMA <= fraction_in(U1, X1) + 1e-9


def test_gpm_merge_adds_nothing_when_the_new_task_lies_in_the_old_span():
    d = 50
    X0 = task_features(d, 2000, 0, rank=8)
    U0, _ = gpm_merge(None, gram_of(X0).factors(), GAMMA)
    X1 = U0.double() @ torch.randn(U0.shape[1], 500, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    U1, info = gpm_merge(U0, gram_of(X1).factors(), GAMMA)
    assert info.k_new == info.k_old
    assert torch.equal(U1, U0)
    assert info.captured_by_old > 1 - 1e-9


def test_gram_form_merge_equals_factor_form_merge():
    d = 70
    U_f = U_g = None
    for t in range(3):
        X = task_features(d, 2500, seed=20 + t, rank=9)
        sketch = gram_of(X)
        U_f, info_f = gpm_merge(U_f, sketch.factors(), GAMMA)
        U_g, info_g = gpm_merge_gram(U_g, sketch.gram(), GAMMA, sketch.n_columns)
        assert U_f.shape == U_g.shape and info_f.k_new == info_g.k_new
        assert info_g.captured == pytest.approx(info_f.captured, abs=1e-9)
        assert orthonormality_error(U_g) < 1e-5
        sines = torch.linalg.matrix_norm(U_g.double() - U_f.double() @ (U_f.double().mT @ U_g.double()), ord=2)
        assert float(sines) < 1e-5
    empty, info = gpm_merge_gram(U_g, torch.zeros(d, d, dtype=torch.float64), GAMMA)
    assert torch.equal(empty, U_g) and info.k_new == info.k_old


def test_gpm_merge_rejects_a_basis_of_another_layer():
    with pytest.raises(ConfigError, match="d=7"):
        gpm_merge(torch.zeros(7, 2), gram_of(torch.randn(5, 30, dtype=torch.float64)).factors(), GAMMA)
    with pytest.raises(ConfigError, match="d=7"):
        gpm_merge_gram(torch.zeros(7, 2), torch.eye(5, dtype=torch.float64), GAMMA)


def test_eq6_merge_drops_the_old_task_when_the_new_one_has_more_energy():
    """Paper Eq. 6 with an unscaled Û: old directions are kept only while X_t's energy is small."""
    d = 40
    X0 = task_features(d, 500, 0, rank=5)
    U0 = eq6_merge(None, X0, GAMMA)
    assert orthonormality_error(U0) < 1e-5
    X1 = 30 * task_features(d, 4000, 1, rank=20)  # far more energy than the k0 unit columns of Û_0
    U_paper = eq6_merge(U0, X1, GAMMA)
    U_ours, _ = gpm_merge(U0, gram_of(X1).factors(), GAMMA)
    assert orthonormality_error(U_paper) < 1e-5
    assert fraction_in(U_ours, X0) >= GAMMA - 1e-4
    assert fraction_in(U_paper, X0) < 0.9


def test_store_roundtrip_metadata_and_sizes(tmp_path):
    bases = {"unet.conv_in": torch.linalg.qr(torch.randn(36, 5))[0], "amn.linear1": torch.zeros(16, 0)}
    store = BasisStore(bases=bases, gamma=GAMMA, task=2)
    path = store.save(tmp_path)
    assert path.name == task_file_name(2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["layers"]) == {"amn.linear1": {"d": 16, "k": 0}, "unet.conv_in": {"d": 36, "k": 5}}
    assert meta["task"] == "2" and float(meta["gamma"]) == GAMMA
    loaded = BasisStore.load(path)
    assert loaded.task == 2 and loaded.gamma == GAMMA
    assert torch.equal(loaded.bases["unet.conv_in"], bases["unet.conv_in"])
    assert loaded.bases["amn.linear1"].shape == (16, 0)
    assert store.total_bytes() == 36 * 5 * 4
    assert store.relative_to(36 * 8 * 4) == pytest.approx(5 / 8)
    assert BasisStore.latest(tmp_path) == path
    half = BasisStore(bases=bases, task=3).save(tmp_path, dtype="bfloat16")
    assert BasisStore.load(half).bases["unet.conv_in"].dtype == torch.bfloat16
    assert BasisStore.latest(tmp_path) == half


def test_store_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        BasisStore.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        BasisStore.load(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(foreign), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="foreign.safetensors.*format"):
        BasisStore.load(foreign)
    lying = tmp_path / "lying.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(lying),
              metadata={"format": "cdad-bases/1", "task": "0", "gamma": "0.9",
                        "layers": json.dumps({"x": {"d": 2, "k": 3}})})
    with pytest.raises(CheckpointError, match="'x'"):
        BasisStore.load(lying)
    with pytest.raises(CheckpointError, match="empty"):
        BasisStore().save(tmp_path)
    with pytest.raises(ConfigError, match="basis_dtype"):
        BasisStore(bases={"a": torch.zeros(2, 1)}, task=0).save(tmp_path, dtype="int8")
    assert not math.isnan(BasisStore().relative_to(10))
