"""Continual-learning strategies the engine calls around each task (see docs/contracts.md).

- ``naive``: plain fine-tuning, the forgetting baseline.
- ``joint``: the same hooks as naive; the engine collapses the task sequence into one task (the upper bound).
- ``cdad``: the paper's method, corrected. After each task the inputs of every protected layer are captured on a
  sample of the task's images, sketched per rank, reduced across ranks and merged into the old basis (GPM
  criterion); in later tasks every change of a protected weight is kept orthogonal to that basis.
  ``paper_faithful`` swaps in the paper's unscaled iSVD and its Eq. 6 cross-task merge for comparison.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdad_dist.continual.capture import CaptureConfig, FeatureCapture
from cdad_dist.continual.knn import KnnConfig
from cdad_dist.continual.layers import (LayerPatterns, discover_protected, freeze_unprotected, input_dim,
                                        protected_weight_bytes)
from cdad_dist.continual.memory import gpm_merge, gpm_merge_gram_compact
from cdad_dist.continual.projector import PROJECT_MODES, Projector
from cdad_dist.continual.reducer import comm_device, dist_info, reduce_and_finalize
from cdad_dist.continual.sketches import (SKETCH_KINDS, GramSketch, Sketch, SketchOptions, full_precision,
                                          make_sketch)
from cdad_dist.continual.store import BasisStore, basis_dtype, compact_form
from cdad_dist.engine.accel import zero_stage
from cdad_dist.errors import CdadError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("naive", "joint", "cdad", "knn")
STATE_FORMAT = "cdad-strategy/1"


@dataclass
class ContinualConfig:
    """Options of the continual core (``continual:`` in the run config)."""

    strategy: str = "cdad"
    sketch: str = "auto"  # auto | isvd | isvd_paper | gram
    gamma: float = 0.999
    project: str = "update"  # update (holds under AdamW) | grad (paper; exact only for SGD)
    paper_faithful: bool = False  # paper's unscaled iSVD + Eq. 6 cross-task merge
    layer_patterns: LayerPatterns = field(default_factory=LayerPatterns)
    freeze_unprotected: bool = True  # in incremental tasks, requires_grad=False on everything but protected weights
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)  # the `knn` baseline's memory banks
    memory_budget_mb: float = 256.0  # per layer: auto's cost model keeps each sketch's peak within it
    basis_dtype: str = "float32"
    isvd_carry_gamma: float | None = None  # None = 1 - (1 - gamma) / 10
    isvd_max_rank: int | None = None
    isvd_buffer_columns: int | None = None  # columns buffered per SVD fold; None: d (isvd) or budget-sized (auto)
    plan_rank_fraction: float = 0.25  # basis rank / d assumed by auto's cost model and `cdad plan`
    sketch_device: str | None = None  # None: where the activations are

    def __post_init__(self) -> None:
        if isinstance(self.layer_patterns, dict):
            self.layer_patterns = _build(LayerPatterns, self.layer_patterns, "continual.layer_patterns")
        if isinstance(self.capture, dict):
            self.capture = _build(CaptureConfig, self.capture, "continual.capture")
        if isinstance(self.knn, dict):
            self.knn = _build(KnnConfig, self.knn, "continual.knn")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"continual.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.sketch not in SKETCH_KINDS:
            raise ConfigError(f"continual.sketch must be one of {SKETCH_KINDS}, got {self.sketch!r}")
        if self.project not in PROJECT_MODES:
            raise ConfigError(f"continual.project must be one of {PROJECT_MODES}, got {self.project!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"continual.gamma must be in [0, 1], got {self.gamma}")
        if self.paper_faithful and self.sketch not in ("auto", "isvd_paper"):
            raise ConfigError(f"continual.paper_faithful uses the paper's iSVD; continual.sketch={self.sketch!r} "
                              "contradicts it (use auto or isvd_paper)")
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"continual.memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.isvd_buffer_columns is not None and self.isvd_buffer_columns < 1:
            raise ConfigError(f"continual.isvd_buffer_columns must be >= 1 or null, got {self.isvd_buffer_columns}")
        if not 0.0 < self.plan_rank_fraction <= 1.0:
            raise ConfigError(f"continual.plan_rank_fraction must be in (0, 1], got {self.plan_rank_fraction}")
        basis_dtype(self.basis_dtype)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualConfig:
        return _build(cls, data, "continual")

    def sketch_options(self) -> SketchOptions:
        return SketchOptions(kind="isvd_paper" if self.paper_faithful else self.sketch, gamma=self.gamma,
                             memory_budget_mb=self.memory_budget_mb, carry_gamma=self.isvd_carry_gamma,
                             max_rank=self.isvd_max_rank, buffer_columns=self.isvd_buffer_columns,
                             rank_fraction=self.plan_rank_fraction)


def _build(cls, data: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


class ContinualStrategy:
    """No-op base: plain fine-tuning. Subclasses override what they need."""

    name = "base"

    def begin_task(self, task_index: int, model: nn.Module, accelerator=None) -> None:
        pass

    def before_optimizer_step(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def end_task(self, task_index: int, model: nn.Module, capture_batches: Iterable[dict],
                 capture_forward: Callable[[dict], None], accelerator=None) -> None:
        """After task `task_index`: consume every batch of `capture_batches` (this rank's share of the images
        chosen by the caller; a strategy never subsamples them again) through `capture_forward`."""

    def bind(self, *, extractor: nn.Module, image_size: int) -> None:
        """The engine hands over the run's frozen feature extractor and image size before the first task."""

    def task_steps(self, task_index: int, steps: int) -> int:
        """Optimizer steps of a task (the configured budget; a training-free strategy returns 0)."""
        return steps

    def capture_images(self, configured: int | float) -> int | float:
        """How many training images `end_task` sees (count or fraction); default: `continual.capture.images`."""
        return configured

    def score_batch(self, model: nn.Module, extractor: nn.Module, x: torch.Tensor, eval_cfg, generator,
                    autocast=None):
        """A ScoredBatch when the strategy detects by other means than the model's reconstruction, else None.

        ``generator``: one torch.Generator per image of ``x`` (``eval.reconstruct.image_generators``): randomness
        drawn from image i's own generator keeps its score independent of the batch."""
        return None

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Explicit parameter groups of the trainable parameters (engine may pass them to the optimizer)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "name": self.name}

    def load_state_dict(self, state: dict) -> None:
        check_strategy_state(state, self.name)


def check_strategy_state(state: dict, name: str) -> None:
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"continual strategy state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    if state.get("name") != name:
        raise CheckpointError(f"continual strategy state was saved by strategy {state.get('name')!r}, "
                              f"this run uses {name!r}")


class NaiveStrategy(ContinualStrategy):
    """Fine-tuning task after task: the forgetting baseline."""

    name = "naive"


class JointStrategy(NaiveStrategy):
    """Joint training on all classes; the engine collapses the sequence into one task."""

    name = "joint"


class CDADStrategy(ContinualStrategy):
    """Gradient/update projection onto the orthogonal complement of the old tasks' input spaces."""

    name = "cdad"

    def __init__(self, cfg: ContinualConfig) -> None:
        self.cfg = cfg
        self.store = BasisStore(gamma=cfg.gamma)
        self.tasks_done = 0
        self.history: list[dict] = []
        self.frozen: list[str] = []
        self.saturated: list[str] = []  # protected layers with k = d, frozen for the current task
        self._projector: Projector | None = None
        self._pending_anchor: tuple[int, dict[str, torch.Tensor]] | None = None  # from a mid-task checkpoint
        self._current_task: int | None = None
        self._layers: tuple[int, dict[str, nn.Module]] | None = None

    # -- layers ----------------------------------------------------------------------------------------------------
    def protected_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        if self._layers is None or self._layers[0] != id(model):
            self._layers = (id(model), discover_protected(model, self.cfg.layer_patterns))
        return self._layers[1]

    # -- training hooks --------------------------------------------------------------------------------------------
    def begin_task(self, task_index: int, model: nn.Module, accelerator=None) -> None:
        deepspeed = self._check_backend(accelerator)
        self._close_projector()
        layers = self.protected_layers(model)
        if task_index > 0 and self.cfg.freeze_unprotected:
            self.frozen = freeze_unprotected(model, layers)
        self.saturated = []
        if self.store.bases:
            self._projector = Projector(layers, self.store.bases, self.cfg.project, complement=self.store.complement,
                                        deepspeed_master=deepspeed)
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

    def _check_backend(self, accelerator) -> bool:
        """Refuse backends where the projection would hit sharded weights; True under DeepSpeed ZeRO-1/2, whose
        optimizer keeps fp32 master weights that the update projection must write too."""
        kind = str(getattr(accelerator, "distributed_type", "") or "").upper()
        if "FSDP" in kind:
            raise ConfigError("continual.strategy=cdad does not support FSDP (protected weights are sharded "
                              "flat parameters); use DDP or DeepSpeed ZeRO-2")
        stage = zero_stage(accelerator)
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
        decay = 0.0 if (self.cfg.project == "grad" and self.store.bases) else weight_decay
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
    def end_task(self, task_index: int, model: nn.Module, capture_batches: Iterable[dict],
                 capture_forward: Callable[[dict], None], accelerator=None) -> None:
        if task_index < self.tasks_done:
            raise CdadError(f"cdad: end_task({task_index}) called again; the bases already include tasks "
                            f"0..{self.tasks_done - 1}")
        self._close_projector()  # no gradient hooks or stale anchors during the capture pass
        layers = self.protected_layers(model)
        rank, world = dist_info()
        sketches = self._new_sketches(layers, rank)
        images = self._capture(task_index, model, layers, sketches, capture_batches, capture_forward, rank, world)
        with full_precision():  # reductions and decompositions never in a caller's autocast dtype
            result = reduce_and_finalize(sketches, self._finalize)
        del sketches
        complement = {name for name, meta in result.info.items() if meta.get("stored") == "complement"}
        self.store = BasisStore(bases=result.bases, gamma=self.cfg.gamma, task=task_index, complement=complement)
        self.tasks_done = task_index + 1
        summary = self._summarise(task_index, layers, result, images, world)
        self.history.append(summary)
        if rank == 0:
            log.info("cdad: task %d bases: %d layers, k total %d, %.2f MB (%.2f%% of protected weights), "
                     "sha256 %s", task_index, len(result.bases), summary["k_total"], summary["bytes"] / 2 ** 20,
                     100 * summary["relative_to_weights"], result.digest)

    def _new_sketches(self, layers: dict[str, nn.Module], rank: int) -> dict[str, Sketch]:
        options = self.cfg.sketch_options()
        sketches = {}
        for name, module in layers.items():
            device = self.cfg.sketch_device or module.weight.device
            sketches[name] = make_sketch(input_dim(module), options, device=device)
            # Paper Eq. 6 streams M = [Û_{t-1}, X_t]: the old basis is the first block (once, on rank 0).
            if self.cfg.paper_faithful and rank == 0 and name in self.store.bases and self.store.rank(name) > 0:
                sketches[name].update(self.store.basis(name).to(device))
        return sketches

    def _capture(self, task_index, model, layers, sketches, capture_batches, capture_forward, rank, world) -> int:
        capture_cfg = self.cfg.capture
        was_training = model.training
        model.eval()
        images = 0
        try:
            with FeatureCapture(layers, sketches, capture_cfg.max_columns_per_block,
                                seed=capture_cfg.seed + 7919 * task_index, rank=rank,
                                sketch_device=self.cfg.sketch_device), torch.no_grad():
                for batch in capture_batches:  # already this rank's selection (see CaptureConfig.images)
                    capture_forward(batch)
                    images += len(batch["image"]) if "image" in batch else 1
        finally:
            model.train(was_training)
        return images

    def _finalize(self, name: str, sketch: Sketch) -> tuple[torch.Tensor, dict]:
        """Runs on the layer's owner rank: the merged basis of all tasks so far, in its smaller stored form
        (U, or its complement V when k > d/2; computed in float64, then cast to ``basis_dtype``)."""
        out_dtype = basis_dtype(self.cfg.basis_dtype)
        known = name in self.store.bases
        if isinstance(sketch, GramSketch) and not self.cfg.paper_faithful:
            old = self.store.bases[name] if known else None  # in its stored form: merged without forming U
            stored, is_complement, merge = gpm_merge_gram_compact(old, name in self.store.complement, sketch.gram(),
                                                                  self.cfg.gamma, sketch.n_columns)
            info = merge.to_dict()
        else:
            old = self.store.basis(name, torch.float64) if known else None
            if self.cfg.paper_faithful:
                U = sketch.basis(self.cfg.gamma).to(torch.float64)
                k_old = 0 if old is None else int(old.shape[1])
                info = {"d": sketch.d, "k_old": k_old, "k_new": int(U.shape[1]), "n_columns": sketch.n_columns}
            else:
                U, merge = gpm_merge(old, sketch.factors(), self.cfg.gamma, out_dtype=torch.float64)
                info = merge.to_dict()
            stored, is_complement = compact_form(U)
        info.update(sketch=sketch.kind, sketch_peak_bytes=sketch.peak_nbytes,
                    stored="complement" if is_complement else "basis")
        return stored.to(out_dtype).contiguous(), info

    def _summarise(self, task_index, layers, result, images: int, world: int) -> dict:
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
        return {"task": task_index, "digest": result.digest, "images": images_all, "images_this_rank": images,
                "k_total": sum(self.store.rank(n) for n in self.store.bases), "bytes": self.store.total_bytes(),
                "complement_layers": len(self.store.complement),
                "relative_to_weights": self.store.relative_to(weights), "layers_without_inputs": empty,
                "layers": result.info}

    # -- persistence -----------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Size and ranks of the current bases (plain data)."""
        return {"tasks_done": self.tasks_done, "bytes": self.store.total_bytes(),
                "k": {n: self.store.rank(n) for n in self.store.bases},
                "d": {n: self.store.dim(n) for n in self.store.bases},
                "complement": sorted(self.store.complement)}

    def export_bases(self, directory) -> Any:
        """Write the current bases as ``bases_task<t>.safetensors`` (atomic); call on one rank."""
        return self.store.save(directory, dtype=self.cfg.basis_dtype)

    def state_dict(self) -> dict:
        anchor = self._projector.anchor_state() if self._projector is not None else {}
        return {"format": STATE_FORMAT, "name": self.name, "tasks_done": self.tasks_done,
                "anchor": {"task": self._current_task, "weights": anchor} if anchor else None,
                "gamma": self.cfg.gamma, "task": self.store.task,
                "bases": {n: U.detach().cpu().clone() for n, U in self.store.bases.items()},
                "complement": sorted(self.store.complement),  # layers whose stored tensor is V = U⊥
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        check_strategy_state(state, self.name)
        try:
            bases = {str(n): U for n, U in state["bases"].items()}
            tasks_done, task = int(state["tasks_done"]), int(state["task"])
            complement = {str(n) for n in state.get("complement", [])}  # absent in states that stored U only
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"continual strategy state: missing or bad entry ({exc})") from exc
        if any(not isinstance(U, torch.Tensor) or U.dim() != 2 for U in bases.values()):
            raise CheckpointError("continual strategy state: every basis must be a 2-D tensor")
        if not complement <= set(bases):
            raise CheckpointError(f"continual strategy state: complement layers {sorted(complement - set(bases))[:5]} "
                                  "have no stored tensor")
        if float(state.get("gamma", self.cfg.gamma)) != self.cfg.gamma:
            log.warning("cdad: bases were built with gamma=%s, this run uses %s", state.get("gamma"), self.cfg.gamma)
        self._close_projector()
        self.store = BasisStore(bases=bases, gamma=self.cfg.gamma, task=task, complement=complement)
        self.tasks_done = tasks_done
        self.history = list(state.get("history", []))
        anchor = state.get("anchor")
        self._pending_anchor = (int(anchor["task"]), dict(anchor["weights"])) if anchor else None


def build_strategy(cfg: ContinualConfig | dict) -> ContinualStrategy:
    """The strategy ``cfg.strategy`` names."""
    if isinstance(cfg, dict):
        cfg = ContinualConfig.from_dict(cfg)
    if cfg.strategy == "naive":
        return NaiveStrategy()
    if cfg.strategy == "joint":
        return JointStrategy()
    if cfg.strategy == "knn":
        from cdad_dist.continual.knn import make_knn_strategy

        return make_knn_strategy(cfg)
    return CDADStrategy(cfg)
