"""Benchmarks behind `cdad bench NAME`: each measures in one run and reports ratios, and writes JSON."""
from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from cdad_dist.errors import ConfigError

# name -> module with `run(quick: bool, out_dir) -> dict`
BENCHMARKS = {
    "isvd": "cdad_dist.bench.isvd",
    "projection": "cdad_dist.bench.projection",
    "inference": "cdad_dist.bench.inference",
    "continual": "cdad_dist.bench.continual",
    "throughput": "cdad_dist.bench.throughput",
    "basis": "cdad_dist.bench.basis",
    "storage": "cdad_dist.bench.storage",
    "plan": "cdad_dist.bench.plan",
    "replaycad": "cdad_dist.bench.replaycad",
}


CONFIGURABLE = ("inference", "continual")  # benchmarks that take a run config (`--config`: any dataset)


def run_benchmarks(name: str, *, quick: bool, out_dir: Path, config: str | None = None,
                   strategies: list[str] | None = None, seeds: int = 1,
                   sequence: str | None = None, compare_maps: bool = False, run_dir: str | None = None,
                   samples: list[int] | None = None, test_shards: str | None = None) -> dict[str, Any]:
    names = list(BENCHMARKS) if name == "all" else [name]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r}; choose one of {sorted(BENCHMARKS)} or 'all'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    own_options = {"continual": {"strategies": strategies, "seeds": seeds if seeds != 1 else None,
                                 "sequence": sequence, "compare_maps": compare_maps},
                   "inference": {"run_dir": run_dir, "samples": samples, "test_shards": test_shards}}
    machine = machine_info()
    lines = [f"# cdad bench {name}{' --quick' if quick else ''}", "", f"Machine: {machine['summary']}", ""]
    for bench in names:
        module = importlib.import_module(BENCHMARKS[bench])
        start = time.perf_counter()
        kwargs = {"config": config} if config is not None and bench in CONFIGURABLE else {}
        # each benchmark's own options, passed only when set (unset ones keep the benchmark's defaults)
        kwargs.update({k: v for k, v in own_options.get(bench, {}).items() if v})
        results[bench] = module.run(quick, out_dir / bench, **kwargs)
        seconds = time.perf_counter() - start
        if isinstance(results[bench], dict):
            results[bench].setdefault("machine", machine)
            results[bench]["bench_seconds"] = seconds
        (out_dir / f"{bench}.json").write_text(json.dumps(results[bench], indent=2, default=str))
        summary = results[bench].get("summary", "") if isinstance(results[bench], dict) else ""
        lines.append(f"- `{bench}` ({seconds:.0f} s): {summary}")
        # Rewritten after every benchmark: an interrupted `all` still leaves what it measured.
        (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return results


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (for docs/benchmarks.md)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cores = os.cpu_count()
    summary = f"{cpu}, {cores} cores, torch {torch.__version__}" + (f", GPU {gpu}" if gpu else ", no GPU")
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "gpu": gpu, "python": platform.python_version(),
            "summary": summary}
