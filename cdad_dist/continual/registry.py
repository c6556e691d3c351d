"""Registries of the continual core's extension points: name -> "module:attribute", imported on first use.

Torch-free on purpose: the run config validates ``continual.strategy`` and ``continual.sketch`` against these
names when it loads (before any model, data or process group exists), and the engine builds a strategy by name
without knowing any. Adding a strategy or a sketch is one file plus one line here (docs/contracts.md).
"""
from __future__ import annotations

import importlib
from typing import Any

from cdad_dist.errors import ConfigError

STRATEGY_REGISTRY: dict[str, str] = {
    "naive": "cdad_dist.continual.baselines:NaiveStrategy",
    "joint": "cdad_dist.continual.baselines:JointStrategy",
    "cdad": "cdad_dist.continual.strategy:CDADStrategy",
    "knn": "cdad_dist.continual.knn:KnnStrategy",
    "replay": "cdad_dist.continual.replay:ReplayStrategy",
    "cdad+replay": "cdad_dist.continual.replay:CDADReplayStrategy",
}

# Sketch kinds a layer can get; "auto" is not a kind but the cost model's choice among them (sketch_cost.py).
SKETCH_REGISTRY: dict[str, str] = {
    "gram": "cdad_dist.continual.sketches:GramSketch",
    "isvd": "cdad_dist.continual.sketches:IsvdSketch",
    "isvd_paper": "cdad_dist.continual.sketches:IsvdPaperSketch",
}


def resolve(registry: dict[str, str], name: str, what: str) -> Any:
    """The registered attribute for ``name`` (a clear error for unknown names)."""
    if name not in registry:
        raise ConfigError(f"{what} must be one of {sorted(registry)}, got {name!r}")
    module, _, attribute = registry[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
