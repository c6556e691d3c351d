"""Evaluate every class seen so far: reconstruct, anomaly maps, per-class metrics gathered over ranks, heat maps.

Each rank evaluates its own share of each class's test images (`eval_stream` splits them), keeps a mergeable metric
state, and the states are gathered so that every rank ends with the same numbers. Heat-map grids are drawn by the
main process from the examples it saw itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from cdad_dist.data.stream import eval_stream
from cdad_dist.eval.anomaly_map import extractor_from_config, image_scores
from cdad_dist.errors import ConfigError
from cdad_dist.eval.head_maps import MAP_KINDS, pool_scale
from cdad_dist.eval.metrics import ClassMetricAccumulator
from cdad_dist.eval.recon_quality import psnr
from cdad_dist.eval.report import save_heatmap_grid, write_report
from cdad_dist.eval.scoring import image_generators, score_with
from cdad_dist.faults import fault_point, poison_maps
from cdad_dist.progress import progress


class _Examples:
    """The first few normal and anomalous images a rank sees of a class, for the heat-map grid."""

    def __init__(self, per_kind: int):
        self.per_kind = per_kind
        self.rows: dict[int, list[tuple]] = {0: [], 1: []}

    def add(self, batch: dict, x_hat: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor) -> None:
        for i, label in enumerate(batch["label"].tolist()):
            bucket = self.rows[int(label > 0)]
            if len(bucket) < self.per_kind:
                # PSNR of x̂ vs x: how faithful the reconstruction is (on a normal image it should be high)
                db = float(psnr(batch["image"][i:i + 1], x_hat[i:i + 1].cpu())[0])
                title = f"{batch['defect'][i]} score {float(scores[i]):.3f}, PSNR {db:.1f} dB"
                bucket.append((batch["image"][i], x_hat[i].cpu(), maps[i].cpu(), batch["mask"][i], title))

    def save(self, path: Path, suptitle: str | None = None) -> None:
        rows = self.rows[0] + self.rows[1]
        if not rows:
            return
        images, recons, maps, masks, titles = zip(*rows)
        save_heatmap_grid(path, torch.stack(images), torch.stack(recons), torch.stack(maps), torch.stack(masks), titles,
                          suptitle)


class Evaluator:
    def __init__(self, cfg, data_cfg, image_size: int, accelerator, run_dir: Path):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.image_size = image_size
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.extractor = extractor_from_config(cfg.anomaly_map, device=accelerator.device)

    @torch.inference_mode()
    def evaluate(self, model, classes: list[str], *, after_task: int, scorer=None) -> dict[str, dict[str, float]]:
        """Metrics per class; `scorer` (a strategy's `score_batch`) may score batches instead of the model."""
        acc = self.accelerator
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, float]] = {}
        for cls in classes:
            state, others, examples = self._evaluate_class(model, cls, after_task, scorer)
            merged = ClassMetricAccumulator.from_states(cls, gather_object([state]), self.cfg.metrics)
            results[cls] = merged.compute()
            if self.compared_kinds(model):  # eval.map's own kind under its prefix: the same state, not a second one
                results[cls].update({f"{self.cfg.map}.{name}": v for name, v in results[cls].items()})
            for kind, other in others.items():  # the other kinds of compare_maps
                acc_kind = ClassMetricAccumulator.from_states(cls, gather_object([other]), self.cfg.metrics)
                results[cls].update({f"{kind}.{name}": v for name, v in acc_kind.compute().items()})
            if merged.n_nonfinite_images:
                acc.print(f"[eval] task {after_task} class {cls}: {merged.n_nonfinite_images} of {merged.n_images} "
                          "test images had NaN/inf anomaly maps; its metrics are NaN")
            if acc.is_main_process and self.cfg.heatmap_images > 0:
                safe = cls.replace("/", "_")
                examples.save(self.run_dir / "report" / "heatmaps" / f"task{after_task:02d}_{safe}.png",
                              f"{self.run_dir.name}: {cls} after task {after_task}")
        model.train(was_training)
        return results

    def _evaluate_class(self, model, cls: str, after_task: int,
                        scorer=None) -> tuple[dict, dict[str, dict], _Examples]:
        """This rank's metric state of eval.map, those of the other compared map kinds, and the examples."""
        acc = self.accelerator
        metric = ClassMetricAccumulator(cls, self.cfg.metrics)
        compared = {kind: ClassMetricAccumulator(cls, self.cfg.metrics)
                    for kind in self.compared_kinds(model) if kind != self.cfg.map}
        examples = _Examples(self.cfg.heatmap_images)
        stream = eval_stream(
            self.data_cfg.shards,
            [cls],
            split="test",
            batch_size=self.cfg.batch_size,
            image_size=self.image_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            limit=self.cfg.max_test_per_class,
        )
        seed = self.cfg.reconstruction.seed
        bar = progress(stream, desc=f"eval after task {after_task}: {cls} ({stream.num_samples} images on this rank)",
                       enabled=acc.is_local_main_process)
        for index, batch in enumerate(bar):
            fault_point("eval", after_task, index, acc.process_index)
            x = batch["image"].to(acc.device)
            # Noise per image, from the seed and the image's pixels: its score is the same in any batch, on any
            # rank count, after every task (common noise makes forgetting a paired comparison) and in predict.
            generator = image_generators(seed, batch["image"])
            scored = score_with(scorer, model, self.extractor, x, self.cfg, generator, acc.autocast)
            maps = poison_maps(scored.maps.cpu(), after_task, index, acc.process_index)  # CDAD_FAULT_NAN rehearsal
            metric.update(scored.scores.cpu(), maps, batch["label"], batch["mask"], names=batch["key"])
            if compared and scored.maps_by_kind is None:
                raise ConfigError("eval.compare_maps: the strategy scores by other means than the model's maps "
                                  "(e.g. knn); there are no feature / head maps to compare")
            for kind, acc_kind in compared.items():
                acc_kind.update(scored.scores_by_kind[kind].cpu(), scored.maps_by_kind[kind].cpu(), batch["label"],
                                batch["mask"], names=batch["key"])
            if acc.is_main_process:
                examples.add(batch, scored.x_hat, scored.maps, scored.scores)
        return metric.state_tensors(), {kind: m.state_tensors() for kind, m in compared.items()}, examples

    def compared_kinds(self, model) -> tuple[str, ...]:
        """Map kinds recorded beside eval.map (``eval.compare_maps`` with a segmentation head)."""
        if not self.cfg.compare_maps or getattr(model, "seg_head", None) is None:
            return ()
        return MAP_KINDS

    @torch.inference_mode()
    def calibrate_fusion(self, model, classes: list[str], scorer=None) -> dict[str, float] | None:
        """Pool this task's map scales (mean per-image max of the features and head maps on normal training
        images, all ranks) into the head's buffers, for ``eval.map: fused``; None without a head."""
        head = getattr(model, "seg_head", None)
        if head is None:
            return None
        acc, hs = self.accelerator, self.cfg.head_scoring
        stream = eval_stream(self.data_cfg.shards, classes, split="train", batch_size=self.cfg.batch_size,
                             image_size=self.image_size, rank=acc.process_index, world_size=acc.num_processes,
                             total=hs.calibration_images, seed=self.cfg.reconstruction.seed)
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # Σ max features, Σ max head, count
        was_training = model.training
        model.eval()
        try:
            for batch in stream:
                x = batch["image"].to(acc.device)
                generator = image_generators(self.cfg.reconstruction.seed, batch["image"])
                scored = score_with(scorer, model, self.extractor, x, self.cfg, generator, acc.autocast)
                if scored.maps_by_kind is None or "head" not in scored.maps_by_kind:
                    continue  # a strategy that scores by other means (knn) has no head map to fuse
                for i, kind in enumerate(("features", "head")):
                    sums[i] += image_scores(scored.maps_by_kind[kind], "max").double().sum()
                sums[2] += x.shape[0]
        finally:
            model.train(was_training)
        sums = acc.reduce(sums, "sum")
        pool_scale(head, (sums[:2] / sums[2].clamp_min(1)).to(head.map_scale.device), int(sums[2].item()))
        return {"features_scale": float(head.map_scale[0]), "head_scale": float(head.map_scale[1]),
                "images": int(head.map_scale_count)}

    def write_report(self, matrix, tasks: list[list[str]], extra: dict[str, Any]) -> dict[str, Path]:
        return write_report(self.run_dir, matrix, tasks, {"name": self.run_dir.name, **extra})
