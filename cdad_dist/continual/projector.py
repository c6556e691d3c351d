"""Keep every update of a protected weight orthogonal to its old tasks' input space span(U).

Weight W (out × d, a conv viewed as out × in·kh·kw), basis U (d × k, orthonormal). Two modes:

- ``update`` (default): after each optimizer step the change of W since an anchor taken at the first step of the
  task is projected, ΔW ← ΔW − (ΔW·U)·Uᵀ, and W = W_anchor + ΔW. Whatever the optimizer did (AdamW's
  per-coordinate scaling, decoupled weight decay, momentum), old inputs X_old ∈ span(U) see W·X_old unchanged.
  Projecting the change since the anchor (not since the last step) also keeps float32 round-off from accumulating.
- ``grad`` (paper): each gradient is projected by a hook on the parameter (``param.register_hook``), before any
  optimizer or DDP/DeepSpeed reduction sees it; the projection is linear, so it commutes with averaging and
  accumulation. The guarantee then holds for plain SGD only: Adam(W)'s element-wise normalisation and weight decay
  move W inside span(U) again.

U·Uᵀ (d × d) is never formed: two thin products cost O(out·d·k). U is kept in float32 on the weight's device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cdad_dist.continual.layers import input_dim
from cdad_dist.errors import ConfigError

PROJECT_MODES = ("update", "grad")


def project_rows(matrix: Tensor, U: Tensor) -> Tensor:
    """M − (M·U)·Uᵀ for M (out × d), without forming U·Uᵀ."""
    return matrix - (matrix @ U) @ U.mT


class Projector:
    """Projection of the protected weights of one model (the unwrapped module) for one task."""

    def __init__(self, layers: dict[str, nn.Module], bases: dict[str, Tensor], mode: str = "update") -> None:
        if mode not in PROJECT_MODES:
            raise ConfigError(f"continual.project must be one of {PROJECT_MODES}, got {mode!r}")
        self.mode = mode
        self._targets: dict[str, tuple[nn.Parameter, Tensor]] = {}
        for name, module in layers.items():
            U = bases.get(name)
            if U is None or U.shape[1] == 0:
                continue
            if U.shape[0] != input_dim(module):
                raise ConfigError(f"basis of layer {name!r} has d={U.shape[0]}, the layer's input dim is "
                                  f"{input_dim(module)} (model and basis store do not match)")
            self._targets[name] = (module.weight, U.detach())
        self._anchor: dict[str, Tensor] | None = None
        self._hooks: list = []

    @property
    def names(self) -> list[str]:
        return list(self._targets)

    def _basis(self, name: str, device: torch.device) -> Tensor:
        """U in float32 on ``device``; moved once (the engine may move the model after the strategy saw it)."""
        weight, U = self._targets[name]
        if U.device != device or U.dtype != torch.float32:
            U = U.to(device=device, dtype=torch.float32).contiguous()
            self._targets[name] = (weight, U)
        return U

    # -- update mode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def anchor(self) -> None:
        """Remember the weights the task's projected change is measured from (once per task)."""
        if self._anchor is None:
            self._anchor = {name: w.detach().clone() for name, (w, _) in self._targets.items()}

    @torch.no_grad()
    def project_update(self) -> None:
        """W ← W_anchor + P⊥(W − W_anchor) for every protected weight."""
        if self._anchor is None:
            raise RuntimeError("Projector.project_update called before anchor(): call before_optimizer_step first")
        for name, (weight, _) in self._targets.items():
            start = self._anchor[name]
            U = self._basis(name, weight.device)
            delta = (weight - start).reshape(weight.shape[0], -1).float()
            projected = start.float() + project_rows(delta, U).reshape(weight.shape)
            weight.copy_(projected)

    # -- grad mode -----------------------------------------------------------------------------------------------
    def install_grad_hooks(self) -> None:
        if self._hooks:
            return
        for name, (weight, _) in self._targets.items():
            self._hooks.append(weight.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            U = self._basis(name, grad.device)
            projected = project_rows(grad.reshape(grad.shape[0], -1).float(), U)
            return projected.reshape(grad.shape).to(grad.dtype)
        return hook

    def remove(self) -> None:
        """Remove gradient hooks and forget the anchor (end of the task)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._anchor = None

    # -- diagnostics ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def leak_ratios(self, reference: dict[str, Tensor]) -> dict[str, float]:
        """‖ΔW·U‖_F / ‖ΔW‖_F per layer with ΔW = W − reference[name] (0 when ΔW = 0)."""
        ratios = {}
        for name, (weight, _) in self._targets.items():
            delta = (weight - reference[name].to(weight.device)).reshape(weight.shape[0], -1).double()
            norm = float(delta.norm())
            U = self._basis(name, weight.device).double()
            ratios[name] = float((delta @ U).norm()) / norm if norm > 0 else 0.0
        return ratios
