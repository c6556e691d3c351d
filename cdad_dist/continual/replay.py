"""Experience replay on the strategy protocol: ``replay`` (fine-tuning + replay) and ``cdad+replay`` (projection +
replay).

After each task a bounded reservoir of every finished class's real training images (``continual.replay.per_class``,
a seeded uniform subset) is copied into a shard set of the run (``<run dir>/replay/``, data/replay_shards.py) —
or, with ``continual.replay.source: generative`` (ReplayCAD), that many images generated from the class's
compression into a frozen text-to-image LDM (continual/generative_replay.py) are written there instead; in
later tasks ``continual.replay.ratio`` of every training batch is drawn from it (the engine mixes the streams,
each seeded and resumable, split across ranks like any shard set). The engine knows none of this: the strategy
only answers ``training_sources`` and writes its buffer in ``end_task``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cdad_dist.continual.baselines import NaiveStrategy
from cdad_dist.continual.protocol import TrainingSource
from cdad_dist.continual.reducer import dist_info
from cdad_dist.continual.strategy import CDADStrategy
from cdad_dist.data.replay_shards import buffer_bytes, write_class_buffer
from cdad_dist.data.shards import load_manifest
from cdad_dist.errors import CheckpointError, ConfigError, ShardError

REPLAY_DIR = "replay"


class ReplayMixin:
    """The buffer half of a replay strategy; combine with a strategy class (``class X(ReplayMixin, Base)``)."""

    def __init__(self, cfg=None) -> None:
        super().__init__(cfg)
        self._tasks: list[list[str]] | None = None  # from plan_tasks: end_task(t) keeps task t's classes
        self._kept: list[str] = []  # finished classes in the buffer, in task order
        self._costs: dict[str, dict[str, Any]] = {}  # generative: compression / generation costs per class
        self._t2i = None  # generative: the frozen text-to-image model, loaded once

    def plan_tasks(self, sequence: list[list[str]]) -> list[list[str]]:
        self._tasks = super().plan_tasks(sequence)
        return self._tasks

    @property
    def replay_classes(self) -> list[str]:
        return list(self._kept)

    def buffer_dir(self) -> Path:
        if self.context.run_dir is None or self.context.shards is None:
            raise ConfigError(f"continual.strategy={self.name}: the replay buffer needs the run directory and the "
                              "training shards (the engine binds them)")
        return Path(self.context.run_dir) / REPLAY_DIR

    def training_sources(self, task_index: int, classes: list[str]) -> list[TrainingSource]:
        own = super().training_sources(task_index, classes)
        old = [c for c in self.replay_classes if c not in classes]
        if not old:
            return own
        ratio = self.cfg.replay.ratio
        return [TrainingSource(s.classes, s.weight * (1 - ratio), s.shards, s.name) for s in own] + [
            TrainingSource(tuple(old), ratio, str(self.buffer_dir()), "replay")]

    def end_task(self, task_index, model, capture_batches, capture_forward) -> None:
        super().end_task(task_index, model, capture_batches, capture_forward)
        tasks = self._tasks
        if tasks is None or task_index >= len(tasks):
            raise ConfigError(f"{self.name}: end_task({task_index}) before plan_tasks gave the task's classes")
        replay = self.cfg.replay
        rank, world = dist_info()
        if rank == 0:  # one writer; the copy is a function of (shards, seed, class), whoever writes it
            for cls in tasks[task_index]:
                if replay.source == "generative":
                    self._write_generated(cls)
                else:
                    write_class_buffer(self.context.shards, cls, replay.per_class, self.buffer_dir(), replay.seed)
        if world > 1:
            torch.distributed.barrier()
        self._kept = self.replay_classes + [c for c in tasks[task_index] if c not in self.replay_classes]

    def _write_generated(self, cls: str) -> None:
        """ReplayCAD for one finished class: compress it into the frozen generator, generate its replay images,
        write them as the class's replay shard (resumable: see generative_replay.py)."""
        from cdad_dist.continual.generative_replay import FrozenTextToImage, replay_class
        from cdad_dist.data.replay_shards import generated_samples, write_class_shard
        from cdad_dist.data.stream import eval_stream

        gen = self.cfg.replay.generative
        if self._t2i is None:
            self._t2i = FrozenTextToImage(gen.generator_path, self.context.backend.device)
        source = load_manifest(self.context.shards)
        size = source.get("image_size") or self.context.image_size
        stream = eval_stream(self.context.shards, [cls], split="train", batch_size=16, image_size=size,
                             rank=0, world_size=1)
        images = [(img.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype("uint8")
                  for batch in stream for img in batch["image"]]
        result = replay_class(self._t2i, gen, cls, images, self.cfg.replay.per_class, int(size),
                              self.buffer_dir() / "generative", log=print)
        write_class_shard(self.buffer_dir(), cls, generated_samples(cls, result.pop("images"), "generative"), source)
        self._costs[cls] = result

    def replay_summary(self) -> dict[str, Any]:
        sizes = buffer_bytes(self.buffer_dir()) if self.replay_classes and self.context.run_dir else {}
        out = {"source": self.cfg.replay.source, "per_class": self.cfg.replay.per_class,
               "ratio": self.cfg.replay.ratio, "classes": self.replay_classes,
               "bytes_per_class": {c: sizes.get(c) for c in self.replay_classes},
               "bytes_total": sum(v for v in sizes.values())}
        if self.cfg.replay.source == "generative":  # what ReplayCAD keeps per class, and what it cost
            out["generative"] = {c: self._costs.get(c) for c in self.replay_classes}
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "replay": self.replay_summary()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "replay_classes": self.replay_classes, "replay_costs": dict(self._costs)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k not in ("replay_classes", "replay_costs")})
        self._costs = dict(state.get("replay_costs", {}))
        kept = [str(c) for c in state.get("replay_classes", [])]
        if kept and self.context.run_dir is not None:
            self._check_buffer(kept)
        self._kept = kept

    def _check_buffer(self, kept: list[str]) -> None:
        """A resumed run must find every kept class in the buffer it wrote (one clear error otherwise)."""
        directory = self.buffer_dir()
        try:
            manifest = load_manifest(directory)
        except ShardError as exc:
            raise CheckpointError(f"replay buffer: {exc}; the checkpoint expects classes {kept}") from None
        missing = [c for c in kept if f"{c}/train" not in manifest["groups"]]
        if missing:
            raise CheckpointError(f"{directory / 'manifest.json'}: replay buffer lacks classes {missing} that the "
                                  "checkpoint kept")


class ReplayStrategy(ReplayMixin, NaiveStrategy):
    """Fine-tuning with experience replay: the classic rehearsal baseline."""

    name = "replay"


class CDADReplayStrategy(ReplayMixin, CDADStrategy):
    """CDAD's projection plus replay of real old-class images."""

    name = "cdad+replay"
