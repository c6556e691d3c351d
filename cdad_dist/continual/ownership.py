"""Layer ownership: every protected layer has one owner rank, decided in one place, identically on every rank.

Adding GPUs should add memory and speed to the continual core, not copies. So each layer's work runs on its owner
only: its sketch during the capture (the other ranks send it their input columns, see ``capture.OwnerExchange``),
its decomposition, and in ``update`` mode its per-step projection and anchor (the projected weights are then
broadcast, see ``projector.Projector``). The owners come from a cost model of the layer's shapes (no
communication, so ``cdad plan --world N`` predicts the same assignment a run makes):

- capture + finalisation: the sketch's held bytes and its FLOPs (``sketch_cost``), from (d, sketch options);
- projection: 2·out·d·min(k, d−k) multiply-adds per step (ΔW·F then (ΔW·F)·Fᵀ with the thinner factor F), from
  the stored bases' widths when they are known, else from the assumed rank fraction.

Each resource is normalised by its total over layers and the layers are placed greedily, largest first, on the
rank whose worst resulting resource share is smallest (a vector form of longest-processing-time scheduling);
ties go to the lower rank and names break ties between equal layers, so the result is deterministic.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cdad_dist.continual.sketch_cost import F32, F64, assumed_rank


@dataclass(frozen=True)
class LayerShape:
    out: int  # rows of the weight viewed as out × d
    d: int  # input dimension (in · kh · kw for a conv)


def capture_costs(shapes: Mapping[str, LayerShape], options) -> dict[str, tuple[float, float]]:
    """Per layer: (sketch bytes held on the owner, sketch + decomposition FLOPs), from ``SketchOptions``."""
    costs = {}
    for name, shape in shapes.items():
        kind = options.resolved_kind(shape.d)
        cost = options.choice(shape.d).costs["gram" if kind == "gram" else "isvd"]
        held = F64 * shape.d ** 2 if kind == "gram" else cost.peak_bytes
        costs[name] = (float(held), cost.flops)
    return costs


def projection_macs(out: int, d: int, factor_columns: int) -> float:
    """Multiply-adds of one projection step of an out × d weight with a d × c factor (U or its complement)."""
    return 2.0 * out * d * factor_columns


def projection_costs(shapes: Mapping[str, LayerShape], factor_columns: Mapping[str, int] | None = None,
                     rank_fraction: float = 0.25) -> dict[str, tuple[float, float]]:
    """Per layer: (anchor + factor bytes, projection MACs per step). ``factor_columns``: the stored tensor's width
    per layer (U or V); missing layers assume k = rank_fraction · d in its thinner form."""
    costs = {}
    for name, shape in shapes.items():
        if factor_columns is not None:
            if name not in factor_columns:
                continue  # no basis: nothing to project
            c = int(factor_columns[name])
        else:
            k = assumed_rank(shape.d, rank_fraction)
            c = min(k, shape.d - k)
        costs[name] = (float(F32 * shape.d * (shape.out + c)), projection_macs(shape.out, shape.d, c))
    return costs


@dataclass
class Ownership:
    owners: dict[str, int]
    world: int
    loads: list[list[float]] = field(default_factory=list)  # per rank, per resource (raw units)

    def owned(self, rank: int) -> list[str]:
        return sorted(n for n, r in self.owners.items() if r == rank)

    def owner(self, name: str) -> int:
        return self.owners[name]

    def max_share(self, resource: int) -> float:
        """The most loaded rank's share of a resource's total (1/world is perfect balance)."""
        total = sum(load[resource] for load in self.loads)
        return max(load[resource] for load in self.loads) / total if total > 0 else 1.0 / self.world


def assign_owners(costs: Mapping[str, tuple[float, ...]], world: int) -> Ownership:
    """Owners of the layers given each layer's cost vector (same units per position across layers)."""
    if world < 1:
        raise ValueError(f"assign_owners: world must be >= 1, got {world}")
    names = sorted(costs)
    n_res = len(next(iter(costs.values()))) if costs else 0
    totals = [sum(costs[n][i] for n in names) or 1.0 for i in range(n_res)]
    share = {n: [costs[n][i] / totals[i] for i in range(n_res)] for n in names}
    loads = [[0.0] * n_res for _ in range(world)]
    shares = [[0.0] * n_res for _ in range(world)]
    owners: dict[str, int] = {}
    for name in sorted(names, key=lambda n: (-max(share[n], default=0.0), n)):
        def worst_after(r: int) -> tuple[float, float, int]:
            after = [s + c for s, c in zip(shares[r], share[name])]
            return (max(after, default=0.0), sum(after), r)
        rank = min(range(world), key=worst_after)
        owners[name] = rank
        for i in range(n_res):
            shares[rank][i] += share[name][i]
            loads[rank][i] += costs[name][i]
    return Ownership(owners, world, loads)


def layer_shapes(layers) -> dict[str, LayerShape]:
    """Shapes of protected modules (``{name: module}``): out × d of each weight."""
    from cdad_dist.continual.layers import input_dim

    return {name: LayerShape(int(module.weight.shape[0]), int(input_dim(module))) for name, module in layers.items()}


def capture_ownership_of_dims(dims: Mapping[str, int], options, world: int) -> Ownership:
    """Who sketches and decomposes each layer, from its input dimension d alone (the capture costs need nothing
    else), so a resumed run finds the same owners from a basis file's layout without the model."""
    return assign_owners(capture_costs({n: LayerShape(0, int(d)) for n, d in dims.items()}, options), world)


def capture_ownership(layers, options, world: int) -> Ownership:
    """Who sketches and decomposes each layer (from shapes and the sketch options only)."""
    return capture_ownership_of_dims({n: s.d for n, s in layer_shapes(layers).items()}, options, world)


def projection_ownership(layers, factor_columns: Mapping[str, int], world: int) -> Ownership:
    """Who projects (and anchors) each layer with a non-empty stored factor."""
    return assign_owners(projection_costs(layer_shapes(layers), factor_columns), world)
