"""Basis store: the orthonormal bases U (d × k) of every protected layer after each task, as safetensors.

One file per task (``bases_task<t:03d>.safetensors``) holds the complete merged bases after that task, so the
latest file alone restores the memory. The metadata says per layer d, k, γ and the task; files are written to a
temporary name and renamed (``os.replace``), so a crash never leaves a half-written store.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from cdad_dist.errors import CheckpointError, ConfigError

STORE_FORMAT = "cdad-bases/1"
BASIS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def basis_dtype(name: str) -> torch.dtype:
    """Map the config string ``continual.basis_dtype`` to a torch dtype."""
    if name not in BASIS_DTYPES:
        raise ConfigError(f"continual.basis_dtype must be one of {sorted(BASIS_DTYPES)}, got {name!r}")
    return BASIS_DTYPES[name]


def task_file_name(task: int) -> str:
    return f"bases_task{task:03d}.safetensors"


@dataclass
class BasisStore:
    """Bases per protected layer (qualified name → CPU tensor d × k) plus what produced them."""

    bases: dict[str, Tensor] = field(default_factory=dict)
    gamma: float = 0.999
    task: int = -1  # last task merged in; -1 = empty

    def total_bytes(self) -> int:
        return sum(U.numel() * U.element_size() for U in self.bases.values())

    def relative_to(self, protected_weight_bytes: int) -> float:
        """Store size as a fraction of the protected weights' size (what it costs next to the model)."""
        return self.total_bytes() / protected_weight_bytes if protected_weight_bytes > 0 else float("nan")

    def save(self, directory: str | os.PathLike, dtype: str = "float32") -> Path:
        """Write ``bases_task<task>.safetensors`` atomically into ``directory``; returns its path."""
        if self.task < 0:
            raise CheckpointError(f"BasisStore.save({directory}): the store is empty (no task merged yet)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / task_file_name(self.task)
        torch_dtype = basis_dtype(dtype)
        tensors = {name: U.detach().to("cpu", torch_dtype).contiguous() for name, U in self.bases.items()}
        layers = {name: {"d": int(U.shape[0]), "k": int(U.shape[1])} for name, U in self.bases.items()}
        metadata = {"format": STORE_FORMAT, "task": str(self.task), "gamma": repr(self.gamma), "dtype": dtype,
                    "layers": json.dumps(layers, sort_keys=True)}
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> BasisStore:
        """Read a file written by ``save``; every inconsistency is a CheckpointError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"basis store {path}: file not found")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"basis store {path}: unreadable safetensors file ({exc})") from exc
        if metadata.get("format") != STORE_FORMAT:
            raise CheckpointError(f"basis store {path}: metadata 'format' is {metadata.get('format')!r}, "
                                  f"expected {STORE_FORMAT!r}")
        try:
            layers = json.loads(metadata["layers"])
            task, gamma = int(metadata["task"]), float(metadata["gamma"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"basis store {path}: bad metadata ({exc})") from exc
        if set(layers) != set(tensors):
            raise CheckpointError(f"basis store {path}: metadata layers {sorted(set(layers) ^ set(tensors))} "
                                  "do not match the stored tensors")
        for name, meta in layers.items():
            if tuple(tensors[name].shape) != (meta["d"], meta["k"]):
                raise CheckpointError(f"basis store {path}: layer {name!r} has shape {tuple(tensors[name].shape)}, "
                                      f"metadata says d={meta['d']}, k={meta['k']}")
        return cls(bases=dict(tensors), gamma=gamma, task=task)

    @staticmethod
    def latest(directory: str | os.PathLike) -> Path | None:
        """Path of the highest-numbered task file in ``directory`` (None if there is none)."""
        files = sorted(Path(directory).glob("bases_task*.safetensors"))
        return files[-1] if files else None
