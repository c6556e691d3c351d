"""Basis store: the orthonormal bases U (d × k) of every protected layer after each task, as safetensors.

Each layer is stored in its smaller form: U itself when k ≤ d/2, else the orthonormal complement V (d × (d−k),
span(V) = span(U)⊥), which halves the store when the old tasks fill most of the input space (as they do in most
U-Net layers) and makes the update projection cheaper (ΔW·V·Vᵀ instead of ΔW − ΔW·U·Uᵀ, see ``projector``).

One file per task (``bases_task<t:03d>.safetensors``) holds the complete merged bases after that task, so the
latest file alone restores the memory. The metadata says per layer d, k (the rank of U, whichever form is
stored), γ, the task, and which layers hold complements (``complement``: a JSON list; absent in files written
before it existed, which hold U only); files are written to a temporary name and renamed (``os.replace``), so a
crash never leaves a half-written store.
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


def orthogonal_complement(M: Tensor) -> Tensor:
    """Orthonormal basis (float64, d × (d − c)) of span(M)⊥ for M (d × c) with orthonormal columns.

    Computed from a complete Householder QR in float64, so it is orthogonal to span(M) to float64 round-off even
    when M is orthonormal only to float32 accuracy.
    """
    d, c = M.shape
    if c == 0:
        return torch.eye(d, dtype=torch.float64, device=M.device)
    Q, _ = torch.linalg.qr(M.detach().to(torch.float64), mode="complete")
    return Q[:, c:].contiguous()


def compact_form(U: Tensor) -> tuple[Tensor, bool]:
    """(U, False) when k ≤ d/2, else (its complement V in float64, True): whichever has fewer columns."""
    d, k = U.shape
    if 2 * k <= d:
        return U, False
    return orthogonal_complement(U), True


@dataclass
class BasisStore:
    """Bases per protected layer plus what produced them.

    ``bases[name]`` is the stored CPU tensor: U (d × k) or, for names in ``complement``, V (d × (d − k)).
    Use ``basis(name)`` for U and ``rank(name)`` for k whatever the form.
    """

    bases: dict[str, Tensor] = field(default_factory=dict)
    gamma: float = 0.999
    task: int = -1  # last task merged in; -1 = empty
    complement: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.complement = set(self.complement)
        unknown = self.complement - set(self.bases)
        if unknown:
            raise CheckpointError(f"BasisStore: complement layers {sorted(unknown)[:5]} have no stored tensor")

    @classmethod
    def from_bases(cls, bases: dict[str, Tensor], gamma: float = 0.999, task: int = -1,
                   dtype: torch.dtype | None = None) -> BasisStore:
        """A store of orthonormal bases U, each kept in its smaller form (cast to ``dtype`` if given)."""
        stored, complement = {}, set()
        for name, U in bases.items():
            tensor, is_complement = compact_form(U)
            stored[name] = tensor.to(dtype or U.dtype).contiguous()
            if is_complement:
                complement.add(name)
        return cls(bases=stored, gamma=gamma, task=task, complement=complement)

    def dim(self, name: str) -> int:
        return int(self.bases[name].shape[0])

    def rank(self, name: str) -> int:
        """k: the dimension of the protected subspace span(U) of layer ``name``."""
        stored = self.bases[name]
        return int(stored.shape[0] - stored.shape[1]) if name in self.complement else int(stored.shape[1])

    def basis(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """U (d × k) of layer ``name`` (recomputed from V in float64 when the complement is stored)."""
        stored = self.bases[name]
        U = orthogonal_complement(stored) if name in self.complement else stored
        return U.to(dtype or stored.dtype)

    def projection_factors(self) -> dict[str, tuple[Tensor, bool]]:
        """name → (stored tensor, is_complement): what ``Projector`` needs, without materialising U."""
        return {name: (U, name in self.complement) for name, U in self.bases.items()}

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
        layers = {name: {"d": self.dim(name), "k": self.rank(name)} for name in self.bases}
        metadata = {"format": STORE_FORMAT, "task": str(self.task), "gamma": repr(self.gamma), "dtype": dtype,
                    "layers": json.dumps(layers, sort_keys=True)}
        if self.complement:
            metadata["complement"] = json.dumps(sorted(self.complement))
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
            complement = set(json.loads(metadata.get("complement", "[]")))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"basis store {path}: bad metadata ({exc})") from exc
        if set(layers) != set(tensors) or not complement <= set(layers):
            raise CheckpointError(f"basis store {path}: metadata layers {sorted(set(layers) ^ set(tensors))} / "
                                  f"complement {sorted(complement - set(layers))} do not match the stored tensors")
        for name, meta in layers.items():
            d, k = meta["d"], meta["k"]
            expected = (d, d - k) if name in complement else (d, k)
            if tuple(tensors[name].shape) != expected:
                form = "complement V (d × (d−k))" if name in complement else "basis U (d × k)"
                raise CheckpointError(f"basis store {path}: layer {name!r} has shape {tuple(tensors[name].shape)}, "
                                      f"metadata says d={d}, k={k} stored as {form}")
        return cls(bases=dict(tensors), gamma=gamma, task=task, complement=complement)

    @staticmethod
    def latest(directory: str | os.PathLike) -> Path | None:
        """Path of the highest-numbered task file in ``directory`` (None if there is none)."""
        files = sorted(Path(directory).glob("bases_task*.safetensors"))
        return files[-1] if files else None
