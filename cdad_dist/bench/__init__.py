"""Benchmarks behind `cdad bench NAME`: each measures in one run and reports ratios, and writes JSON."""
from __future__ import annotations

import importlib
import json
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
}


def run_benchmarks(name: str, *, quick: bool, out_dir: Path) -> dict[str, Any]:
    names = list(BENCHMARKS) if name == "all" else [name]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r}; choose one of {sorted(BENCHMARKS)} or 'all'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for bench in names:
        module = importlib.import_module(BENCHMARKS[bench])
        results[bench] = module.run(quick, out_dir / bench)
        (out_dir / f"{bench}.json").write_text(json.dumps(results[bench], indent=2, default=str))
    return results
