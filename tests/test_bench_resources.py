"""Arithmetic of the throughput / basis / storage benchmarks (the runs themselves are `cdad bench all --quick`)."""
from __future__ import annotations

import pytest
import torch

from cdad_dist.bench import BENCHMARKS, run_benchmarks
from cdad_dist.bench.basis import judge
from cdad_dist.bench.basis import model_line as basis_line
from cdad_dist.bench.storage import residuals
from cdad_dist.bench.throughput import gpu_peak_tflops
from cdad_dist.bench.throughput import summary_line as throughput_line
from cdad_dist.continual.store import BasisStore, compact_form
from cdad_dist.errors import ConfigError


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


@pytest.mark.parametrize("k", [3, 28])  # thin U is stored as U, thick U as its complement V
def test_bf16_storage_residual_is_measured_against_the_exact_basis(k):
    d = 32
    stored, is_complement = compact_form(_orthonormal(d, k, seed=k))
    store = BasisStore(bases={"layer": stored.float()}, gamma=0.999, task=0,
                       complement={"layer"} if is_complement else set())
    out = residuals(store, {"layer": torch.zeros(6, d)}, probes=3, seed=0)
    assert out["float32_max"] < 1e-5  # float32 factors project to round-off
    assert 1e-4 < out["bfloat16_max"] < 5e-2  # bf16 keeps ~3 significant digits: a real, small leak
    assert out["bfloat16_mean"] <= out["bfloat16_max"]


def test_basis_summary_reports_the_target_on_the_worst_configuration():
    def rank(ratio):
        return {"basis_s": 3.0 * ratio, "inference_s": 3.0, "ratio": ratio, "capture_ratio": ratio - 0.1,
                "fixed_s": 0.3}
    result = {"by_ranks": {"1rank": rank(1.2), "2rank": rank(3.4)}, "speedup_2_vs_1_rank": 1.7, "target_ratio": 3.0,
              "energy": {"worst_ratio": 0.9995, "worst_layer": "unet.conv_in", "mean_ratio": 0.9999}}
    result["met"] = judge(result)
    line = basis_line("sd15x0.125@64px", result)
    assert "2 ranks 1.70x faster" in line and "NOT MET" in line and "unet.conv_in" in line
    result["by_ranks"]["2rank"] = rank(2.9)
    result["met"] = judge(result)
    assert basis_line("sd15", result).endswith("MET)") and "NOT MET" not in basis_line("sd15", result)
    result["energy"]["worst_ratio"] = 0.998  # fast but below the energy target: not met
    assert not judge(result)


def test_throughput_summary_and_gpu_peaks():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("Some Unknown GPU") is None
    result = {"config": {"preset": "tiny"},
              "cpu": {"1proc": {"images_per_s": 10.0, "peak_rss_mib_per_process": 600.0},
                      "2proc": {"images_per_s": 15.0, "peak_rss_mib_per_process": 650.0},
                      "speedup_2proc_vs_1proc": 1.5}}
    assert "2 processes / 1 process = 1.50x" in throughput_line(result)


def test_every_benchmark_is_registered_and_unknown_names_are_refused(tmp_path):
    assert set(BENCHMARKS) == {"isvd", "projection", "inference", "continual", "throughput", "basis", "storage", "plan",
                               "replaycad"}
    with pytest.raises(ConfigError, match="unknown benchmark"):
        run_benchmarks("nope", quick=True, out_dir=tmp_path)


def test_peak_rss_is_this_process_own():
    """In a fresh interpreter (a long test process has long passed any new allocation's size)."""
    import subprocess
    import sys

    code = ("import torch; from cdad_dist.bench.throughput import peak_rss_mib; a = peak_rss_mib(); "
            "b = torch.ones(256 * 2 ** 20 // 4); print(a, peak_rss_mib(), float(b[-1]))")
    before, after, _ = map(float, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert after >= before + 200  # the 256 MiB block shows in this process's own peak
