"""A safetensors file written one tensor at a time, hashed while it is written.

Why not ``safetensors.torch.save_file``: it takes every tensor at once, so with layer ownership rank 0 would have
to gather all bases (GiBs at SD 1.5 scale) into its host memory just to write them. The format is simple and
fixed (8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte range, the raw
little-endian bytes in that order), so the shapes are written up front and each tensor is appended as it arrives
from its owner: rank 0 holds one layer at a time. Reading stays with the library (``safe_open`` / ``load_file``,
which validate the header), and the tests read every file written here back through it.

The file goes to a temporary name and is renamed when complete (``os.replace``), so a crash never leaves a
half-written file under the real name (fsync'd first, like ``atomic.write_text_atomic``); the SHA-256 of the bytes comes out of the write itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def raw_bytes(tensor: Tensor) -> memoryview:
    """A tensor's little-endian bytes in row-major order. flatten() first: a d × 1 column (e.g. from QR or eigh)
    may have strides that ``.view(torch.uint8)`` rejects although torch calls it contiguous."""
    return tensor.detach().to("cpu").flatten().contiguous().view(torch.uint8).numpy().data


class StreamedSafetensors:
    """``with StreamedSafetensors(path, [(name, dtype, shape), ...], metadata) as f: f.write(name, t)`` in order."""

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        self.path = Path(path)
        self._entries = list(entries)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata)}
        offset = 0
        for name, dtype, shape in self._entries:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}, not one of {list(SAFETENSORS_DTYPES)}")
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data start 8-byte aligned, as safetensors itself writes it
        self._prefix = struct.pack("<Q", len(text)) + text
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = None
        self._sha = hashlib.sha256()

    def __enter__(self) -> StreamedSafetensors:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._put(self._prefix)
        return self

    def _put(self, data) -> None:
        self._file.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor (the order of ``entries``; its dtype and shape must match)."""
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: tensor {name!r} written after the last declared one")
        want, dtype, shape = self._entries[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected tensor {want!r} {dtype} {tuple(shape)} next, got {name!r} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        if tensor.numel():
            self._put(raw_bytes(tensor))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:  # on disk before the rename, as atomic.write_text_atomic does
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                if self._next != len(self._entries):
                    missing = [e[0] for e in self._entries[self._next:]]
                    raise ValueError(f"{self.path}: {len(missing)} declared tensors never written, e.g. {missing[:3]}")
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
