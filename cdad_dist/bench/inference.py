"""``cdad bench inference``: latency and detection quality of the reconstruction modes, on one model, in one run.

Modes: ``ddim`` (``ddim_steps`` U-Net calls, default 10, from the run's ``start_t``), ``one_step`` (one U-Net
call) and ``fused`` (two noise scales in one batched U-Net call), everything else — AMN condition, anomaly-map
extractor, image size, test images, noise seeds — identical. Each mode scores the same preloaded test images
(decoding excluded) with ``scoring.score_batch``, the function ``cdad predict`` uses; after one untimed warm-up
batch per mode, ``repeats`` timed passes run with the modes interleaved batch by batch (rotating order) and the
median pass is reported (per batch the median over the passes, summed), per image, for three spans:

- ``denoise``: what the mode itself does (noising, U-Net calls, scheduler updates) — the issue's target
  (``one_step`` ≥ 8× faster than ``ddim``-10) is checked here, the only span the mode changes;
- ``reconstruction``: x → x̂, adding the first-stage encode/decode and the AMN condition, paid once per image by
  every mode;
- ``end to end``: adding the reference decode D(E(x)) and the anomaly maps.

Speed-ups are ratios of those medians against ``ddim``. Because the shared stages bound the last two ratios
whatever the implementation, the benchmark also counts each stage's multiply-accumulates (``bench/flops.py``) for
the measured model and, in the full run, for the ``sd15`` architecture at 256 px, and prints the ratio bounds
they imply. Image/pixel AUROC: per class (``ClassMetricAccumulator``), averaged over the classes; from the first
timed pass (the noise is seeded, so every pass gives the same maps).

The model: by default a ``tiny`` model trained here with the regular engine on task 0 of ``demo-3x2``
(carpet + bottle) of freshly generated demo data, with ``configs/demo.yaml``'s settings; ``quick`` trains
``QUICK_STEPS`` steps at 32 px, the full benchmark the demo's base-task budget at its 64 px. The trained run is
kept in ``out_dir`` under a name derived from its settings and reused by the next run with the same settings.
Or pass ``run_dir`` (and ``task``) to measure an existing run on the test images of every class it has learned
up to that task, read from its ``data.shards`` (a relative path there is relative to the current directory).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from cdad_dist.bench.flops import speedup_bounds, stage_gmacs
from cdad_dist.config import DEFAULT_CONFIG, EvalConfig, load_config
from cdad_dist.data.demo import make_demo_dataset
from cdad_dist.data.sequences import resolve_sequence
from cdad_dist.data.stream import eval_stream
from cdad_dist.engine.checkpoint import read_state, select_task_end
from cdad_dist.engine.run_dir import check_reusable
from cdad_dist.errors import CheckpointError, ConfigError
from cdad_dist.eval.metrics import ClassMetricAccumulator
from cdad_dist.eval.predict import LoadedRun, load_run
from cdad_dist.eval.reconstruct import ReconstructionConfig
from cdad_dist.eval.scoring import image_generators, score_batch

QUICK_STEPS = 300
SPANS = ("denoise", "recon", "total")  # see the module docstring: denoising ⊂ reconstruction ⊂ end to end
TIMED = SPANS + ("head",)  # the segmentation head's forward, outside the three (0 without a head)
DEMO_TASK0 = ["demo/carpet", "demo/bottle"]  # task 0 of demo-3x2


@dataclass
class InferenceBenchConfig:
    config: str = str(DEFAULT_CONFIG)     # the run config (dataset, model, evaluation) of the measured model
    train_steps: int | None = None        # None: the config's base-task budget (train.base_steps)
    image_size: int | None = None         # None: the config's (the tiny preset's 64 px)
    classes: list[str] | None = None      # None: the first task of the config's sequence
    ddim_steps: int = 10
    repeats: int = 5
    batch_size: int = 16
    max_test_per_class: int | None = None  # None: every test image of the class
    run_dir: str | None = None            # measure this run instead of training one
    task: str = "latest"
    # Architectures whose stage costs are counted besides the measured model (random weights, CPU; sd15 takes
    # ~20 s and ~4 GB): the ratio bounds of the paper's model.
    count_presets: tuple[str, ...] = ("sd15",)
    seg_head: bool = True  # train the model with the segmentation head, so its forward is timed as well
    # Extra rows: the run's own mode with reconstruction.samples = K (the mean map of K noise draws), e.g.
    # "one_step×4": what K draws buy in detection and cost in time, on the same images.
    samples: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in self.samples):
            raise ConfigError(f"bench inference: --samples takes whole numbers >= 2, got {list(self.samples)}")

    @classmethod
    def quick(cls, config: str = DEFAULT_CONFIG) -> InferenceBenchConfig:
        return cls(config=config, train_steps=QUICK_STEPS, image_size=32, repeats=3, count_presets=())

    def task_classes(self) -> list[str]:
        if self.classes is not None:
            return list(self.classes)
        run_cfg = load_config(self.config)
        return list(resolve_sequence(run_cfg.sequence).tasks[0])


# -- measuring ---------------------------------------------------------------------------------------------------
def mode_configs(base: ReconstructionConfig, ddim_steps: int = 10,
                 samples: Sequence[int] = ()) -> dict[str, ReconstructionConfig]:
    """The three modes from one run's reconstruction settings (start_t, t values, seed kept), each with one
    draw, then the run's own mode with each K of ``samples`` draws (named e.g. ``one_step×4``)."""
    single = replace(base, samples=1)
    modes = {
        "ddim": replace(single, mode="ddim", steps=ddim_steps),
        "one_step": replace(single, mode="one_step"),
        "fused": replace(single, mode="fused"),
    }
    for k in samples:
        modes[f"{base.mode}×{k}"] = replace(modes[base.mode], samples=k)
    return modes


def _class_mean(per_class: dict[str, dict[str, float]], metric: str) -> float:
    values = [m[metric] for m in per_class.values()]
    return sum(values) / len(values) if values else float("nan")


def _rotated(names: list[str], k: int) -> list[str]:
    return names[k % len(names):] + names[: k % len(names)]


def measure_modes(model, extractor, batches: Sequence[dict], eval_cfg: EvalConfig,
                  modes: dict[str, ReconstructionConfig], *, repeats: int = 3, reference: str = "ddim",
                  seed: int = 0) -> dict[str, Any]:
    """Time every mode over the same batches and compute its metrics; speed-ups are against ``reference``.

    ``batches``: dicts with ``x`` (B×3×H×W on the model's device), ``label`` (B), ``mask`` (B×1×H×W) and
    ``cls`` (one class name per batch). The modes are interleaved batch by batch (in rotating order), so a burst
    of load from another process slows every mode alike; a batch's time is its median over the ``repeats``, and
    a mode's time the sum of those medians (the median pass, robust to a stalled pass). Returns per mode the
    passes' totals (seconds, for reference), the median-pass time per image (ms) of the denoising, the
    reconstruction and end to end, per-class metrics and their means, and ``speedup_*`` = reference time / mode
    time.
    """
    if reference not in modes or repeats < 1 or not batches:
        raise ValueError(f"measure_modes: need the reference mode {reference!r} among {list(modes)}, "
                         f"repeats >= 1 and at least one batch")
    n_images = sum(int(b["x"].shape[0]) for b in batches)
    names = list(modes)
    cfgs = {name: replace(eval_cfg, reconstruction=modes[name]) for name in names}
    for name in names:  # warm-up: first-call allocations and lazy initialisation are not part of the latency
        score_batch(model, extractor, batches[0]["x"], cfgs[name], image_generators(seed, batches[0]["x"]))
    # times[name][span][batch][repeat]
    times = {name: {span: [[] for _ in batches] for span in TIMED} for name in names}
    metrics: dict[str, dict[str, ClassMetricAccumulator]] = {name: {} for name in names}
    for r in range(repeats):
        for index, batch in enumerate(batches):
            for name in _rotated(names, r + index):
                noise = image_generators(seed, batch["x"])  # fresh per call: every repeat draws the same noise
                scored = score_batch(model, extractor, batch["x"], cfgs[name], noise)
                times[name]["denoise"][index].append(scored.denoise_s)
                times[name]["recon"][index].append(scored.recon_s)
                times[name]["total"][index].append(scored.recon_s + scored.map_s)
                times[name]["head"][index].append(scored.head_s)
                if r == 0:  # the noise is seeded: every repeat gives the same maps
                    metrics[name].setdefault(batch["cls"], ClassMetricAccumulator(batch["cls"], eval_cfg.metrics)).update(
                        scored.scores.cpu(), scored.maps.cpu(), batch["label"], batch["mask"])
    results: dict[str, Any] = {}
    for name in names:
        per_class = {cls: acc.compute() for cls, acc in metrics[name].items()}
        median_pass = {span: sum(statistics.median(t) for t in times[name][span]) for span in TIMED}
        results[name] = {
            "reconstruction": asdict(modes[name]),
            **{f"{span}_s_runs": [sum(t[r] for t in times[name][span]) for r in range(repeats)] for span in TIMED},
            **{f"{span}_ms_per_image": 1e3 * median_pass[span] / n_images for span in TIMED},
            "image_auroc": _class_mean(per_class, "image_auroc"),
            "pixel_auroc": _class_mean(per_class, "pixel_auroc"),
            "per_class": per_class,
        }
    ref = results[reference]
    for name in names:
        for span in SPANS:
            results[name][f"speedup_{span}"] = ref[f"{span}_ms_per_image"] / results[name][f"{span}_ms_per_image"]
    return {"n_images": n_images, "repeats": repeats, "reference": reference, "modes": results,
            "batch_times_s": times}


def summary_line(measured: dict[str, Any], ddim_steps: int) -> str:
    """One line: speed-ups against ddim-N (denoising, reconstruction, end to end) and the AUROCs side by side."""
    modes, ref = measured["modes"], measured["reference"]
    label = lambda name: f"ddim-{ddim_steps}" if name == ref else name  # noqa: E731
    others = [n for n in modes if n != ref]
    r = modes[ref]
    parts = [
        f"{name} {modes[name]['speedup_denoise']:.1f}x faster than {label(ref)} in denoising "
        f"({modes[name]['speedup_recon']:.1f}x in reconstruction, {modes[name]['speedup_total']:.1f}x end to end; "
        f"image AUROC {modes[name]['image_auroc']:.3f} vs {r['image_auroc']:.3f}, "
        f"pixel AUROC {modes[name]['pixel_auroc']:.3f} vs {r['pixel_auroc']:.3f})"
        for name in others
    ]
    return "inference: " + "; ".join(parts)


def head_line(measured: dict[str, Any]) -> str | None:
    """The segmentation head's extra time per image against each mode's reconstruction (None without a head)."""
    modes = measured["modes"]
    if not any(r["head_ms_per_image"] > 0 for r in modes.values()):
        return None
    parts = [f"{name} +{r['head_ms_per_image']:.2f} ms/image = {r['head_ms_per_image'] / r['recon_ms_per_image']:.2f}x "
             f"its reconstruction" for name, r in modes.items()]
    return "  segmentation head (one forward per image): " + "; ".join(parts)


def target_check(measured: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: one_step ≥ 8× faster than ddim-10 with image AUROC within 2 points.

    Checked on the denoising span, the only work the mode changes: the stages every mode pays once per image
    (first stage, AMN, anomaly maps) cap the wider spans' ratios by the architecture (see ``stage_costs``), e.g.
    at ~2.4× for the reconstruction with SD 1.5 at 256 px, whose VAE costs ~5 U-Net calls per image.
    """
    modes = measured["modes"]
    if "one_step" not in modes:
        return {}
    speed = modes["one_step"]["speedup_denoise"]
    gap = 100.0 * (modes[measured["reference"]]["image_auroc"] - modes["one_step"]["image_auroc"])
    return {"span": "denoise", "one_step_speedup": speed, "image_auroc_gap_points": gap,
            "met": bool(speed >= 8.0 and gap <= 2.0)}


def stage_costs(model, extractor, eval_cfg: EvalConfig, image_size: int, presets: Sequence[str],
                ddim_steps: int) -> dict[str, dict[str, Any]]:
    """GMACs per image of each stage and the speed-up bounds they imply: the measured model, then ``presets``
    built with random weights (their own image size, the run's anomaly-map settings)."""
    from cdad_dist.models.presets import ModelConfig, build_model

    def count(m, size: int) -> dict[str, Any]:
        gmacs = stage_gmacs(m, extractor, eval_cfg.anomaly_map, size)
        return {"image_size": size, "gmacs_per_image": gmacs, "bounds": speedup_bounds(gmacs, ddim_steps)}

    costs = {"measured": count(model, image_size)}
    device = next(model.parameters()).device
    for preset in presets:
        other = build_model(ModelConfig(preset=preset)).eval().to(device)
        costs[preset] = count(other, other.model_config.image_size)
        del other
    return costs


def cost_lines(costs: dict[str, dict[str, Any]], ddim_steps: int) -> list[str]:
    lines = []
    for name, c in costs.items():
        g, bound = c["gmacs_per_image"], c["bounds"]
        stages = ", ".join(f"{k} {v:.3g}" for k, v in g.items())
        lines.append(f"  work per image, {name} model at {c['image_size']} px (GMACs): {stages}; "
                     f"ddim-{ddim_steps}/one_step work ratio: reconstruction {bound['reconstruction']:.2f}x, "
                     f"end to end {bound['end_to_end']:.2f}x")
    return lines


# -- the model and the data --------------------------------------------------------------------------------------
def _train_overrides(cfg: InferenceBenchConfig, work: Path) -> list[str]:
    """configs/demo.yaml with one task, the benchmark's budget and size; the run name encodes those settings."""
    classes = cfg.task_classes()
    model = [
        f"sequence={json.dumps([classes])}",
        "continual.strategy=naive",  # one task: the protected bases would never be used
    ]
    if cfg.seg_head:
        model.append("model.seg_head.enabled=true")
    if cfg.train_steps is not None:
        model.append(f"train.base_steps={cfg.train_steps}")
    if cfg.image_size is not None:
        model.append(f"model.image_size={cfg.image_size}")
    tag = hashlib.sha256(json.dumps([str(cfg.config)] + model).encode()).hexdigest()[:10]
    dataset = load_config(cfg.config).data.dataset
    data = "-".join(c.split("/", 1)[-1] for c in classes)  # one generated data set per class list
    # The engine's own evaluation after the task is not what is measured here: kept small.
    small_eval = ["eval.max_test_per_class=4", "eval.heatmap_images=0"]
    paths = [f"data.shards={work / ('shards-' + dataset + '-' + data)}", f"output_dir={work / 'runs'}"]
    if dataset in ("demo", "real_photos"):  # generated into the work folder
        paths.append(f"data.root={work / (dataset + '_data-' + data)}")
    return model + small_eval + paths + [f"name=bench-{tag}"]


def train_bench_model(cfg: InferenceBenchConfig, work: Path, log=print) -> tuple[Path, float | None]:
    """Train (or reuse) the benchmark's model; returns its run directory and the training time (None: reused)."""
    from cdad_dist.engine.trainer import train

    run_cfg = load_config(cfg.config, _train_overrides(cfg, work))
    run_dir = run_cfg.run_dir
    if (run_dir / "run.json").exists():  # outside the try below: a mismatch is not an interrupted training
        check_reusable(run_dir, run_cfg, "bench inference")
    if (run_dir / "checkpoints").is_dir():
        try:
            select_task_end(run_dir, 0)
            log(f"bench inference: reusing the model trained earlier with the same settings: {run_dir}")
            return run_dir, None
        except CheckpointError:  # an earlier training was interrupted: resume it
            pass
    demo_root = Path(run_cfg.data.root)
    if run_cfg.data.dataset == "demo" and not demo_root.exists():  # only the task's classes: cheaper
        make_demo_dataset(demo_root, classes=[c.split("/", 1)[1] for c in cfg.task_classes()])
    log(f"bench inference: training a {run_cfg.model.preset} model, {run_cfg.train.base_steps} steps on "
        f"{cfg.task_classes()} -> {run_dir}")
    t0 = time.perf_counter()
    train(run_cfg, resume=(run_dir / "run.json").exists())
    return run_dir, time.perf_counter() - t0


def _test_classes(run: LoadedRun) -> list[str]:
    tasks = read_state(run.checkpoint.path)["tasks"]
    return [c for task in tasks[: run.checkpoint.task + 1] for c in task]


def load_test_batches(run: LoadedRun, classes: Sequence[str], batch_size: int,
                      max_per_class: int | None, shards: str | Path | None = None) -> list[dict]:
    """Every test image of the classes as batches of one class each, decoded once, on the run's device; from
    ``shards`` when given (a held-out set), else from the run's own ``data.shards``."""
    batches = []
    for cls in classes:
        stream = eval_stream(shards or run.cfg.data.shards, [cls], split="test", batch_size=batch_size,
                             image_size=run.image_size, limit=max_per_class, rank=0, world_size=1)
        for b in stream:
            batches.append({"x": b["image"].to(run.device), "label": b["label"], "mask": b["mask"], "cls": cls})
    return batches


# -- the benchmark -----------------------------------------------------------------------------------------------
def run(quick: bool, out_dir=None, *, cfg: InferenceBenchConfig | None = None, run_dir: str | Path | None = None,
        config: str | None = None, samples: Sequence[int] = (), test_shards: str | Path | None = None,
        log=print) -> dict[str, Any]:
    """Train (or load) one model, measure the three modes, print one line per mode and the summary."""
    config = config or DEFAULT_CONFIG
    cfg = cfg or (InferenceBenchConfig.quick(config) if quick else InferenceBenchConfig(config=config))
    if samples:
        cfg = replace(cfg, samples=tuple(samples))
    run_dir = run_dir or cfg.run_dir
    work = Path(out_dir if out_dir is not None else "runs/bench/inference")
    work.mkdir(parents=True, exist_ok=True)
    train_s = None
    trained_here = run_dir is None
    if trained_here:
        run_dir, train_s = train_bench_model(cfg, work, log)
    loaded = load_run(run_dir, cfg.task)
    classes = cfg.task_classes() if trained_here else _test_classes(loaded)
    batches = load_test_batches(loaded, classes, cfg.batch_size, cfg.max_test_per_class, test_shards)
    modes = mode_configs(loaded.cfg.eval.reconstruction, cfg.ddim_steps, cfg.samples)
    measured = measure_modes(loaded.model, loaded.extractor, batches, loaded.cfg.eval, modes, repeats=cfg.repeats,
                             seed=loaded.cfg.eval.reconstruction.seed)
    costs = stage_costs(loaded.model, loaded.extractor, loaded.cfg.eval, loaded.image_size, cfg.count_presets,
                        cfg.ddim_steps)
    label = {"ddim": f"ddim-{cfg.ddim_steps}"}
    log(f"bench inference: {loaded.cfg.model.preset} model {loaded.image_size}px from {loaded.checkpoint.path}, "
        f"{measured['n_images']} test images of {classes}" + (f" from {test_shards}" if test_shards else "")
        + f", batch {cfg.batch_size}, median of {cfg.repeats} passes, "
        + (f"device {loaded.device}" if loaded.device.type != "cpu" else f"{torch.get_num_threads()} CPU thread(s)"))
    for name, r in measured["modes"].items():
        log(f"  {label.get(name, name):<9} denoising {r['denoise_ms_per_image']:8.2f} ms/image "
            f"({r['speedup_denoise']:5.2f}x)  reconstruction {r['recon_ms_per_image']:8.2f} ms/image "
            f"({r['speedup_recon']:5.2f}x)  end to end {r['total_ms_per_image']:8.2f} ms/image "
            f"({r['speedup_total']:5.2f}x)  image AUROC {r['image_auroc']:.3f}  pixel AUROC {r['pixel_auroc']:.3f}")
    head = head_line(measured)
    if head:
        log(head)
    for line in cost_lines(costs, cfg.ddim_steps):
        log(line)
    summary = summary_line(measured, cfg.ddim_steps)
    target = target_check(measured)
    if target:
        summary += (f" [target one_step >= 8x in denoising with image AUROC within 2 points: "
                    f"{'met' if target['met'] else 'not met'}]")
    log(summary)
    return {"config": asdict(cfg), "run_dir": str(run_dir), "checkpoint": loaded.checkpoint.path.name,
            "image_size": loaded.image_size, "classes": list(classes), "train_s": train_s,
            "test_shards": str(test_shards) if test_shards else None,
            "threads": torch.get_num_threads(), "device": str(loaded.device), **measured, "cost": costs,
            "target": target, "summary": summary}
