"""Continual-learning strategies the engine calls around each task (see docs/contracts.md).

- ``naive``: plain fine-tuning, the forgetting baseline.
- ``joint``: the same hooks as naive; the engine collapses the task sequence into one task (the upper bound).
- ``cdad``: the paper's method, corrected. After each task the inputs of every protected layer are captured on a
  sample of the task's images, sketched per rank, reduced across ranks and merged into the old basis (GPM
  criterion); in later tasks every change of a protected weight is kept orthogonal to that basis.
  ``paper_faithful`` swaps in the paper's unscaled iSVD and its Eq. 6 cross-task merge for comparison.
"""
from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cdad_dist.continual.basis_comm import factors_for, stream_to_root
from cdad_dist.continual.baselines import JointStrategy, NaiveStrategy  # noqa: F401  (re-exported)
from cdad_dist.continual.capture import FeatureCapture, OwnerExchange, lockstep_batches
from cdad_dist.continual.config import CaptureConfig, ContinualConfig  # noqa: F401  (re-exported)
from cdad_dist.continual.layers import discover_protected, freeze_unprotected, input_dim, protected_weight_bytes
from cdad_dist.continual.memory import gpm_merge, gpm_merge_gram_compact
from cdad_dist.continual.ownership import (Ownership, capture_ownership, capture_ownership_of_dims,
                                           projection_ownership)
from cdad_dist.continual.projector import Projector
from cdad_dist.continual.protocol import (STATE_FORMAT, Backend, CapturePlan, ContinualStrategy,  # noqa: F401
                                          build_strategy, check_strategy_state)
from cdad_dist.continual.reducer import comm_device, dist_info, reduce_and_finalize
from cdad_dist.continual.sketches import GramSketch, Sketch, SketchOptions, full_precision, make_sketch
from cdad_dist.continual.store import BasesDigest, BasisStore, basis_dtype, bases_digest, compact_form, task_file_name
from cdad_dist.atomic import sha256_file
from cdad_dist.errors import CdadError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

BASES_DIR = "bases"  # under the run directory: one safetensors file per task, referenced by checkpoints


def sketch_options(cfg: ContinualConfig) -> SketchOptions:
    """How ``make_sketch`` builds each layer's sketch under these options."""
    return SketchOptions(kind="isvd_paper" if cfg.paper_faithful else cfg.sketch, gamma=cfg.gamma,
                         memory_budget_mb=cfg.memory_budget_mb, carry_gamma=cfg.isvd_carry_gamma,
                         max_rank=cfg.isvd_max_rank, buffer_columns=cfg.isvd_buffer_columns,
                         rank_fraction=cfg.plan_rank_fraction)


def layer_class(name: str) -> str:
    """A protected layer's class for reports: its network and block role, e.g. ``unet.attention``."""
    top = name.split(".", 1)[0]
    if re.search(r"attn|attentions", name):
        role = "attention"
    elif "resnets" in name or re.search(r"conv\d|conv_shortcut", name):
        role = "resnet"
    else:
        role = "other"
    return f"{top}.{role}"


class CDADStrategy(ContinualStrategy):
    """Gradient/update projection onto the orthogonal complement of the old tasks' input spaces."""

    name = "cdad"

    def __init__(self, cfg: ContinualConfig | None = None) -> None:
        super().__init__(cfg or ContinualConfig())
        cfg = self.cfg
        self.store = BasisStore(gamma=cfg.gamma)
        self.tasks_done = 0
        self.history: list[dict] = []
        self.frozen: list[str] = []
        self.saturated: list[str] = []  # protected layers with k = d, frozen for the current task
        self._projector: Projector | None = None
        self._pending_anchor: tuple[int, dict[str, torch.Tensor]] | None = None  # from a mid-task checkpoint
        self._current_task: int | None = None
        self._layers: tuple[int, dict[str, nn.Module]] | None = None
        # {file, digest, sha256, task} of the bases file written at the last task end (None: no run directory
        # bound, e.g. library use; the state then embeds the bases)
        self._basis_ref: dict | None = None
        # layer → rank holding its basis when each rank keeps only its own layers' (layer ownership with a run
        # directory, whose file holds them all); None: every rank holds every basis
        self._homes: dict[str, int] | None = None

    # -- layers ----------------------------------------------------------------------------------------------------
    def protected_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        if self._layers is None or self._layers[0] != id(model):
            self._layers = (id(model), discover_protected(model, self.cfg.layer_patterns))
        return self._layers[1]

    # -- training hooks --------------------------------------------------------------------------------------------
    def begin_task(self, task_index: int, model: nn.Module) -> None:
        deepspeed = self._check_backend(self.context.backend)
        self._close_projector()
        layers = self.protected_layers(model)
        if task_index > 0 and self.cfg.freeze_unprotected:
            self.frozen = freeze_unprotected(model, layers)
        self.saturated = []
        if self.store.layout:
            rank, world = dist_info()
            owners = self.projection_owners(layers, world)
            self._projector = Projector(layers, self._projection_factors(owners), self.cfg.project,
                                        complement=self.store.complement, deepspeed_master=deepspeed, owners=owners,
                                        rank=rank, world=world)
            self.saturated = self._projector.freeze_saturated()
            if self.cfg.project == "grad":
                self._projector.install_grad_hooks()
            elif self._pending_anchor is not None and self._pending_anchor[0] == task_index:
                self._projector.restore_anchor(self._pending_anchor[1])
        self._pending_anchor = None
        self._current_task = task_index
        log.info("cdad: task %d: %d protected layers, %d projected (%s mode), %d frozen (k = d), %d other "
                 "parameters frozen", task_index, len(layers), len(self._projector.names) if self._projector else 0,
                 self.cfg.project, len(self.saturated), len(self.frozen))

    def _projection_factors(self, owners: dict[str, int] | None) -> dict:
        """The stored tensors the projector needs on this rank: all of them when every rank holds every basis,
        else each one sent from its home to its projection owner (to every rank in grad mode)."""
        if self._homes is None or self.store.complete:
            return self.store.bases
        return factors_for(self.store, self._homes, owners, basis_dtype(self.cfg.basis_dtype))

    def _check_backend(self, backend: Backend) -> bool:
        """Refuse backends where the projection would hit sharded weights; True under DeepSpeed ZeRO-1/2, whose
        optimizer keeps fp32 master weights that the update projection must write too."""
        if "FSDP" in backend.distributed.upper():
            raise ConfigError("continual.strategy=cdad does not support FSDP (protected weights are sharded "
                              "flat parameters); use DDP or DeepSpeed ZeRO-2")
        stage = backend.zero_stage
        if stage is None:
            return False
        if stage >= 3:
            raise ConfigError("continual.strategy=cdad does not support DeepSpeed ZeRO-3 (it shards the protected "
                              "weights); use ZeRO-1 or ZeRO-2 (launch/deepspeed/zero2.json)")
        return True

    def before_optimizer_step(self, model: nn.Module) -> None:
        if self._projector is not None and self.cfg.project == "update":
            self._projector.anchor()

    def after_optimizer_step(self, model: nn.Module) -> None:
        if self._projector is not None and self.cfg.project == "update":
            self._projector.project_update()

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Protected weights and the rest as separate groups. In grad mode the protected weights get no weight
        decay: decoupled decay is not projected and would shrink W inside span(U)."""
        layers = self.protected_layers(model)
        protected_ids = {id(m.weight) for m in layers.values()}
        protected = [p for p in model.parameters() if p.requires_grad and id(p) in protected_ids]
        other = [p for p in model.parameters() if p.requires_grad and id(p) not in protected_ids]
        decay = 0.0 if (self.cfg.project == "grad" and self.store.layout) else weight_decay
        groups = [{"params": protected, "weight_decay": decay, "name": "protected"},
                  {"params": other, "weight_decay": weight_decay, "name": "unprotected"}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"cdad: nothing left to train after task {self.tasks_done - 1}: every protected layer "
                              f"is saturated (k = d, {len(self.saturated)} layers) and the other parameters are "
                              "frozen; lower continual.gamma or set continual.freeze_unprotected=false")
        return groups

    def _close_projector(self) -> None:
        if self._projector is not None:
            self._projector.remove()
            self._projector = None

    # -- memory ------------------------------------------------------------------------------------------------------
    def capture_plan(self, task_index: int) -> CapturePlan:
        """The configured share of the task's training images, with their perturbed versions (as training shows
        them to the AMN) when ``continual.capture.perturbed``."""
        return CapturePlan(images=self.cfg.capture.images, perturbed=self.cfg.capture.perturbed,
                           synthetic=self.cfg.capture.synthetic)

    def end_task(self, task_index: int, model: nn.Module, capture_batches: Iterable[dict],
                 capture_forward: Callable[[dict], None]) -> None:
        if task_index < self.tasks_done:
            raise CdadError(f"cdad: end_task({task_index}) called again; the bases already include tasks "
                            f"0..{self.tasks_done - 1}")
        self._close_projector()  # no gradient hooks or stale anchors during the capture pass
        layers = self.protected_layers(model)
        rank, world = dist_info()
        ownership = self.capture_owners(layers, world)
        sketches = self._new_sketches(layers, rank, ownership)
        images, exchange = self._capture(task_index, model, layers, sketches, capture_batches, capture_forward,
                                         rank, world, ownership)
        sketch_peak = sum(s.peak_nbytes for s in sketches.values()) + (exchange.inflight_peak_bytes
                                                                        if exchange else 0)
        # With a run directory to hold the task file, each basis stays on the rank that computed it (its home)
        keep_on_owners = ownership is not None and self.context.run_dir is not None
        with full_precision():  # reductions and decompositions never in a caller's autocast dtype
            result = reduce_and_finalize(sketches, self._finalize, owners=ownership.owners if ownership else None,
                                         merged_on_owners=exchange.streamed if exchange else frozenset(),
                                         keep_on_owners=keep_on_owners)
        del sketches
        complement = {name for name, meta in result.info.items() if meta.get("stored") == "complement"}
        self.store = BasisStore(bases=result.bases, gamma=self.cfg.gamma, task=task_index, complement=complement,
                                layout=result.layout)
        self._homes = dict(ownership.owners) if keep_on_owners else None
        self.tasks_done = task_index + 1
        self._basis_ref = self._write_bases(task_index, rank, world)
        digest = self._basis_ref["digest"] if self._basis_ref else result.digest
        summary = self._summarise(task_index, layers, result, digest, images, world)
        summary["sketch_peak_bytes_per_rank"] = self._per_rank(sketch_peak, world)
        summary["layer_ownership"] = ownership is not None
        summary["basis_bytes_held_per_rank"] = self._per_rank(self.store.held_bytes(), world)
        self.history.append(summary)
        if rank == 0:
            log.info("cdad: task %d bases: %d layers, k total %d, %.2f MB (%.2f%% of protected weights), "
                     "sha256 %s", task_index, len(self.store.layout), summary["k_total"], summary["bytes"] / 2 ** 20,
                     100 * summary["relative_to_weights"], digest)

    def _write_bases(self, task_index: int, rank: int, world: int) -> dict | None:
        """Write the task's bases once under ``<run dir>/bases/`` (atomic); checkpoints reference the file instead
        of carrying copies. Rank 0 writes: each layer, in name order, comes from its own memory or, when the bases
        stay on their owners, from its owner, and is hashed (the digest) and appended as it comes, one layer in
        rank 0's memory at a time; the file's sha256 comes out of the write. Digest and sha256 are then broadcast,
        so every rank's reference is the same. None without a run directory (the state then embeds the bases)."""
        if self.context.run_dir is None:
            return None
        dtype = self.cfg.basis_dtype
        hasher = BasesDigest()
        opened = self.store.open_file(Path(self.context.run_dir) / BASES_DIR, dtype) if rank == 0 else nullcontext()
        with opened as writer:
            def consume(layer: str, tensor: torch.Tensor) -> None:
                hasher.update(layer, tensor)
                writer.write(layer, tensor)
            stream_to_root(self.store, self._homes, basis_dtype(dtype), consume)
        shared = [hasher.hexdigest(), writer.sha256] if rank == 0 else [None, None]
        if world > 1:  # also a barrier: the file exists before any rank goes on (and checkpoints it)
            torch.distributed.broadcast_object_list(shared, src=0)
        digest, sha = shared
        return {"file": f"{BASES_DIR}/{task_file_name(task_index)}", "digest": digest, "sha256": sha,
                "task": task_index}

    def _load_referenced(self, ref: dict) -> tuple[BasisStore, dict[str, int] | None]:
        """The bases file a checkpoint references, verified on every rank (present, same sha256, same tensor
        digest), and the layers' homes. With homes only this rank's layers are read (the layout of all of them
        is). A matching sha256 already proves the bytes the digest was taken of, so the digest is recomputed only
        for a reference without one (or for free, when every layer was read anyway)."""
        if self.context.run_dir is None:
            raise CheckpointError(f"continual strategy state references {ref.get('file')} but no run directory is "
                                  "bound to resolve it")
        path = Path(self.context.run_dir) / str(ref["file"])
        if not path.is_file():
            raise CheckpointError(f"{path}: basis file missing (the checkpoint references it; restore it from a "
                                  "copy of the run directory)")
        if ref.get("sha256") and sha256_file(path) != ref["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the one the checkpoint recorded (altered or damaged "
                                  "basis file)")
        homes = self._homes_of(BasisStore.read_layout(path))
        rank, _ = dist_info()
        store = BasisStore.load(path, names=None if homes is None else [n for n, r in homes.items() if r == rank])
        if store.complete or not ref.get("sha256"):
            digest = bases_digest(store.bases) if store.complete else BasisStore.file_digest(path)
            if digest != ref.get("digest"):
                raise CheckpointError(f"{path}: its bases differ from the ones the checkpoint recorded (digest)")
        return store, homes

    def _homes_of(self, dims: dict[str, int]) -> dict[str, int] | None:
        """Which rank holds each layer's basis after a resume (its capture owner, as at the task end), or None:
        every rank holds all (one rank, ``layer_ownership`` off, or no run directory whose file holds them)."""
        _, world = dist_info()
        if world == 1 or not self.cfg.layer_ownership or self.context.run_dir is None:
            return None
        return capture_ownership_of_dims(dims, sketch_options(self.cfg), world).owners

    def capture_owners(self, layers: dict[str, nn.Module], world: int) -> Ownership | None:
        """Who sketches and decomposes each layer (None: one rank, or ``layer_ownership`` off)."""
        if world == 1 or not self.cfg.layer_ownership:
            return None
        return capture_ownership(layers, sketch_options(self.cfg), world)

    def projection_owners(self, layers: dict[str, nn.Module], world: int) -> dict[str, int] | None:
        """Who anchors and projects each layer in update mode (None: one rank, grad mode, or ownership off)."""
        if world == 1 or not self.cfg.layer_ownership or self.cfg.project != "update":
            return None
        widths = {n: self.store.columns(n) for n in self.store.names() if n in layers and self.store.columns(n) > 0}
        return projection_ownership(layers, widths, world).owners

    @staticmethod
    def _per_rank(value: int, world: int) -> list[int]:
        if world == 1:
            return [int(value)]
        values = [None] * world
        torch.distributed.all_gather_object(values, int(value))
        return [int(v) for v in values]

    def _new_sketches(self, layers: dict[str, nn.Module], rank: int,
                      ownership: Ownership | None = None) -> dict[str, Sketch]:
        options = sketch_options(self.cfg)
        sketches = {}
        for name, module in layers.items():
            device = self.cfg.sketch_device or module.weight.device
            sketches[name] = make_sketch(input_dim(module), options, device=device)
            # Paper Eq. 6 streams M = [Û_{t-1}, X_t]: the old basis is the first block (once: on the layer's
            # owner when layers are owned, else on rank 0, whose sketch is merged first).
            feeder = ownership.owner(name) if ownership is not None else 0
            if (self.cfg.paper_faithful and rank == feeder and name in self.store.layout
                    and self.store.rank(name) > 0):
                sketches[name].update(self.store.basis(name).to(device))
        return sketches

    def _capture(self, task_index, model, layers, sketches, capture_batches, capture_forward, rank, world,
                 ownership: Ownership | None = None) -> tuple[int, OwnerExchange | None]:
        """Run the capture forwards with the hooks installed; returns (images this rank contributed, exchange)."""
        capture_cfg = self.cfg.capture
        was_training = model.training
        model.eval()
        images = 0
        exchange = None
        if ownership is not None:  # summed sketches (Gram) stream to their owner; merged ones are merged after
            streamed = {n for n, sk in sketches.items() if sk.reduction == "sum"}
            exchange = OwnerExchange(ownership.owners, rank, world, streamed=streamed)
        try:
            with FeatureCapture(layers, sketches, capture_cfg.max_columns_per_block,
                                seed=capture_cfg.seed + 7919 * task_index, rank=rank,
                                sketch_device=self.cfg.sketch_device, exchange=exchange) as capture, torch.no_grad():
                # already this rank's selection (see CaptureConfig.images); in lockstep when layers are owned
                for batch in lockstep_batches(capture_batches, capture):
                    capture_forward(batch)
                    if capture.contributing:
                        images += len(batch["image"]) if "image" in batch else 1
        finally:
            model.train(was_training)
        return images, exchange

    def _finalize(self, name: str, sketch: Sketch) -> tuple[torch.Tensor, dict]:
        """Runs on the layer's owner rank: the merged basis of all tasks so far, in its smaller stored form
        (U, or its complement V when k > d/2; computed in float64, then cast to ``basis_dtype``)."""
        out_dtype = basis_dtype(self.cfg.basis_dtype)
        gamma = self.cfg.gamma_for(name)
        known = name in self.store.layout
        if isinstance(sketch, GramSketch) and not self.cfg.paper_faithful:
            old = self.store.bases[name] if known else None  # in its stored form: merged without forming U
            stored, is_complement, merge = gpm_merge_gram_compact(old, name in self.store.complement, sketch.gram(),
                                                                  gamma, sketch.n_columns)
            info = merge.to_dict()
        else:
            old = self.store.basis(name, torch.float64) if known else None
            if self.cfg.paper_faithful:
                U = sketch.basis(gamma).to(torch.float64)
                k_old = 0 if old is None else int(old.shape[1])
                info = {"d": sketch.d, "k_old": k_old, "k_new": int(U.shape[1]), "n_columns": sketch.n_columns}
            else:
                U, merge = gpm_merge(old, sketch.factors(), gamma, out_dtype=torch.float64)
                info = merge.to_dict()
            stored, is_complement = compact_form(U)
        info.update(sketch=sketch.kind, sketch_peak_bytes=sketch.peak_nbytes,
                    stored="complement" if is_complement else "basis")
        return stored.to(out_dtype).contiguous(), info

    def _summarise(self, task_index, layers, result, digest: str, images: int, world: int) -> dict:
        weights = protected_weight_bytes(layers)
        empty = sorted(n for n, i in result.info.items() if i.get("n_columns", 0) == 0)
        if empty:
            log.warning("cdad: %d protected layers received no inputs during capture (not protected by task %d): "
                        "%s", len(empty), task_index, empty[:10])
        images_all = images
        if world > 1:  # the summary (saved by rank 0) states the task's whole capture, not rank 0's share
            count = torch.tensor([images], dtype=torch.long, device=comm_device())
            torch.distributed.all_reduce(count)
            images_all = int(count)
        k_all = sum(self.store.rank(n) for n in self.store.names())
        d_all = sum(self.store.dim(n) for n in self.store.names())
        return {"task": task_index, "digest": digest, "images": images_all, "images_this_rank": images,
                "fill_fraction": k_all / max(1, d_all), "k_total": k_all, "bytes": self.store.total_bytes(),
                "complement_layers": len(self.store.complement),
                "relative_to_weights": self.store.relative_to(weights), "layers_without_inputs": empty,
                "layers": result.info}

    # -- persistence -----------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Size and ranks of the current bases (plain data)."""
        return {"tasks_done": self.tasks_done, "bytes": self.store.total_bytes(),
                "k": {n: self.store.rank(n) for n in self.store.names()},
                "d": {n: self.store.dim(n) for n in self.store.names()},
                "complement": sorted(self.store.complement)}

    def summary(self) -> dict[str, Any]:
        """Per layer class: count, k and d (sums), fill fraction Σk/Σd; overall bytes vs the protected weights,
        complement-stored and frozen layers. Empty before the first task end."""
        if not self.store.layout:
            return {"tasks_done": self.tasks_done}
        classes: dict[str, dict[str, int]] = {}
        for name in self.store.names():
            row = classes.setdefault(layer_class(name), {"layers": 0, "k": 0, "d": 0, "d_min": 1 << 62, "d_max": 0})
            k, d = self.store.rank(name), self.store.dim(name)
            row["layers"] += 1
            row["k"] += k
            row["d"] += d
            row["d_min"], row["d_max"] = min(row["d_min"], d), max(row["d_max"], d)
        for row in classes.values():
            row["fill"] = row["k"] / max(1, row["d"])
        k_all = sum(r["k"] for r in classes.values())
        d_all = sum(r["d"] for r in classes.values())
        last = self.history[-1] if self.history else {}
        return {"tasks_done": self.tasks_done, "fill_fraction": k_all / max(1, d_all), "k_total": k_all,
                "d_total": d_all, "bytes": self.store.total_bytes(),
                "bytes_vs_protected_weights": last.get("relative_to_weights"),
                "complement_layers": len(self.store.complement),
                "saturated_layers": sum(self.store.rank(n) == self.store.dim(n) for n in self.store.names()),
                "frozen_unprotected_params": len(self.frozen), "capture_images": last.get("images"),
                "fill_per_task": [h.get("fill_fraction") for h in self.history], "layer_classes": classes}

    def state_dict(self) -> dict:
        anchor = self._projector.anchor_state() if self._projector is not None else {}
        return {"format": STATE_FORMAT, "name": self.name, "tasks_done": self.tasks_done,
                "anchor": {"task": self._current_task, "weights": anchor} if anchor else None,
                "gamma": self.cfg.gamma, "task": self.store.task,
                # With a run directory the bases live once per task in <run dir>/bases/ and the state references
                # them (bases_ref, verified on load); without one they are embedded.
                "bases": {} if self._basis_ref else {n: U.detach().cpu().clone() for n, U in self.store.bases.items()},
                "bases_ref": self._basis_ref,
                "complement": sorted(self.store.complement),  # layers whose stored tensor is V = U⊥
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        check_strategy_state(state, self.name)
        ref = state.get("bases_ref")
        try:
            tasks_done, task = int(state["tasks_done"]), int(state["task"])
            if ref:
                store, homes = self._load_referenced(ref)
            else:  # embedded: every rank holds every basis
                bases = {str(n): U for n, U in state["bases"].items()}
                if any(not isinstance(U, torch.Tensor) or U.dim() != 2 for U in bases.values()):
                    raise CheckpointError("continual strategy state: every basis must be a 2-D tensor")
                # complement: absent in states that stored U only; BasisStore refuses names without a tensor
                store = BasisStore(bases=bases, complement={str(n) for n in state.get("complement", [])})
                homes = None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"continual strategy state: missing or bad entry ({exc})") from exc
        if float(state.get("gamma", self.cfg.gamma)) != self.cfg.gamma:
            log.warning("cdad: bases were built with gamma=%s, this run uses %s", state.get("gamma"), self.cfg.gamma)
        self._close_projector()
        store.gamma, store.task = self.cfg.gamma, task
        self.store, self._homes = store, homes
        self.tasks_done = tasks_done
        self._basis_ref = dict(ref) if ref else None
        self.history = list(state.get("history", []))
        anchor = state.get("anchor")
        self._pending_anchor = (int(anchor["task"]), dict(anchor["weights"])) if anchor else None
