"""Cross-rank reduction of per-layer sketches into one basis per layer, bit-identical on every rank.

Every rank sketched only its own images. For each layer (sorted by name, so all ranks issue the same
collectives) one *owner* rank receives the others' sketches, as the sketch declares (``Sketch.reduction``):
``reduce`` (sum) of summed payloads such as Gram matrices, and a binary-tree merge of merged ones such as iSVD
factors U·Σ (in round j, rank owner + i·2^(j+1) + 2^j sends its merged factors to owner + i·2^(j+1), which folds
them: log2(world) rounds, and no rank ever holds more than its own factors plus one incoming d × r payload, where
a gather would put world · d · r on the owner) — then finalises the layer (e.g. the GPM merge with the old basis).
Owners are spread over ranks by estimated cost, so the decompositions of different layers run in parallel.
Finally every basis is broadcast from its owner; since only the owner computes it, all ranks hold the same bytes,
which a SHA-256 digest compared across ranks confirms (or, ``keep_on_owners``, each basis stays on its owner:
``basis_comm``). Only ``torch.distributed`` is used (gloo or NCCL); without
an initialised process group everything runs locally.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from cdad_dist.continual import ownership
from cdad_dist.continual.sketches import Sketch
from cdad_dist.continual.store import bases_digest  # noqa: F401  (re-exported: the digest of a set of bases)

log = logging.getLogger(__name__)

Finalize = Callable[[str, Sketch], tuple[Tensor, dict]]


def dist_info(group=None) -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@dataclass
class ReduceResult:
    bases: dict[str, Tensor]  # CPU tensors d × k, identical bytes on every rank (or the owned ones: keep_on_owners)
    info: dict[str, dict] = field(default_factory=dict)
    digest: str = ""  # "" with keep_on_owners: no rank sees every basis (the caller hashes them as they stream)
    owners: dict[str, int] = field(default_factory=dict)
    layout: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # every layer: (d, columns, itemsize)


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Owners balancing one scalar cost per layer (``ownership.assign_owners`` with a single resource)."""
    return ownership.assign_owners({name: (cost,) for name, cost in costs.items()}, world).owners


def comm_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_layers(sketches: dict[str, Sketch], rank: int, world: int, group) -> None:
    signature = hashlib.sha256(
        "|".join(f"{n}:{s.kind}:{s.d}" for n, s in sorted(sketches.items())).encode()).hexdigest()
    signatures: list = [None] * world
    dist.all_gather_object(signatures, signature, group=group)
    if len(set(signatures)) != 1:
        raise RuntimeError(f"continual reducer: ranks disagree on the protected layers / sketch kinds "
                           f"(signatures per rank: {[s[:12] for s in signatures]}); rank {rank} has "
                           f"{len(sketches)} layers")


def _group_rank(group, rank: int) -> int:
    """Global rank of a group rank (collectives take global ranks for src/dst)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def reduce_and_finalize(sketches: dict[str, Sketch], finalize: Finalize, group=None,
                        verify: bool = True, owners: dict[str, int] | None = None,
                        merged_on_owners: frozenset[str] | set[str] = frozenset(),
                        keep_on_owners: bool = False) -> ReduceResult:
    """Merge the ranks' sketches per layer, finalise each layer on one rank, broadcast the bases.

    ``sketches`` is consumed: afterwards each entry holds the merged sketch on the layer's owner and is released
    (emptied) elsewhere. ``finalize(name, merged_sketch) -> (basis d × k, plain info dict)`` runs on the owner.
    ``owners``: the layer ownership to use (``ownership.capture_ownership``); None balances by the sketches'
    finalise costs. ``merged_on_owners``: layers whose capture already streamed every rank's columns into the
    owner's sketch (``capture.OwnerExchange``): nothing to reduce, the other ranks' entries are empty.
    ``keep_on_owners``: skip the final broadcast; each rank returns only the bases it finalised, plus every
    layer's layout (the strategy then keeps each basis on its owner, see ``basis_comm``).
    """
    rank, world = dist_info(group)
    if world == 1:
        bases, info = {}, {}
        for name in sorted(sketches):
            U, meta = finalize(name, sketches[name])
            bases[name] = U.detach().to("cpu").contiguous()
            info[name] = meta
        return ReduceResult(bases, info, bases_digest(bases), {n: 0 for n in bases}, _layout(bases))
    _check_same_layers(sketches, rank, world, group)
    device = comm_device(group)
    names = sorted(sketches)
    if owners is None:
        owners = _agree_on_owners(sketches, names, world, device, group)
    _reduce_to_owners(sketches, [n for n in names if n not in merged_on_owners], owners, rank, world, device, group)
    owned = [n for n in names if owners[n] == rank]
    local_bases, local_info = {}, {}
    for name in owned:
        U, meta = finalize(name, sketches[name])
        local_bases[name] = U.detach().to("cpu").contiguous()
        local_info[name] = meta
    infos: list = [None] * world
    dist.all_gather_object(infos, (local_info, _layout(local_bases)), group=group)
    info = {name: meta for part, _ in infos for name, meta in part.items()}
    layout = {name: entry for _, part in infos for name, entry in part.items()}
    if keep_on_owners:
        log.info("continual reducer: %d layers over %d ranks, bases kept on their owners", len(layout), world)
        return ReduceResult(local_bases, info, "", owners, layout)
    bases = _broadcast_bases(local_bases, names, owners, rank, device, group,
                             {n: sketches[n].d for n in names})
    digest = bases_digest(bases)
    if verify:
        digests: list = [None] * world
        dist.all_gather_object(digests, digest, group=group)
        if len(set(digests)) != 1:
            raise RuntimeError(f"continual reducer: bases differ across ranks (digests {digests})")
    log.info("continual reducer: %d layers over %d ranks, bases sha256=%s", len(bases), world, digest)
    return ReduceResult(bases, info, digest, owners, layout)


def _layout(bases: dict[str, Tensor]) -> dict[str, tuple[int, int, int]]:
    return {name: (int(U.shape[0]), int(U.shape[1]), U.element_size()) for name, U in bases.items()}


def _agree_on_owners(sketches: dict[str, Sketch], names: list[str], world: int, device: torch.device,
                     group) -> dict[str, int]:
    """Owners from the summed local costs, so that every rank computes the same assignment."""
    costs = torch.tensor([sketches[n].finalise_cost(world) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(costs, group=group)
    return assign_owners({n: float(c) for n, c in zip(names, costs.tolist())}, world)


def _reduce_to_owners(sketches: dict[str, Sketch], names: list[str], owners: dict[str, int], rank: int,
                      world: int, device: torch.device, group) -> list[str]:
    """After this, ``sketches[name]`` on its owner holds the merge of all ranks' sketches (entries of the dict are
    replaced); the other ranks' sketches of that layer are released. Returns the names this rank owns."""
    owned = []
    for name in names:
        owner = owners[name]
        sketch = sketches[name]
        if sketch.reduction == "sum":
            matrix, sc = sketch.to_payload()
            packed = [matrix.to(device), sc.to(device)]
            for t in packed:
                dist.reduce(t, dst=_group_rank(group, owner), group=group)
            if rank == owner:
                sketch.set_payload(packed[0], packed[1].cpu())
            else:
                sketch.release()
        else:
            _tree_merge(sketch, owner, rank, world, device, group)
        if rank == owner:
            owned.append(name)
    return owned


def _tree_merge(sketch: Sketch, owner: int, rank: int, world: int, device: torch.device, group) -> None:
    """Merge every rank's sketch of one layer into the owner's along a binary tree rooted at the owner (ranks
    relabelled v = (rank − owner) mod world; in round j, v with v mod 2^(j+1) = 2^j sends to v − 2^j). A sender
    is released after sending. The fold order is fixed by (owner, world), so every run merges alike."""
    v = (rank - owner) % world
    step = 1
    while step < world:
        if v % (2 * step) == step:  # send my (merged) factors to my parent, then I am done
            matrix, scalars = sketch.to_payload()
            dst = _group_rank(group, (v - step + owner) % world)
            head = torch.tensor([matrix.shape[1]], dtype=torch.int64, device=device)
            dist.send(head, dst=dst, group=group)
            if matrix.shape[1]:
                dist.send(matrix.to(device).contiguous(), dst=dst, group=group)
            dist.send(scalars.to(device), dst=dst, group=group)
            sketch.release()
            return
        if v % (2 * step) == 0 and v + step < world:  # receive a child's factors and fold them into mine
            src = _group_rank(group, (v + step + owner) % world)
            head = torch.zeros(1, dtype=torch.int64, device=device)
            dist.recv(head, src=src, group=group)
            matrix, own = sketch.to_payload()  # same kind on every rank: the same payload dtype and scalar count
            incoming = torch.empty(sketch.d, int(head), dtype=matrix.dtype, device=device)
            if int(head):
                dist.recv(incoming, src=src, group=group)
            scalars = torch.zeros(own.shape, dtype=torch.float64, device=device)
            dist.recv(scalars, src=src, group=group)
            sketch.merge_payload(incoming, scalars.cpu())
            del incoming
        step *= 2


def _broadcast_bases(local: dict[str, Tensor], names: list[str], owners: dict[str, int], rank: int,
                     device: torch.device, group, dims: dict[str, int]) -> dict[str, Tensor]:
    """Every rank receives every layer's basis from its owner (ranks k first, then the tensors)."""
    ks = torch.zeros(len(names), dtype=torch.int64, device=device)
    codes = torch.zeros(len(names), dtype=torch.int64, device=device)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for i, name in enumerate(names):
        if name in local:
            ks[i] = local[name].shape[1]
            codes[i] = dtypes.index(local[name].dtype)
    dist.all_reduce(ks, group=group)  # each entry is nonzero on one rank only
    dist.all_reduce(codes, group=group)
    bases = {}
    for i, name in enumerate(names):
        owner, k = owners[name], int(ks[i])
        dtype = dtypes[int(codes[i])]
        if rank == owner:
            buf = local[name].to(device)
        else:
            buf = torch.empty(dims[name], k, dtype=dtype, device=device)
        if k > 0:
            dist.broadcast(buf, src=_group_rank(group, owner), group=group)
        bases[name] = buf.to("cpu").contiguous()
    return bases
