"""Bases held on their layers' owners: where each one lives, and moving it, one layer at a time, to who needs it.

With layer ownership and a run directory, a rank keeps only the bases of the layers it captured and decomposed
(their *home*: the capture owner, ``ownership.capture_ownership_of_dims``); the task's file under the run directory holds all of them. Three moves are needed:

- ``stream_to_root``: rank 0 receives every layer in name order, to hash it and append it to the task file
  (``basis_file.StreamedSafetensors``), holding one layer at a time;
- ``factors_for``: at a task's start, each layer's stored tensor goes from its home to the rank that projects it
  (update mode: the projection owner, point to point) or to every rank (grad mode, where each rank projects its
  own gradient before the reduction); the other ranks get a meta-device placeholder of the right shape, so the
  projector knows every layer's width without the bytes;
- loading a checkpoint: every rank verifies the file and reads only its home layers (``BasisStore.load(names=)``).

Sends and receives follow the sorted layer names on every rank, so they always pair up.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from cdad_dist.continual.reducer import comm_device, dist_info
from cdad_dist.continual.store import BasisStore


def _owner_of(homes: Mapping[str, int] | None, name: str) -> int:
    return 0 if homes is None else int(homes[name])


def stream_to_root(store: BasisStore, homes: Mapping[str, int] | None, dtype: torch.dtype,
                   consume: Callable[[str, Tensor], None]) -> None:
    """Call ``consume(name, tensor)`` on rank 0 for every layer of ``store`` in name order (CPU tensors in
    ``dtype``); the layer's home sends it when that is not rank 0. Every rank must call this."""
    rank, world = dist_info()
    device = comm_device() if world > 1 else torch.device("cpu")
    for name in store.names():
        home = _owner_of(homes, name)
        shape = (store.dim(name), store.columns(name))
        if rank == 0:
            if home == 0:
                tensor = store.bases[name].to("cpu", dtype)
            else:
                buf = torch.empty(shape, dtype=dtype, device=device)
                if buf.numel():
                    dist.recv(buf, src=home)
                tensor = buf.cpu()
            consume(name, tensor)
        elif rank == home and shape[0] * shape[1]:
            dist.send(store.bases[name].to(device, dtype).contiguous(), dst=0)


def factors_for(store: BasisStore, homes: Mapping[str, int], users: Mapping[str, int] | None,
                dtype: torch.dtype) -> dict[str, Tensor]:
    """Each layer's stored tensor (U or V) where it is used: ``users[name]`` is the rank that projects the layer
    (None: every rank). Layers this rank does not project get a meta placeholder of the same shape; layers with
    no columns an empty tensor. Every rank must call this."""
    rank, world = dist_info()
    device = comm_device() if world > 1 else torch.device("cpu")
    factors: dict[str, Tensor] = {}
    for name in store.names():
        home = int(homes[name])
        shape = (store.dim(name), store.columns(name))
        if shape[1] == 0:
            factors[name] = torch.empty(shape, dtype=dtype)
            continue
        if users is None:
            buf = store.bases[name].to(device, dtype).contiguous() if rank == home else torch.empty(
                shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=home)
            factors[name] = buf.cpu()
            continue
        user = users.get(name)
        if user is None:  # not projected (not a layer of this model): nobody needs the bytes
            factors[name] = torch.empty(shape, dtype=dtype, device="meta")
        elif rank == user:
            if home == user:
                factors[name] = store.bases[name].to("cpu", dtype)
            else:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, src=home)
                factors[name] = buf.cpu()
        else:
            if rank == home:
                dist.send(store.bases[name].to(device, dtype).contiguous(), dst=int(user))
            factors[name] = torch.empty(shape, dtype=dtype, device="meta")
    return factors
