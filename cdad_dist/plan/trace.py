"""Counting what a piece of model code allocates and computes, on the meta device (plan) or for real (benchmark).

`TensorBytes` is a dispatch mode that sees every tensor an op returns and keeps the bytes of the storages still
alive (each storage once, freed when its last tensor is collected), and their peak. On the meta device it gives
the activation peak of a forward / backward without memory or compute; on a CPU run it measures the same thing
for real. PyTorch has no CPU allocator statistics (`torch.cuda.max_memory_allocated` is CUDA-only), which is why
this is written here. FLOPs come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (it counts
matmuls, convolutions and SDPA, forward and backward; a MAC is two of its FLOPs).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    # Meta storages have no address: each is its own object, identified by id (kept alive by the tensor).
    return ("meta", id(storage)) if t.device.type == "meta" else (t.device.type, storage.data_ptr())


class TensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensors created under it (plus `baseline` bytes already held)."""

    def __init__(self, baseline: int = 0) -> None:
        super().__init__()
        self.baseline = int(baseline)
        self.live = 0
        self.peak = 0
        self._sizes: dict[tuple, int] = {}

    def _forget(self, key: tuple) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in self._sizes:
            return
        nbytes = int(t.untyped_storage().nbytes())
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t.untyped_storage(), self._forget, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_sparse:
                self._track(value)
        return out

    @property
    def peak_bytes(self) -> int:
        return self.baseline + self.peak


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t is not None:
            seen[_storage_key(t)] = int(t.untyped_storage().nbytes())
    return sum(seen.values())


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False)
