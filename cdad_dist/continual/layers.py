"""Protected-layer discovery and parameter freezing.

A protected layer is an ``nn.Linear`` or ``nn.Conv2d`` chosen by glob patterns on its qualified name; its weight
is used as a matrix out × d with d = in·kh·kw (the layout of ``F.unfold``), the layout of its basis U (d × k).
"""
from __future__ import annotations

import logging

from torch import nn

from cdad_dist.continual.config import LayerPatterns  # noqa: F401  (re-exported)
from cdad_dist.errors import ConfigError

log = logging.getLogger(__name__)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.protected_modules()`` when the model has it (the CDAD model), else every Linear/Conv2d."""
    if hasattr(model, "protected_modules"):
        return dict(model.protected_modules())
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _inside_multihead_attention(model: nn.Module) -> set[str]:
    """Names of Linear children of nn.MultiheadAttention: its fused kernel bypasses their forward (no hooks)."""
    prefixes = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return {name for name, _ in model.named_modules() for p in prefixes if name.startswith(p + ".")}


def discover_protected(model: nn.Module, patterns: LayerPatterns) -> dict[str, nn.Module]:
    """Qualified name → module of every protected layer, in a deterministic (sorted) order.

    Grouped convolutions and Linear layers inside ``nn.MultiheadAttention`` are skipped with a warning: their
    weight is not one out × d map of a hookable input.
    """
    skipped_mha = _inside_multihead_attention(model)
    chosen: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in sorted(candidate_modules(model).items()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not patterns.matches(name):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            log.warning("continual: skipping grouped conv %s (groups=%d): not protectable", name, module.groups)
            continue
        if name in skipped_mha:
            log.warning("continual: skipping %s inside nn.MultiheadAttention: its forward hooks never fire", name)
            continue
        if id(module) in seen:  # a shared module is hooked (and protected) once
            continue
        seen.add(id(module))
        chosen[name] = module
    if not chosen:
        raise ConfigError(f"continual.layer_patterns (include={patterns.include}, exclude={patterns.exclude}) "
                          f"match no nn.Linear/nn.Conv2d of {type(model).__name__}")
    return chosen


def input_dim(module: nn.Module) -> int:
    """d: the column length of the layer's input blocks and the row count of its basis."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    raise ConfigError(f"continual: {type(module).__name__} is not a protectable layer (Linear/Conv2d)")


def protected_weight_bytes(layers: dict[str, nn.Module]) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in layers.values())


def freeze_unprotected(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Set requires_grad=False on every trainable parameter that is not a protected weight; returns their names.

    Freezing (rather than zeroing gradients) keeps them out of the optimizer, so weight decay cannot move them.
    """
    protected = {id(m.weight) for m in layers.values()}
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in protected:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
