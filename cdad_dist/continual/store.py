"""Basis store: the orthonormal bases U (d × k) of every protected layer after each task, as safetensors.

Each layer is stored in its smaller form: U itself when k ≤ d/2, else the orthonormal complement V (d × (d−k),
span(V) = span(U)⊥), which halves the store when the old tasks fill most of the input space (as they do in most
U-Net layers) and makes the update projection cheaper (ΔW·V·Vᵀ instead of ΔW − ΔW·U·Uᵀ, see ``projector``).

One file per task (``bases_task<t:03d>.safetensors``) holds the complete merged bases after that task, so the
latest file alone restores the memory. The metadata says per layer d, k (the rank of U, whichever form is
stored), γ, the task, and which layers hold complements (``complement``: a JSON list; absent in files written
before it existed, which hold U only); files are written to a temporary name and renamed (``os.replace``), so a
crash never leaves a half-written store. They are written one layer at a time (``basis_file``), so with layer
ownership rank 0 appends each basis as its owner sends it, and a store may hold only some layers' tensors while
knowing every layer's shape (``layout``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from cdad_dist.continual.basis_file import StreamedSafetensors, raw_bytes
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


class BasesDigest:
    """SHA-256 over names, shapes, dtypes and raw bytes, fed layer by layer in name order (so rank 0 can hash the
    bases as they stream past it, one layer in memory at a time)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, U: Tensor) -> None:
        U = U.detach().to("cpu")
        self._h.update(f"{name}|{tuple(U.shape)}|{U.dtype}|".encode())
        if U.numel():
            self._h.update(raw_bytes(U))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def bases_digest(bases: dict[str, Tensor]) -> str:
    """The ``BasesDigest`` of a whole set of bases (sorted by name)."""
    digest = BasesDigest()
    for name in sorted(bases):
        digest.update(name, bases[name])
    return digest.hexdigest()


@dataclass
class BasisStore:
    """Bases per protected layer plus what produced them.

    ``bases[name]`` is the stored CPU tensor: U (d × k) or, for names in ``complement``, V (d × (d − k)).
    Use ``basis(name)`` for U and ``rank(name)`` for k whatever the form.

    With layer ownership a rank *holds* only the tensors of the layers it owns (``bases``), while ``layout``
    describes every layer — (d, stored columns, bytes per element) — so ranks, sizes and the projection's work
    are known everywhere without the tensors. ``layout`` defaults to the held tensors' shapes (a complete store).
    """

    bases: dict[str, Tensor] = field(default_factory=dict)
    gamma: float = 0.999
    task: int = -1  # last task merged in; -1 = empty
    complement: set[str] = field(default_factory=set)
    layout: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.complement = set(self.complement)
        self.layout = {str(n): tuple(int(v) for v in entry) for n, entry in self.layout.items()}
        for name, U in self.bases.items():
            entry = (int(U.shape[0]), int(U.shape[1]), U.element_size())
            if self.layout.setdefault(name, entry)[:2] != entry[:2]:
                raise CheckpointError(f"BasisStore: layer {name!r} holds a {tuple(U.shape)} tensor, its layout says "
                                      f"{self.layout[name][:2]}")
        unknown = self.complement - set(self.layout)
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

    def names(self) -> list[str]:
        """Every layer of the store, held here or not (sorted)."""
        return sorted(self.layout)

    @property
    def complete(self) -> bool:
        """Whether this rank holds every layer's tensor."""
        return len(self.bases) == len(self.layout)

    def dim(self, name: str) -> int:
        return self.layout[name][0]

    def columns(self, name: str) -> int:
        """Width of the stored tensor (k for U, d − k for a complement V)."""
        return self.layout[name][1]

    def rank(self, name: str) -> int:
        """k: the dimension of the protected subspace span(U) of layer ``name``."""
        d, c = self.layout[name][:2]
        return d - c if name in self.complement else c

    def basis(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """U (d × k) of layer ``name`` (recomputed from V in float64 when the complement is stored)."""
        if name not in self.bases:
            raise CheckpointError(f"BasisStore: layer {name!r} is held by another rank (layer ownership)")
        stored = self.bases[name]
        U = orthogonal_complement(stored) if name in self.complement else stored
        return U.to(dtype or stored.dtype)

    def total_bytes(self) -> int:
        """Bytes of every layer's stored tensor (on all ranks together when layers are owned)."""
        return sum(d * c * size for d, c, size in self.layout.values())

    def held_bytes(self) -> int:
        """Bytes of the tensors this rank holds."""
        return sum(U.numel() * U.element_size() for U in self.bases.values())

    def relative_to(self, protected_weight_bytes: int) -> float:
        """Store size as a fraction of the protected weights' size (what it costs next to the model)."""
        return self.total_bytes() / protected_weight_bytes if protected_weight_bytes > 0 else float("nan")

    def _file_metadata(self, dtype: str) -> dict[str, str]:
        layers = {name: {"d": self.dim(name), "k": self.rank(name)} for name in self.layout}
        metadata = {"format": STORE_FORMAT, "task": str(self.task), "gamma": repr(self.gamma), "dtype": dtype,
                    "layers": json.dumps(layers, sort_keys=True)}
        if self.complement:
            metadata["complement"] = json.dumps(sorted(self.complement))
        return metadata

    def open_file(self, directory: str | os.PathLike, dtype: str = "float32") -> StreamedSafetensors:
        """A writer for ``bases_task<task>.safetensors`` in ``directory``, to be fed every layer in name order
        (``save`` does it from this store; with layer ownership rank 0 feeds it what the owners send)."""
        if self.task < 0:
            raise CheckpointError(f"BasisStore.save({directory}): the store is empty (no task merged yet)")
        torch_dtype = basis_dtype(dtype)
        entries = [(name, torch_dtype, (self.dim(name), self.columns(name))) for name in self.names()]
        return StreamedSafetensors(Path(directory) / task_file_name(self.task), entries, self._file_metadata(dtype))

    def save(self, directory: str | os.PathLike, dtype: str = "float32") -> Path:
        """Write ``bases_task<task>.safetensors`` atomically into ``directory``; returns its path."""
        if not self.complete:
            raise CheckpointError(f"BasisStore.save({directory}): this rank holds {len(self.bases)} of "
                                  f"{len(self.layout)} layers (layer ownership: write with the owners' help)")
        with self.open_file(directory, dtype) as writer:
            for name in self.names():
                writer.write(name, self.bases[name].to(basis_dtype(dtype)))
        return writer.path

    @staticmethod
    def read_layout(path: str | os.PathLike) -> dict[str, int]:
        """name → d of every layer of a store file, from its header (no tensor is read)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"basis store {path}: file not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                layers = json.loads((handle.metadata() or {})["layers"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"basis store {path}: unreadable header ({exc})") from exc
        return {str(name): int(meta["d"]) for name, meta in layers.items()}

    @classmethod
    def load(cls, path: str | os.PathLike, names=None) -> BasisStore:
        """Read a file written by ``save``; every inconsistency is a CheckpointError naming the file.
        ``names``: read only these layers' tensors (the others are known by shape: a store for one owner)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"basis store {path}: file not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
                wanted = set(shapes) if names is None else set(names) & set(shapes)
                tensors = {name: handle.get_tensor(name) for name in sorted(wanted)}
                itemsize = {name: handle.get_slice(name).get_dtype() for name in shapes}
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
        if set(layers) != set(shapes) or not complement <= set(layers):
            raise CheckpointError(f"basis store {path}: metadata layers {sorted(set(layers) ^ set(shapes))} / "
                                  f"complement {sorted(complement - set(layers))} do not match the stored tensors")
        for name, meta in layers.items():
            d, k = meta["d"], meta["k"]
            expected = (d, d - k) if name in complement else (d, k)
            if shapes[name] != expected:
                form = "complement V (d × (d−k))" if name in complement else "basis U (d × k)"
                raise CheckpointError(f"basis store {path}: layer {name!r} has shape {shapes[name]}, "
                                      f"metadata says d={d}, k={k} stored as {form}")
        sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
        layout = {name: (shape[0], shape[1], sizes.get(itemsize[name], 4)) for name, shape in shapes.items()}
        return cls(bases=tensors, gamma=gamma, task=task, complement=complement, layout=layout)

    @staticmethod
    def file_digest(path: str | os.PathLike) -> str:
        """``bases_digest`` of every tensor of a store file, read one layer at a time (a rank that loads only its
        own layers can still check the whole file against a checkpoint's digest)."""
        digest = BasesDigest()
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in sorted(handle.keys()):
                    digest.update(name, handle.get_tensor(name))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"basis store {path}: unreadable safetensors file ({exc})") from exc
        return digest.hexdigest()

    @staticmethod
    def latest(directory: str | os.PathLike) -> Path | None:
        """Path of the highest-numbered task file in ``directory`` (None if there is none)."""
        files = sorted(Path(directory).glob("bases_task*.safetensors"))
        return files[-1] if files else None
