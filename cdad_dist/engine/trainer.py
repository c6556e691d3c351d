"""The continual task loop under Accelerate, readable in one sitting.

for each task t of the sequence:
    1. stream t's training shards (each rank its own part) with NSA perturbation
    2. train U-Net + AMN; the continual strategy sees every optimizer step
    3. strategy.end_task: capture protected-layer inputs on t's images, reduce across ranks into bases
    4. evaluate every class seen so far -> row t of the accuracy matrix
    5. save an atomic checkpoint and the report
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from cdad_dist.config import RunConfig, config_to_dict
from cdad_dist.continual.capture import make_capture_forward
from cdad_dist.continual.protocol import CapturePlan, StrategyContext, TrainingSource, build_strategy
from cdad_dist.data.perturb import NSAPerturber
from cdad_dist.data.synthetic import SyntheticAnomalies
from cdad_dist.data.sequences import resolve_sequence
from cdad_dist.data.shards import manifest_classes
from cdad_dist.data.stream import (StreamConfig, concat_batches, eval_stream, split_batch_size, steps_per_epoch,
                                   train_stream)
from cdad_dist.engine.accel import describe_backend, fill_deepspeed_config, make_accelerator
from cdad_dist.engine.checkpoint import (
    CheckpointRef,
    latest_checkpoint,
    read_scheduler_state,
    read_state,
    read_strategy_state,
    resolve_task_end,
    save_checkpoint,
)
from cdad_dist.engine.data_prep import ensure_shards
from cdad_dist.engine.latent_calibration import calibrate_latents, needs_calibration
from cdad_dist.engine.run_dir import prepare_run_dir
from cdad_dist.errors import CheckpointError, ConfigError, RunWriteError
from cdad_dist.eval.evaluator import Evaluator
from cdad_dist.eval.matrix import AccuracyMatrix
from cdad_dist.faults import fault_point
from cdad_dist.progress import progress
from cdad_dist.models.presets import build_model, resolve_config


@dataclass
class Position:
    """Where a (resumed) run starts: task index, optimizer steps already done in it, and what is done."""

    task: int = 0
    step: int = 0
    task_done: bool = False


def task_slice(spec: str | None, n_tasks: int) -> range:
    """`--tasks 1:3` runs tasks 1 and 2 (one job per task on clusters); None runs all."""
    if spec is None:
        return range(n_tasks)
    try:
        lo, colon, hi = spec.partition(":")
        start = int(lo) if lo else 0
        if hi:
            stop = int(hi)
        else:  # "2" is task 2 alone, "2:" runs to the end
            stop = n_tasks if colon else start + 1
    except ValueError:
        raise ConfigError(f"tasks={spec!r}: expected START:STOP, e.g. 1:3") from None
    if not 0 <= start < stop <= n_tasks:
        raise ConfigError(f"tasks={spec!r}: out of range for a sequence of {n_tasks} task(s)")
    return range(start, stop)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def step_generator(seed: int, task: int, step: int, rank: int) -> torch.Generator:
    """Noise and timesteps of one step depend only on (seed, task, step, rank): resume reproduces them exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + task) * 10_000_019 + step) * 131 + rank)


class ContinualTrainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False):
        self.cfg = cfg
        self.accelerator = make_accelerator(
            mixed_precision=cfg.train.mixed_precision,
            grad_accum=cfg.train.grad_accum,
            project_dir=str(cfg.run_dir),
        )
        acc = self.accelerator
        self.log = acc.print
        self.manifest = ensure_shards(cfg.data, acc, self.log)
        sequence = resolve_sequence(cfg.sequence, available_classes=manifest_classes(self.manifest))
        self.sequence_tasks = sequence.tasks
        self.strategy = build_strategy(cfg.continual)
        self.tasks = self.strategy.plan_tasks(sequence.tasks)  # e.g. joint: every class of the sequence at once
        task_slice(cfg.tasks, len(self.tasks))  # a bad --tasks fails before the run directory exists
        self.run_dir = prepare_run_dir(cfg, self.tasks, resume=resume, accelerator=acc)
        self.ckpt_root = self.run_dir / "checkpoints"
        acc.init_trackers("tb", config=_flat_hparams(config_to_dict(cfg)))

        set_seed(cfg.train.seed)  # python, numpy and torch RNGs on every rank
        self.model = build_model(cfg.model).to(acc.device)
        self.matrix = AccuracyMatrix()
        self.image_size = resolve_config(cfg.model).image_size
        self.evaluator = Evaluator(cfg.eval, cfg.data, self.image_size, acc, self.run_dir)
        self.strategy.bind(StrategyContext(extractor=self.evaluator.extractor, image_size=self.image_size,
                                           run_dir=self.run_dir, shards=cfg.data.shards,
                                           backend=describe_backend(acc)))
        self.global_step = 0
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.wrapped_model: torch.nn.Module | None = None  # the current task's DDP module / DeepSpeed engine
        self.resume_from: CheckpointRef | None = latest_checkpoint(self.ckpt_root, self.log) if resume else None
        self.position = self._restore(self.resume_from) if self.resume_from else Position()
        self.replay_tasks: list[int] = []  # finished tasks of an init_from run whose end_task this strategy replays
        if self.resume_from is None and cfg.train.init_from:
            self.position = self._init_from(cfg.train.init_from)

    # ------------------------------------------------------------------ resume
    def _restore(self, ref: CheckpointRef) -> Position:
        state = read_state(ref.path)
        self.log(f"resuming from {ref.path.name}")
        self.matrix = AccuracyMatrix.from_dict(state["matrix"])
        self.strategy.load_state_dict(read_strategy_state(ref.path))
        self.global_step = state["global_step"]
        # Weights now; optimizer/scheduler/RNG are loaded after `prepare` when resuming mid-task.
        self.model.load_state_dict(load_file(str(ref.path / "model.safetensors")), strict=True)
        if ref.task_end:
            return Position(task=ref.task + 1, step=0)
        return Position(task=ref.task, step=ref.step, task_done=state.get("training_done", False))

    def _init_from(self, source: str) -> Position:
        """Start after another run's task end: its weights and accuracy rows, then this run's strategy replays
        `end_task` for the finished tasks (for CDAD: the basis of each on its own images, with these weights; exact
        for one finished task, the usual case of a shared base task)."""
        ref = resolve_task_end(source)
        state = read_state(ref.path)
        done = ref.task + 1
        finished = (state.get("tasks") or [])[:done]
        if finished != self.tasks[:done] or done >= len(self.tasks):
            raise CheckpointError(f"train.init_from={source}: its finished tasks {finished} are not a proper prefix "
                                  f"of this run's tasks {self.tasks}")
        if state.get("model_preset") != self.cfg.model.preset:
            raise CheckpointError(f"train.init_from={source}: model preset {state.get('model_preset')!r}, this run "
                                  f"uses {self.cfg.model.preset!r}")
        weights = ref.path / "model.safetensors"
        try:
            self.model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights}: does not fit this run's model: {str(exc).splitlines()[0]}") from None
        self.matrix = AccuracyMatrix.from_dict(state["matrix"])
        self.global_step = state["global_step"]
        self.replay_tasks = list(range(done))
        self.log(f"starting after task {ref.task} of {ref.path}")
        return Position(task=done)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        for t in self.replay_tasks:
            self.strategy.end_task(t, self.model, self.capture_batches(self.tasks[t], t), self.capture_forward(t))
        for t in task_slice(self.cfg.tasks, len(self.tasks)):
            if t < self.position.task:
                continue
            self.run_task(t)
        self.accelerator.end_training()
        return self.matrix.to_dict()

    def sequence_steps(self) -> list[int]:
        """The configured step budget of each task of the sequence (the strategy turns it into its own tasks')."""
        train = self.cfg.train
        budget = []
        for i, classes in enumerate(self.sequence_tasks):
            epochs = train.base_epochs if i == 0 else train.incremental_epochs
            if epochs > 0:
                per_epoch = steps_per_epoch(self.manifest, classes, self.cfg.data.batch_size * train.grad_accum,
                                            self.accelerator.num_processes)
                budget.append(max(1, round(epochs * per_epoch)))
            else:
                budget.append(train.base_steps if i == 0 else train.incremental_steps)
        return budget

    def task_steps(self, t: int) -> int:
        return self.strategy.task_steps(t, self.sequence_steps())

    def run_task(self, t: int) -> None:
        acc, cfg = self.accelerator, self.cfg
        classes = self.tasks[t]
        steps = self.task_steps(t)
        resuming_here = self.resume_from is not None and self.position.task == t and not self.resume_from.task_end
        start_step = self.position.step if resuming_here else 0
        self.log(f"task {t}: classes {classes}, {steps} steps" + (f" (from step {start_step})" if start_step else ""))

        if needs_calibration(self.model, cfg.model.latent_scaling):  # first task of a fresh run only
            calibrate_latents(self.model, self.train_images(classes), acc, self.log)
        self.strategy.begin_task(t, self.model)
        param_groups = self.strategy.optimizer_param_groups(self.model, cfg.train.weight_decay)
        trainable = [p for group in param_groups for p in group["params"]]
        if cfg.train.optimizer == "sgd":  # GPM's guarantee for `project: grad` assumes SGD
            optimizer = torch.optim.SGD(param_groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
        else:
            optimizer = torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
        # Not prepared by Accelerate on purpose: its scheduler wrapper steps once per process, which would make
        # the warm-up length depend on the number of ranks.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.warmup_steps, steps, cfg.train.lr_schedule)
        )
        acc.free_memory()  # also destroys the previous task's DeepSpeed engine
        fill_deepspeed_config(acc, micro_batch_size=cfg.data.batch_size, max_grad_norm=cfg.train.max_grad_norm)
        ddp_model, optimizer = acc.prepare(self.model, optimizer)
        self.wrapped_model = ddp_model
        self.scheduler = scheduler
        if resuming_here:
            acc.load_state(str(self.resume_from.path))
            scheduler_state = read_scheduler_state(self.resume_from.path)
            if scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)

        if not (resuming_here and self.position.task_done):
            self.train_task(t, ddp_model, optimizer, scheduler, trainable, steps, start_step)
            self.save(t, steps, task_end=False, training_done=True)
        self.strategy.end_task(t, self.model, self.capture_batches(classes, t), self.capture_forward(t))
        scales = self.evaluator.calibrate_fusion(self.model, classes, scorer=self.strategy.score_batch)
        if scales is not None:
            self.log(f"task {t}: fused-map scales features {scales['features_scale']:.4g}, head "
                     f"{scales['head_scale']:.4g} (normal training images so far: {scales['images']})")
        results = self.evaluator.evaluate(self.model, self.seen_classes(t), after_task=t,
                                          scorer=self.strategy.score_batch)
        for cls, metrics in results.items():
            for metric, value in metrics.items():
                self.matrix.record(metric, t, cls, value)
        self.log_task_metrics(t)
        self.save(t, steps, task_end=True)
        if acc.is_main_process:
            self.evaluator.write_report(self.matrix, self.tasks, self.strategy_summary())

    def seen_classes(self, t: int) -> list[str]:
        return [c for task in self.tasks[: t + 1] for c in task]

    def train_task(self, t, ddp_model, optimizer, scheduler, trainable, steps: int, start_step: int) -> None:
        acc, cfg = self.accelerator, self.cfg
        batches = self.training_batches(t, start_step)
        ddp_model.train()
        self.loss_balance = LossBalanceWatch(cfg.train.loss_balance_warn, cfg.model.lambda_amn, self.log,
                                             cfg.model.amn_loss)
        bad_in_a_row = 0
        bar = progress(range(start_step, steps), desc=f"task {t} training", total=steps, initial=start_step,
                       enabled=acc.is_local_main_process, unit="step")
        tick = time.perf_counter()
        for step in bar:
            fault_point("train", t, step, acc.process_index)
            info = self.train_step(ddp_model, optimizer, scheduler, trainable, batches, t, step)
            bad_in_a_row = 0 if info["finite"] else bad_in_a_row + 1
            if bad_in_a_row > cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"task {t} step {step}: {bad_in_a_row} consecutive non-finite losses; lower train.lr or use "
                    "fp32 (train.mixed_precision=no)"
                )
            self.global_step += 1
            self.loss_balance.check(info, t, step)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                logs = {f"train/{k}": v for k, v in info.items() if k != "finite"}
                logs["train/lr"] = scheduler.get_last_lr()[0]
                logs["train/steps_per_s"] = cfg.train.log_every / max(elapsed, 1e-9)
                acc.log(logs, step=self.global_step)
                bar.set_postfix(loss=f"{info['loss']:.4f}")
            every = cfg.train.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < steps:
                self.save(t, step + 1, task_end=False)

    def training_batches(self, t: int, start_step: int) -> Iterator[dict]:
        """Task t's batches from the strategy's sources (default: the task's classes), each source its own
        seeded, resumable stream with its share of every batch (e.g. replayed old classes)."""
        cfg = self.cfg
        sources: list[TrainingSource] = self.strategy.training_sources(t, self.tasks[t])
        sizes = split_batch_size(cfg.data.batch_size, [s.weight for s in sources])
        streams = []
        for i, (source, size) in enumerate(zip(sources, sizes)):
            if size == 0:
                continue
            stream_cfg = StreamConfig(batch_size=size, image_size=self.image_size, num_workers=cfg.data.num_workers,
                                      shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed + 1000 * t + 7919 * i)
            streams.append(iter(train_stream(
                source.shards or cfg.data.shards, list(source.classes), cfg=stream_cfg,
                perturber=NSAPerturber(cfg.data.nsa), rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes, skip_batches=start_step * cfg.train.grad_accum,
                synthesizer=self.synthesizer())))
        if len(streams) == 1:
            return streams[0]
        return (concat_batches([next(s) for s in streams]) for _ in itertools.count())

    def synthesizer(self, wanted: bool = False) -> SyntheticAnomalies | None:
        """Synthetic anomalies (data.synthetic) when the model has a segmentation head (its training inputs) or
        the caller asks for them (``wanted``: a capture plan's ``synthetic``)."""
        if getattr(self.model, "seg_head", None) is None and not wanted:
            return None
        return SyntheticAnomalies(self.cfg.data.synthetic, self.cfg.data.nsa)

    def train_step(self, ddp_model, optimizer, scheduler, trainable, batches, t: int, step: int) -> dict[str, Any]:
        """One optimizer step: `grad_accum` micro-batches, clipping, the strategy's hooks around the step.

        Under DeepSpeed, Accelerate clips and steps the engine inside `backward` of the last micro-batch, and
        `clip_grad_norm_`/`optimizer.step()`/`zero_grad()` are no-ops; the strategy's hooks are therefore placed
        before that backward and after it, which brackets the real step under every backend.
        """
        acc, cfg = self.accelerator, self.cfg
        totals: dict[str, float] = {}
        finite_all = True
        for micro in range(cfg.train.grad_accum):
            batch = self.strategy.transform_batch(next(batches), t)
            generator = step_generator(cfg.train.seed, t, step * cfg.train.grad_accum + micro, acc.process_index)
            with acc.accumulate(ddp_model):
                synthetic = {k: batch[k].to(acc.device) for k in ("synthetic", "synthetic_mask") if k in batch}
                out = ddp_model(
                    batch["image"].to(acc.device), batch["perturbed"].to(acc.device), generator=generator,
                    **synthetic)
                extra = self.strategy.extra_loss(self.model, batch, out)
                if extra is not None:  # the strategy's own term (e.g. a distillation loss), logged on its own
                    out = {**out, "loss": out["loss"] + extra, "strategy_loss": extra}
                # Every rank must take the same decision, or DDP's collectives would hang.
                finite = acc.reduce(torch.isfinite(out["loss"].detach()).float().reshape(1), "min").item() > 0
                finite_all = finite_all and finite
                if acc.sync_gradients and finite_all:
                    self.strategy.before_optimizer_step(self.model)
                if finite:
                    acc.backward(out["loss"])
                if acc.sync_gradients:
                    if finite_all:
                        # the head is clipped on its own: its gradient never rescales the diffusion model's step
                        for group in self.model.clip_groups(trainable):
                            acc.clip_grad_norm_(group, cfg.train.max_grad_norm)
                        optimizer.step()
                        self.strategy.after_optimizer_step(self.model)
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / cfg.train.grad_accum
        totals["finite"] = finite_all
        return totals

    # ------------------------------------------------------------------ basis capture
    def capture_forward(self, t: int) -> Callable[[dict], None]:
        acc = self.accelerator
        forward = make_capture_forward(
            self.model, self.cfg.continual.capture, self.cfg.eval.reconstruction, device=acc.device
        )
        captured = 0

        def capture_forward(batch: dict) -> None:
            nonlocal captured
            fault_point("capture", t, captured, acc.process_index)
            captured += 1
            with acc.autocast():  # the run's compute dtype, as in training and evaluation
                forward(batch)

        return capture_forward

    def train_images(self, classes: list[str]):
        """Every training image of `classes` once (each rank its share), unperturbed."""
        return eval_stream(self.cfg.data.shards, classes, split="train", batch_size=self.cfg.eval.batch_size,
                           image_size=self.image_size, rank=self.accelerator.process_index,
                           world_size=self.accelerator.num_processes)

    def capture_batches(self, classes: list[str], t: int):
        """This rank's share of the images the strategy's capture plan asks for (nothing without a plan)."""
        plan: CapturePlan | None = self.strategy.capture_plan(t)
        if plan is None:
            return []
        images = plan.images
        stream = eval_stream(
            self.cfg.data.shards,
            classes,
            split="train",
            batch_size=self.cfg.eval.batch_size,
            image_size=self.image_size,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            total=images if isinstance(images, int) else None,  # the one place the selection is applied
            fraction=images if isinstance(images, float) else None,
            seed=self.cfg.continual.capture.seed,
            perturber=NSAPerturber(self.cfg.data.nsa) if plan.perturbed else None,
            synthesizer=self.synthesizer(plan.synthetic),  # captured on their own pass (make_capture_forward)
        )
        return progress(stream, desc=f"task {t} basis capture ({stream.num_samples} images on this rank)",
                        enabled=self.accelerator.is_local_main_process)

    # ------------------------------------------------------------------ bookkeeping
    def save(self, t: int, step: int, *, task_end: bool, training_done: bool = False) -> None:
        state = {
            "task": t,
            "step": step,
            "task_end": task_end,
            "training_done": training_done or task_end,
            "global_step": self.global_step,
            "tasks": self.tasks,
            "model_preset": self.cfg.model.preset,
            "matrix": self.matrix.to_dict(),
        }
        save_checkpoint(
            self.accelerator,
            self.ckpt_root,
            task=t,
            step=step,
            task_end=task_end,
            state=state,
            strategy_state=self.strategy.state_dict(),
            scheduler_state=self.scheduler.state_dict() if self.scheduler is not None else None,
            keep_last=self.cfg.train.keep_last,
            model=self.wrapped_model,
        )

    def strategy_summary(self) -> dict[str, Any]:
        return {"strategy": self.cfg.continual.strategy, "strategy_summary": self.strategy.summary()}

    def log_task_metrics(self, t: int) -> None:
        for metric in ("image_auroc", "pixel_auroc"):
            row = self.matrix.row(metric, t)
            if row:
                mean = sum(row.values()) / len(row)
                self.accelerator.log({f"eval/{metric}_mean": mean}, step=self.global_step)
                per_class = ", ".join(f"{c}={v:.3f}" for c, v in row.items())
                self.log(f"after task {t}: {metric} mean {mean:.4f} ({per_class})")


class LossBalanceWatch:
    """Warns (once per run) when the λ·AMN term and the ε term differ by more than `factor`: the clipped gradient
    then serves one objective only (seen: AMN 16957 vs ε 0.99 at the start of a colour task after grey ones).

    Under the scale-free ``normalized`` AMN loss a *small* AMN term is not an imbalance but the AMN having met its
    target (it falls below ε/100 within ~20 steps of every healthy run, and the AMN still learns through ε), so
    only a dominating AMN term is reported there; under ``mse`` a small term can be the features' scale, and both
    directions are."""

    def __init__(self, factor: float, lambda_amn: float, log, amn_loss: str = "normalized") -> None:
        self.factor, self.lambda_amn, self.log = factor, lambda_amn, log
        self.both_ways = amn_loss != "normalized"
        self.warned = False

    def check(self, info: dict[str, Any], t: int, step: int) -> None:
        if self.warned or not self.factor or "amn_loss" not in info or not info.get("finite", True):
            return
        amn, eps = self.lambda_amn * info["amn_loss"], info["eps_loss"]
        if amn <= 0 or eps <= 0:
            return
        ratio = amn / eps
        if ratio > self.factor or (self.both_ways and ratio < 1 / self.factor):
            self.warned = True
            self.log(f"warning: task {t} step {step}: loss terms out of balance: lambda*AMN {amn:.4g} vs eps "
                     f"{eps:.4g} (ratio {ratio:.3g}, limit {self.factor:g}; train.loss_balance_warn); "
                     "model.amn_loss=normalized keeps the AMN term scale-free")


def _flat_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def train(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the configured sequence; a failed write (read-only output, full disk)
    becomes a :class:`RunWriteError` that names the path, what is saved and how to go on."""
    try:
        return ContinualTrainer(cfg, resume=resume).run()
    except OSError as err:
        raise RunWriteError(_write_failure(cfg, err)) from err


def _write_failure(cfg: RunConfig, err: OSError) -> str:
    what = f"{err.filename}: {err.strerror}" if err.filename else str(err)
    ckpt_root = cfg.run_dir / "checkpoints"
    try:
        last = latest_checkpoint(ckpt_root, log=lambda *_: None) if ckpt_root.is_dir() else None
    except (OSError, CheckpointError):
        last = None
    saved = f"the newest complete checkpoint, {last.path}, is intact" if last else "no checkpoint was written yet"
    return (f"cannot write {what}; {saved} (checkpoints are written atomically). Free space or fix permissions, "
            f"then run the same command with --resume.")


