"""``cdad bench isvd``: memory, time and accuracy of the ways to get a layer's γ-basis from a big feature matrix.

Matrix M (d × Λ) of the paper's Fig. 4 shape (1280 × 50 000; ``quick``: 256 × 8 000): a decaying power-law
spectrum plus isotropic noise, generated block by block from a seed, so a blockwise method never holds M.
Methods, each in a fresh subprocess (so its peak RSS is its own):

- ``svd_econ``: torch.linalg.svd(M, full_matrices=False) of the whole matrix (the exact reference);
- ``isvd_paper``: the paper's unscaled iSVD over n = 10 blocks;
- ``isvd``: the U·Σ-carrying iSVD over the same blocks;
- ``gram``: exact float64 X·Xᵀ accumulation over the same blocks + one eigh.

The paper's full SVD (``full_matrices=True``, Alg. 1) is counted from shapes only (Λ² entries for Vh: 10 GB).
Memory is reported two ways: the working set of tensors each method holds at its peak (from shapes: the sketches'
``peak_nbytes`` plus the block being fed) and the subprocess's peak RSS minus that of a baseline subprocess that
only generates the blocks. Accuracy: energy captured by each basis (exactly, from the economy SVD: ‖UᵀM‖² =
Σ σ_i²‖Uᵀu_i‖²) relative to the exact γ-basis, and principal angles to the exact basis of the same rank.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

METHODS = ("svd_econ", "isvd_paper", "isvd", "gram")
F32 = 4


@dataclass
class IsvdBenchConfig:
    d: int = 1280
    n_columns: int = 50_000
    n_blocks: int = 10
    gamma: float = 0.999
    decay: float = 1.5  # singular values s_i = (1 + 160·i/d)^-decay: the γ=0.999 basis keeps about a fifth of d
    noise: float = 1e-3  # isotropic noise std (s_0 = 1)
    seed: int = 0
    device: str = "cpu"
    carry_gamma: float | None = None  # isvd's carried truncation; None: the strategy's default (sketches.py)
    features_dir: str | None = None  # set by run_on_model: blocks come from captured block_<j>.npy files

    @classmethod
    def quick(cls) -> IsvdBenchConfig:
        return cls(d=256, n_columns=8_000)


# -- the synthetic matrix ----------------------------------------------------------------------------------------

def _mixing(cfg: IsvdBenchConfig, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    Q, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=g))
    s = (1.0 + 160.0 * torch.arange(cfg.d, dtype=torch.float32) / cfg.d) ** (-cfg.decay)
    return (Q * s).to(device)


def _blocks(cfg: IsvdBenchConfig, device: torch.device):
    """Yield the n_blocks column blocks of M (deterministic: block j from generator seed (seed, j))."""
    if cfg.features_dir is not None:  # captured features, one file per block: one block resident at a time
        for j in range(cfg.n_blocks):
            yield torch.from_numpy(np.load(Path(cfg.features_dir) / f"block_{j}.npy")).to(device)
        return
    A = _mixing(cfg, device)
    m = cfg.n_columns // cfg.n_blocks
    for j in range(cfg.n_blocks):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + j + 1)
        Z = torch.randn(cfg.d, m, generator=g).to(device)
        N = torch.randn(cfg.d, m, generator=g).to(device)
        yield (A @ Z + cfg.noise * N) / math.sqrt(m)


# -- worker (one method per fresh process) -----------------------------------------------------------------------

def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker(method: str, cfg_json: str, out_dir: str) -> None:
    from cdad_dist.continual.sketches import SketchOptions, make_sketch

    cfg = IsvdBenchConfig(**json.loads(cfg_json))
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    out = Path(out_dir)
    elapsed, working_set = 0.0, 0
    basis = S = None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if method == "baseline":  # the same generation loop as the blockwise methods, without a method
        for block in _blocks(cfg, device):
            working_set = max(working_set, block.numel() * F32)
            del block
    elif method == "svd_econ":
        M = torch.cat(list(_blocks(cfg, device)), dim=1)
        sync()
        t0 = time.perf_counter()
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        sync()
        elapsed = time.perf_counter() - t0
        working_set = F32 * (M.numel() + U.numel() + S.numel() + Vh.numel())
        energies = S.double() ** 2
        k = int(min(torch.searchsorted(energies.cumsum(0), cfg.gamma * energies.sum()).item() + 1, cfg.d))
        basis = U[:, :k]
        np.save(out / "svd_econ_full_U.npy", U.double().cpu().numpy())
    else:
        # built the way the strategy builds them (carry γ, buffering: the strategy's defaults)
        sketch = make_sketch(cfg.d, SketchOptions(kind=method, gamma=cfg.gamma, carry_gamma=cfg.carry_gamma), device)
        block_bytes = 0
        for block in _blocks(cfg, device):
            block_bytes = max(block_bytes, block.numel() * block.element_size())
            sync()
            t0 = time.perf_counter()
            sketch.update(block)
            sync()
            elapsed += time.perf_counter() - t0
            del block
        t0 = time.perf_counter()
        basis = sketch.basis(cfg.gamma)
        sync()
        elapsed += time.perf_counter() - t0
        working_set = sketch.peak_nbytes + block_bytes
    result = {"method": method, "time_s": elapsed, "working_set_bytes": int(working_set),
              "peak_rss_bytes": _peak_rss_bytes(),
              "peak_device_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None}
    if basis is not None:
        np.save(out / f"{method}_U.npy", basis.double().cpu().numpy())
        result["k"] = int(basis.shape[1])
    if S is not None:
        np.save(out / f"{method}_S.npy", S.double().cpu().numpy())
    (out / f"{method}.json").write_text(json.dumps(result))


def _run_worker(method: str, cfg: IsvdBenchConfig, tmp: Path, timeout: float) -> dict:
    code = f"from cdad_dist.bench.isvd import _worker; _worker({method!r}, {json.dumps(json.dumps(asdict(cfg)))}, " \
           f"{str(tmp)!r})"
    # A fixed mmap threshold makes glibc return large freed buffers to the OS at once, so peak RSS follows the
    # tensors alive rather than the allocator's adaptive heap growth.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench isvd: worker {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((tmp / f"{method}.json").read_text())


# -- analysis ----------------------------------------------------------------------------------------------------

def _rank_for(S2: np.ndarray, gamma: float) -> int:
    cumulative = np.cumsum(S2)
    return int(min(np.searchsorted(cumulative, gamma * cumulative[-1]) + 1, len(S2)))


def _leading_residual(U_exact: np.ndarray, U: np.ndarray, count: int) -> float:
    """max_i ‖(I − UUᵀ)u_i‖ over the ``count`` leading exact directions: sine of how far the worst of them
    lies outside span(U) (0 = all kept)."""
    lead = U_exact[:, :count]
    return float(np.linalg.norm(lead - U @ (U.T @ lead), axis=0).max()) if count else 0.0


def _angles(U_exact: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Principal angles (rad) between span(U) and span(U_exact[:, :k]), k = U's rank, from their sines
    (arccos of cosines near 1 would be inaccurate by ~1e-3 rad in float64)."""
    k = U.shape[1]
    if k == 0:
        return np.zeros(0)
    lead = U_exact[:, :k]
    sines = np.linalg.svd(U - lead @ (lead.T @ U), compute_uv=False)
    return np.arcsin(np.clip(sines, 0.0, 1.0))


def full_svd_paper_bytes(d: int, n: int) -> int:
    """Alg. 1's torch.linalg.svd(M) (full_matrices=True): M, U d×d, S, Vh Λ×Λ (paper supp. B's count)."""
    return F32 * (d * n + d * d + n * n + min(d, n))


def paper_isvd_formula_bytes(d: int, m: int, k: int) -> int:
    """Paper supp. B: d(m+k) + d² + (m+k)² + min(d, m+k) entries (full_matrices SVD of [Û, M_i])."""
    return F32 * (d * (m + k) + d * d + (m + k) ** 2 + min(d, m + k))


def run(quick: bool, out_dir, *, cfg: IsvdBenchConfig | None = None, timeout: float = 1800.0) -> dict:
    """Run every method in its own subprocess; print one line of ratios per method; return the results."""
    cfg = cfg or (IsvdBenchConfig.quick() if quick else IsvdBenchConfig())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".isvd_bench_") as tmp_name:
        tmp = Path(tmp_name)
        raw = {m: _run_worker(m, cfg, tmp, timeout) for m in ("baseline", *METHODS)}
        U_exact = np.load(tmp / "svd_econ_full_U.npy")
        S_exact = np.load(tmp / "svd_econ_S.npy")
        bases = {m: np.load(tmp / f"{m}_U.npy") for m in METHODS}
    return _report(cfg, raw, U_exact, S_exact, bases)


def capture_model_features(directory: Path, preset: str = "tiny", layer: str | None = None, images: int = 10,
                           ddim_steps: int = 10, seed: int = 0) -> tuple[str, int, int]:
    """Capture one protected layer's inputs along the DDIM trajectory, one block per image (the paper's e = 1),
    as ``block_<j>.npy`` (d × m float32) in ``directory``. Default layer: the U-Net layer with the largest d
    (the U-Net runs at every DDIM step, so it has the most columns). Returns (layer, d, m)."""
    from cdad_dist.continual.capture import CaptureConfig, FeatureCapture, make_capture_forward
    from cdad_dist.continual.layers import LayerPatterns, discover_protected, input_dim
    from cdad_dist.models.presets import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(preset=preset)).eval()
    layers = discover_protected(model, LayerPatterns())
    layer = layer or max(sorted(n for n in layers if n.startswith("unet.")), key=lambda n: input_dim(layers[n]))
    if layer not in layers:
        raise ValueError(f"bench isvd: model preset {preset!r} has no protected layer {layer!r}")

    class _Collect:
        def __init__(self) -> None:
            self.parts: list[torch.Tensor] = []

        def update(self, block: torch.Tensor) -> None:
            self.parts.append(block.detach().float().cpu())

    size = model.model_config.image_size
    g = torch.Generator().manual_seed(seed)
    forward = make_capture_forward(model, CaptureConfig(images=1.0, ddim_steps=ddim_steps, seed=seed))
    shape = None
    for j in range(images):
        coarse = torch.rand(1, 3, 8, 8, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
        collect = _Collect()
        with FeatureCapture({layer: layers[layer]}, {layer: collect}), torch.no_grad():
            forward({"image": image})
        block = torch.cat(collect.parts, dim=1).numpy()
        if shape is not None and block.shape != shape:
            raise ValueError(f"bench isvd: layer {layer} gave blocks of shapes {shape} and {block.shape}")
        shape = block.shape
        np.save(directory / f"block_{j}.npy", block)
    return layer, shape[0], shape[1]


def run_on_model(quick: bool, out_dir, *, preset: str = "tiny", layer: str | None = None,
                 timeout: float = 1800.0) -> dict:
    """The same comparison on features captured from a model layer (one block per image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".isvd_features_") as tmp_name:
        images = 4 if quick else 10
        layer, d, m = capture_model_features(Path(tmp_name), preset, layer, images=images,
                                             ddim_steps=3 if quick else 10)
        cfg = IsvdBenchConfig(d=d, n_columns=m * images, n_blocks=images, features_dir=tmp_name)
        print(f"bench isvd on model features: preset {preset}, layer {layer} (d={d}, {m} columns per image)")
        result = run(quick, out_dir, cfg=cfg, timeout=timeout)
    result["model"] = {"preset": preset, "layer": layer}
    return result


def _report(cfg: IsvdBenchConfig, raw: dict, U_exact: np.ndarray, S_exact: np.ndarray, bases: dict) -> dict:
    S2 = S_exact ** 2
    total = float(S2.sum())
    k_exact = _rank_for(S2, cfg.gamma)
    exact_energy = float(S2[:k_exact].sum())
    econ_ws = raw["svd_econ"]["working_set_bytes"]
    full_ws = full_svd_paper_bytes(cfg.d, cfg.n_columns)
    baseline_rss = raw["baseline"]["peak_rss_bytes"]
    m = cfg.n_columns // cfg.n_blocks
    methods = {}
    print(f"bench isvd: M {cfg.d}×{cfg.n_columns}, n={cfg.n_blocks} blocks, γ={cfg.gamma}, exact k={k_exact} "
          f"({100 * exact_energy / total:.3f}% energy); full SVD (paper, shapes) {full_ws / 2**30:.2f} GiB")
    for name in METHODS:
        r, U = raw[name], bases[name]
        energy = float(((U.T @ U_exact) ** 2 @ S2).sum())
        angles = _angles(U_exact, U)
        entry = {
            "k": int(U.shape[1]), "time_s": r["time_s"], "working_set_bytes": r["working_set_bytes"],
            "working_set_vs_econ_svd": r["working_set_bytes"] / econ_ws,
            "working_set_vs_full_svd": r["working_set_bytes"] / full_ws,
            "saving_rate_vs_full_svd": 1.0 - r["working_set_bytes"] / full_ws,
            "peak_rss_bytes": r["peak_rss_bytes"], "rss_over_baseline_bytes": r["peak_rss_bytes"] - baseline_rss,
            "peak_device_bytes": r["peak_device_bytes"],
            "energy_fraction": energy / total, "energy_vs_exact_gamma_basis": energy / exact_energy,
            "max_angle_rad": float(angles.max()) if angles.size else 0.0,
            "median_angle_rad": float(np.median(angles)) if angles.size else 0.0,
            "leading_half_max_sine": _leading_residual(U_exact, U, k_exact // 2),
        }
        methods[name] = entry
        print(f"  {name:<10} k={entry['k']:<5} time {entry['time_s']:7.2f}s  working set "
              f"{entry['working_set_bytes'] / 2**20:8.1f} MiB = {100 * entry['working_set_vs_econ_svd']:6.2f}% of "
              f"econ SVD, {100 * entry['working_set_vs_full_svd']:6.3f}% of full SVD (saving "
              f"{100 * entry['saving_rate_vs_full_svd']:.2f}%)  RSS +{entry['rss_over_baseline_bytes'] / 2**20:8.1f}"
              f" MiB  energy {100 * entry['energy_vs_exact_gamma_basis']:7.3f}% of exact γ-basis  angles "
              f"median {entry['median_angle_rad']:.1e} max {entry['max_angle_rad']:.1e} rad  leading-half "
              f"sine {entry['leading_half_max_sine']:.1e}")
    targets = {}
    if cfg.features_dir is None:  # the memory targets are stated for the Fig. 4 shape (Λ = 39·d, n = 10)
        targets.update({f"{m_}_working_set_le_25pct_econ": methods[m_]["working_set_vs_econ_svd"] <= 0.25
                        for m_ in ("isvd", "gram")})
        targets.update({f"{m_}_working_set_le_5pct_full": methods[m_]["working_set_vs_full_svd"] <= 0.05
                        for m_ in ("isvd", "gram")})
    targets["isvd_energy_ge_99.9pct_of_exact"] = methods["isvd"]["energy_vs_exact_gamma_basis"] >= 0.999
    print("  targets: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    summary = ", ".join(f"{m_}: ws {100 * methods[m_]['working_set_vs_econ_svd']:.1f}% of econ SVD, energy "
                        f"{100 * methods[m_]['energy_vs_exact_gamma_basis']:.3f}% of exact" for m_ in METHODS[1:])
    failed = [k for k, v in targets.items() if not v]
    summary += f"; targets {'all PASS' if not failed else 'FAIL: ' + ', '.join(failed)}"
    return {"summary": summary, "config": asdict(cfg), "k_exact": k_exact,
            "exact_energy_fraction": exact_energy / total,
            "econ_svd_working_set_bytes": econ_ws, "full_svd_paper_bytes": full_ws,
            "paper_isvd_formula_bytes": paper_isvd_formula_bytes(cfg.d, m, k_exact),
            "baseline_rss_bytes": baseline_rss, "methods": methods, "targets": targets,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="model preset: benchmark on captured features instead")
    args = parser.parse_args()
    if args.model:
        result = run_on_model(args.quick, args.out, preset=args.model)
    else:
        base = IsvdBenchConfig.quick() if args.quick else IsvdBenchConfig()
        base.device = args.device
        result = run(args.quick, args.out, cfg=base)
    Path(args.out, "isvd.json").write_text(json.dumps(result, indent=2))
