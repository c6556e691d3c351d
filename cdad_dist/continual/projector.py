"""Keep every update of a protected weight orthogonal to its old tasks' input space span(U).

Weight W (out × d, a conv viewed as out × in·kh·kw), basis U (d × k, orthonormal). Each layer comes in the
store's smaller form: U itself (k ≤ d/2) or its orthonormal complement V (d × (d−k), k > d/2); with
P⊥ = I − U·Uᵀ = V·Vᵀ the projection of a change M is M − (M·U)·Uᵀ or (M·V)·Vᵀ, whichever is thinner, so a step
costs O(out·d·min(k, d−k)). U·Uᵀ (d × d) is never formed. Layers with k = 0 need no work; layers with k = d
cannot move at all, so their weight is frozen (requires_grad=False while the projector is installed: no gradient,
no optimizer state, no per-step work). Two modes:

- ``update`` (default): after each optimizer step the change of W since an anchor taken at the first step of the
  task is projected, W = W_anchor + P⊥(W − W_anchor). Whatever the optimizer did (AdamW's per-coordinate scaling,
  decoupled weight decay, momentum), old inputs X_old ∈ span(U) see W·X_old unchanged. Projecting the change
  since the anchor (not since the last step) also keeps float32 round-off from accumulating.
- ``grad`` (paper): each gradient is projected by a hook on the parameter (``param.register_hook``), before any
  optimizer or DDP/DeepSpeed reduction sees it; the projection is linear, so it commutes with averaging and
  accumulation. The guarantee then holds for plain SGD only: Adam(W)'s element-wise normalisation and weight decay
  move W inside span(U) again.

Under DeepSpeed ZeRO-1/2 (``deepspeed_master=True``) the optimizer owns fp32 master weights, partitioned over
ranks, and copies them into the module after every step, so projecting only the module's weight would be undone
at the next step. There the update mode reads the full fp32 weight (the module's own when it is fp32, which ZeRO
gathers whole after each step; otherwise ``safe_get_full_fp32_param``), projects it identically on every rank, and
writes it both into the module and into this rank's fp32 master fragment (``safe_set_full_fp32_param``).

With layer ownership (``owners``, several ranks, update mode) each rank anchors and projects only the layers it
owns (``ownership.projection_ownership``: balanced by the per-step multiply-adds), then every owner broadcasts its
projected weights (bucketed flat buffers, in the weights' own dtype) so all ranks hold the owners' bytes:
bit-identical weights, per-rank projection work and anchor memory ≈ 1/world. Under DeepSpeed every rank still
takes part in each layer's full-fp32 gather, receives the owner's projected fp32 weight and writes its own master
fragment. A mid-task checkpoint's anchors are collected on rank 0 (``anchor_state``, called on every rank).

Factors are kept in float32 on the weight's device; the per-step work of a float32 weight is one subtraction and
two matrix products into two scratch buffers shared by all layers, the last one writing the weight in place (no
allocation per step).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdad_dist.continual.layers import input_dim
from cdad_dist.errors import ConfigError

PROJECT_MODES = ("update", "grad")


def project_rows(matrix: Tensor, U: Tensor) -> Tensor:
    """M − (M·U)·Uᵀ for M (out × d), without forming U·Uᵀ."""
    return matrix - (matrix @ U) @ U.mT


def project_rows_complement(matrix: Tensor, V: Tensor) -> Tensor:
    """(M·V)·Vᵀ for M (out × d): the same projection given the complement V of U."""
    return (matrix @ V) @ V.mT


@dataclass
class _Target:
    """One projected layer: its weight, its factor (U or V, float32) and the task's anchor terms."""

    weight: nn.Parameter
    factor: Tensor
    complement: bool
    anchor: Tensor | None = None  # W at the task's first step (out × d, float32)

    def anchor_shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.factor.shape[0])

    def project(self, matrix: Tensor) -> Tensor:
        if self.complement:
            return project_rows_complement(matrix, self.factor)
        return project_rows(matrix, self.factor)


class Projector:
    """Projection of the protected weights of one model (the unwrapped module) for one task.

    ``bases`` maps layer names to the stored tensor: U, or V for names in ``complement`` (see ``BasisStore``).
    With ownership, layers another rank projects may come as meta-device tensors: only their shape is used.
    """

    def __init__(self, layers: dict[str, nn.Module], bases: dict[str, Tensor], mode: str = "update",
                 complement: Collection[str] = (), deepspeed_master: bool = False,
                 owners: dict[str, int] | None = None, rank: int = 0, world: int = 1) -> None:
        if mode not in PROJECT_MODES:
            raise ConfigError(f"continual.project must be one of {PROJECT_MODES}, got {mode!r}")
        if owners is not None and mode != "update":
            raise ConfigError("projector: layer ownership applies to the update mode only (grad mode projects each "
                              "rank's gradient before the reduction)")
        self.mode = mode
        self.deepspeed_master = deepspeed_master
        self.owners = owners if (owners is not None and world > 1) else None
        self.rank, self.world = rank, world
        self._targets: dict[str, _Target] = {}
        self._saturated: dict[str, nn.Parameter] = {}  # k = d: frozen instead of projected
        self._frozen: list[nn.Parameter] = []
        complement = set(complement)
        for name, module in layers.items():
            stored = bases.get(name)
            if stored is None:
                continue
            if stored.shape[0] != input_dim(module):
                raise ConfigError(f"basis of layer {name!r} has d={stored.shape[0]}, the layer's input dim is "
                                  f"{input_dim(module)} (model and basis store do not match)")
            is_complement = name in complement
            if stored.shape[1] == 0:
                if is_complement:  # V empty: k = d, the old tasks use the whole input space
                    self._saturated[name] = module.weight
                continue  # U empty: nothing to protect
            self._targets[name] = _Target(module.weight, stored.detach(), is_complement)
        self._anchored = False
        self._scratch: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._hooks: list = []

    @property
    def names(self) -> list[str]:
        """Layers projected each step (not the frozen ones)."""
        return list(self._targets)

    def owns(self, name: str) -> bool:
        """Whether this rank anchors and projects the layer (every layer without ownership)."""
        return self.owners is None or self.owners[name] == self.rank

    def step_macs(self) -> float:
        """Multiply-adds this rank spends per projection step (2·out·d·columns per owned layer)."""
        return sum(2.0 * t.weight.shape[0] * t.factor.numel() for n, t in self._targets.items() if self.owns(n))

    @property
    def saturated(self) -> list[str]:
        """Layers with k = d: frozen by ``freeze_saturated``."""
        return list(self._saturated)

    def freeze_saturated(self) -> list[str]:
        """requires_grad=False on the weights of k = d layers (call before the optimizer is built); undone by
        ``remove``. Returns the layer names."""
        for weight in self._saturated.values():
            if weight.requires_grad:
                weight.requires_grad_(False)
                self._frozen.append(weight)
        return self.saturated

    def _factor(self, target: _Target, device: torch.device) -> Tensor:
        """The factor in float32 on ``device``; moved once (the engine may move the model after the strategy saw
        it)."""
        if target.factor.device != device or target.factor.dtype != torch.float32:
            target.factor = target.factor.to(device=device, dtype=torch.float32).contiguous()
        return target.factor

    # -- update mode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def anchor(self) -> None:
        """Remember the weights the task's projected change is measured from (once per task), and allocate the
        two scratch buffers every layer's step reuses."""
        if self._anchored:
            return
        anchors = {}
        for name, target in self._targets.items():
            if self.owns(name):
                anchors[name] = self._full_fp32(target.weight)
            elif self.deepspeed_master:
                self._full_fp32(target.weight)  # a collective under ZeRO: every rank takes part
        self.restore_anchor(anchors)

    def anchor_state(self) -> dict[str, Tensor]:
        """The task's anchors (CPU copies) for a mid-task checkpoint: a resumed run must measure the projected change
        from the same weights as the uninterrupted one, or the result differs in the last bits. With ownership all
        ranks must call this: the owners send their anchors to rank 0, which returns all of them (others: {})."""
        if self.owners is None:
            return {name: t.anchor.detach().cpu().clone() for name, t in self._targets.items() if t.anchor is not None}
        import torch.distributed as dist

        state = {}
        if not self._anchored:
            return state
        for name in sorted(self._targets):
            target, owner = self._targets[name], self.owners[name]
            if self.rank == owner:
                if owner == 0:
                    state[name] = target.anchor.detach().cpu().clone()
                else:
                    dist.send(target.anchor.contiguous(), dst=0)
            elif self.rank == 0:
                buf = torch.empty(target.anchor_shape(), dtype=torch.float32, device=target.weight.device)
                dist.recv(buf, src=owner)
                state[name] = buf.cpu()
        return state

    @torch.no_grad()
    def restore_anchor(self, anchors: dict[str, Tensor]) -> None:
        """Set the anchors (from ``anchor`` or a checkpoint's ``anchor_state``) and allocate the step buffers."""
        missing = sorted(n for n in self._targets if self.owns(n) and n not in anchors)
        if missing:
            raise ConfigError(f"projector anchors missing for layers {missing[:5]}")
        for name, target in self._targets.items():
            if not self.owns(name):
                target.anchor = None  # another rank anchors and projects it
                continue
            weight = target.weight
            self._factor(target, weight.device)
            anchor = anchors[name].to(device=weight.device, dtype=torch.float32).reshape(weight.shape[0], -1)
            if anchor.shape[1] != target.factor.shape[0]:
                raise ConfigError(f"projector anchor of layer {name!r} has shape {tuple(anchor.shape)}, the layer's "
                                  f"weight is {tuple(weight.shape)}")
            target.anchor = anchor.clone()
        sizes: dict[torch.device, tuple[int, int]] = {}  # per device: largest Δ (out·d) and Δ·F (out·columns)
        for target in self._targets.values():
            if target.anchor is None:
                continue
            out, columns = target.anchor.shape[0], target.factor.shape[1]
            n_delta, n_coef = sizes.get(target.anchor.device, (0, 0))
            sizes[target.anchor.device] = (max(n_delta, target.anchor.numel()), max(n_coef, out * columns))
        self._scratch = {device: (torch.empty(n_delta, device=device), torch.empty(n_coef, device=device))
                         for device, (n_delta, n_coef) in sizes.items()}
        self._anchored = True

    @torch.no_grad()
    def project_update(self) -> None:
        """W ← W_anchor + P⊥(W − W_anchor) for every projected weight, in place.

        With Δ = W − W_anchor: thin U: W ← W − (Δ·U)·Uᵀ; thin V: W ← W_anchor + (Δ·V)·Vᵀ. Forming Δ first (rather
        than W·U − W_anchor·U) keeps the round-off relative to ‖Δ‖, not ‖W‖.
        """
        if not self._anchored:
            raise RuntimeError("Projector.project_update called before anchor(): call before_optimizer_step first")
        for name, target in self._targets.items():
            weight = target.weight
            if self.deepspeed_master:
                W = self._full_fp32(weight).reshape(weight.shape[0], -1)  # a collective: every rank, every layer
                if self.owns(name):
                    self._project_inplace(target, W, self._factor(target, weight.device))
                if self.owners is not None:
                    torch.distributed.broadcast(W, src=self.owners[name])
                _write_deepspeed_weight(weight, W.reshape(weight.shape))
                continue
            if not self.owns(name):
                continue
            F = self._factor(target, weight.device)
            if weight.dtype == torch.float32 and weight.is_contiguous():
                W = weight.view(weight.shape[0], -1)  # aliases the parameter: updated in place
                self._project_inplace(target, W, F)
            else:  # e.g. half-precision or channels-last weights: compute on a float32 copy, copy back
                W = weight.detach().reshape(weight.shape[0], -1).to(torch.float32, copy=True)
                self._project_inplace(target, W, F)
                weight.copy_(W.reshape(weight.shape))
        if self.owners is not None and not self.deepspeed_master:
            self._share_projected()

    def _share_projected(self, bucket_elements: int = 1 << 26) -> None:
        """Every owner broadcasts its projected weights, in flat buckets of one dtype (≤ 256 MiB of fp32)."""
        import torch.distributed as dist

        for owner in range(self.world):
            weights = [self._targets[n].weight for n in sorted(self._targets) if self.owners[n] == owner]
            for dtype in sorted({w.dtype for w in weights}, key=str):
                bucket: list[nn.Parameter] = []
                size = 0
                for w in [w for w in weights if w.dtype == dtype] + [None]:
                    if w is None or (bucket and size + w.numel() > bucket_elements):
                        flat = torch.cat([b.detach().reshape(-1) for b in bucket])
                        dist.broadcast(flat, src=owner)
                        if self.rank != owner:
                            offset = 0
                            for b in bucket:
                                b.data.copy_(flat[offset: offset + b.numel()].view_as(b))
                                offset += b.numel()
                        bucket, size = [], 0
                    if w is not None:
                        bucket.append(w)
                        size += w.numel()

    def _full_fp32(self, weight: nn.Parameter) -> Tensor:
        """A float32 copy of the whole weight: under DeepSpeed the optimizer's master copy, gathered."""
        if self.deepspeed_master and weight.dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param  # all ranks call this together (all-reduce)

            full = safe_get_full_fp32_param(weight)
            if full is not None:
                return full.detach().to(torch.float32, copy=True)
        return weight.detach().to(torch.float32, copy=True)

    def _project_inplace(self, target: _Target, W: Tensor, F: Tensor) -> None:
        delta_buf, coef_buf = self._scratch[W.device]
        start = target.anchor
        delta = delta_buf[: start.numel()].view(start.shape)
        coef = coef_buf[: start.shape[0] * F.shape[1]].view(start.shape[0], F.shape[1])
        torch.sub(W, start, out=delta)
        torch.mm(delta, F, out=coef)
        if target.complement:
            torch.addmm(start, coef, F.mT, out=W)
        else:
            W.addmm_(coef, F.mT, alpha=-1.0)

    # -- grad mode -----------------------------------------------------------------------------------------------
    def install_grad_hooks(self) -> None:
        if self._hooks:
            return
        for target in self._targets.values():
            if target.weight.requires_grad:
                self._hooks.append(target.weight.register_hook(self._grad_hook(target)))

    def _grad_hook(self, target: _Target) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            self._factor(target, grad.device)
            projected = target.project(grad.reshape(grad.shape[0], -1).float())
            return projected.reshape(grad.shape).to(grad.dtype)
        return hook

    def remove(self) -> None:
        """Remove gradient hooks, forget the anchor and unfreeze the k = d weights (end of the task)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for target in self._targets.values():
            target.anchor = None
        self._scratch = {}
        self._anchored = False
        for weight in self._frozen:
            weight.requires_grad_(True)
        self._frozen.clear()

    # -- diagnostics ---------------------------------------------------------------------------------------------
    def anchor_bytes(self) -> int:
        """Memory held for the task's anchor terms and step buffers (0 before ``anchor``)."""
        anchors = sum(t.anchor.numel() * 4 for t in self._targets.values() if t.anchor is not None)
        return anchors + sum(b.numel() * b.element_size() for bufs in self._scratch.values() for b in bufs)

    @torch.no_grad()
    def leak_ratios(self, reference: dict[str, Tensor]) -> dict[str, float]:
        """‖ΔW·U‖_F / ‖ΔW‖_F per layer with ΔW = W − reference[name] (0 when ΔW = 0)."""
        ratios = {}
        for name, target in self._targets.items():
            if target.factor.is_meta:  # projected by another rank, whose factor this rank never received
                continue
            weight = target.weight
            delta = (weight - reference[name].to(weight.device)).reshape(weight.shape[0], -1).double()
            norm = float(delta.norm())
            F = target.factor.to(weight.device, torch.float64)
            inside = delta - project_rows_complement(delta, F) if target.complement else delta @ F
            ratios[name] = float(inside.norm()) / norm if norm > 0 else 0.0
        return ratios


@torch.no_grad()
def _write_deepspeed_weight(weight: nn.Parameter, value: Tensor) -> None:
    """Write a projected full weight into the module and into this rank's fp32 master fragment (ZeRO-1/2)."""
    from deepspeed.utils import safe_set_full_fp32_param

    weight.data.copy_(value.to(weight.dtype))
    safe_set_full_fp32_param(weight, value)
