"""The contract between the engine and a continual strategy (docs/contracts.md, "Strategy protocol").

The engine knows no strategy by name: it asks the strategy which tasks to train (``plan_tasks``), how many steps
(``task_steps``), what to stream (``training_sources``, ``transform_batch``), what to add to the loss
(``extra_loss``), which images to pass after a task (``capture_plan``), and what to report (``summary``); it calls
the step hooks around every optimizer step. ``Backend`` describes the process group and device so that no
strategy imports the engine.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from cdad_dist.errors import CheckpointError

STATE_FORMAT = "cdad-strategy/1"


@dataclass(frozen=True)
class Backend:
    """Where training runs: ``distributed`` as Accelerate names it (NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP, ...),
    the DeepSpeed ZeRO stage (None outside DeepSpeed), world size, this process's rank and device."""

    distributed: str = "NO"
    zero_stage: int | None = None
    world: int = 1
    rank: int = 0
    device: str = "cpu"

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None


@dataclass
class StrategyContext:
    """What the engine hands a strategy once, before the first task (``bind``)."""

    extractor: nn.Module | None = None  # the run's frozen feature extractor (anomaly maps, knn banks)
    image_size: int | None = None
    run_dir: Path | None = None  # where a strategy may keep files of its own (replay shards)
    shards: str | None = None  # the run's training shard directory
    backend: Backend = field(default_factory=Backend)


@dataclass(frozen=True)
class CapturePlan:
    """Which of the finished task's training images ``end_task`` receives: ``images`` is a count over all ranks
    (int) or a fraction of each class (float), applied once by the engine's stream; ``perturbed`` adds each image's
    seeded NSA perturbation under ``batch["perturbed"]``; ``synthetic`` adds a synthetic anomaly of each image
    (``data.synthetic``) under ``batch["synthetic"]`` even when the model has no segmentation head (with one, the
    engine always adds them: they are the head's training inputs)."""

    images: int | float
    perturbed: bool = False
    synthetic: bool = False


@dataclass(frozen=True)
class TrainingSource:
    """One stream of a task's training batches: ``classes`` of the shard set in ``shards`` (None: the run's), and
    ``weight``, its share of every batch (the engine rounds the shares to whole samples per batch)."""

    classes: tuple[str, ...]
    weight: float = 1.0
    shards: str | None = None
    name: str = "task"


class ContinualStrategy(ABC):
    """Base of every strategy: plain fine-tuning behaviour for every optional hook; ``summary`` is required."""

    name: ClassVar[str] = "base"

    def __init__(self, cfg=None) -> None:
        self.cfg = cfg
        self.context = StrategyContext()

    # -- set-up -----------------------------------------------------------------------------------------------------
    def bind(self, context: StrategyContext) -> None:
        """The engine's run context (extractor, image size, run dir, shards, backend), before the first task."""
        self.context = context

    def plan_tasks(self, sequence: list[list[str]]) -> list[list[str]]:
        """The tasks this strategy trains, from the sequence's tasks (joint collapses them into one)."""
        return [list(task) for task in sequence]

    def task_steps(self, task_index: int, sequence_steps: list[int]) -> int:
        """Optimizer steps of planned task ``task_index``; ``sequence_steps[i]`` is the configured budget of the
        sequence's task i (a training-free strategy returns 0)."""
        return sequence_steps[task_index]

    # -- training ---------------------------------------------------------------------------------------------------
    def training_sources(self, task_index: int, classes: list[str]) -> list[TrainingSource]:
        """What the task's batches are drawn from; default: the task's own classes only."""
        return [TrainingSource(tuple(classes))]

    def transform_batch(self, batch: dict, task_index: int) -> dict:
        """A chance to change a training batch before the forward pass (default: unchanged)."""
        return batch

    def extra_loss(self, model: nn.Module, batch: dict, outputs: dict) -> torch.Tensor | None:
        """A term added to the model's loss (default: none)."""
        return None

    def begin_task(self, task_index: int, model: nn.Module) -> None:
        pass

    def before_optimizer_step(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Explicit parameter groups of the trainable parameters (the engine passes them to the optimizer)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    # -- after a task -----------------------------------------------------------------------------------------------
    def capture_plan(self, task_index: int) -> CapturePlan | None:
        """Which images ``end_task`` needs (None: none, the engine streams nothing)."""
        return None

    def end_task(self, task_index: int, model: nn.Module, capture_batches: Iterable[dict],
                 capture_forward: Callable[[dict], None]) -> None:
        """After task ``task_index``: ``capture_batches`` is this rank's share of the images ``capture_plan`` asked
        for (a strategy never subsamples them again); ``capture_forward(batch)`` runs the model's capture passes."""

    # -- evaluation and reporting -------------------------------------------------------------------------------------
    def score_batch(self, model: nn.Module, extractor: nn.Module, x: torch.Tensor, eval_cfg, generator,
                    autocast=None):
        """A ScoredBatch when the strategy detects by other means than the model's reconstruction, else None.

        ``generator``: one torch.Generator per image of ``x`` (``eval.reconstruct.image_generators``)."""
        return None

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Plain data about what the strategy holds after the tasks so far; lands in results.json / results.md."""

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


def build_strategy(cfg) -> ContinualStrategy:
    """The strategy ``cfg.strategy`` names, from the registry (``cfg``: a ContinualConfig or its dict)."""
    from cdad_dist.continual.config import ContinualConfig
    from cdad_dist.continual.registry import STRATEGY_REGISTRY, resolve

    if isinstance(cfg, dict):
        cfg = ContinualConfig.from_dict(cfg)
    return resolve(STRATEGY_REGISTRY, cfg.strategy, "continual.strategy")(cfg)
