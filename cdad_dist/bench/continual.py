"""``cdad bench continual``: the forgetting study — naive vs CDAD (three variants) vs joint, same seed and budget.

Sequence ``demo-3x2`` of freshly generated demo data (carpet+bottle | grid+nut | wood+pill) with
``configs/demo.yaml``'s model and evaluation, and the strategies:

- ``naive``: fine-tuning, the forgetting baseline;
- ``cdad``: update projection (holds under AdamW) with the scaled iSVD sketch;
- ``cdad-grad``: gradient projection as the paper, same sketch (AdamW's scaling lets it leak);
- ``cdad-paper``: the paper as written: gradient projection, its unscaled iSVD and Eq. 6 cross-task merge;
- ``joint``: every class at once for the whole budget (base + incremental steps), the upper bound.

The base task is the same for the four continual strategies (same seed, same data, same steps: fine-tuning before
any basis exists), so it is trained once and the four runs start after it (``train.init_from``); each CDAD variant
then captures its own task-0 basis. Runs are kept under ``out_dir`` with a name derived from their settings and
reused (or resumed) by the next run with the same settings.

Reported per strategy: A-AUROC (final average over all classes, image and pixel), FM (Chaudhry forgetting), the
per-step averages; and the two targets: FM(cdad) ≤ 0.25·FM(naive), and A-AUROC(cdad) within 3 points of joint.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cdad_dist.atomic import write_json_atomic
from cdad_dist.config import DEFAULT_CONFIG, load_config
from cdad_dist.data.sequences import resolve_sequence
from cdad_dist.engine.checkpoint import list_checkpoints
from cdad_dist.errors import ConfigError
from cdad_dist.eval.matrix import AccuracyMatrix

STRATEGIES: dict[str, list[str]] = {
    "naive": ["continual.strategy=naive"],
    "cdad": ["continual.strategy=cdad", "continual.project=update", "continual.sketch=isvd"],
    "cdad-grad": ["continual.strategy=cdad", "continual.project=grad", "continual.sketch=isvd"],
    "cdad-paper": ["continual.strategy=cdad", "continual.project=grad", "continual.paper_faithful=true"],
    "joint": ["continual.strategy=joint"],
    # Training-free nearest-neighbour baseline (PatchCore without coreset): what users compare against.
    "knn": ["continual.strategy=knn"],
}
# Strategies that train nothing start on their own instead of after the shared base task.
TRAINING_FREE = ("knn",)
FM_RATIO_TARGET = 0.25
JOINT_GAP_TARGET_POINTS = 3.0


@dataclass
class ContinualBenchConfig:
    config: str = str(DEFAULT_CONFIG)      # the run config whose dataset, model and evaluation are compared
    sequence: str | None = None            # None: the config's sequence
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    base_steps: int | None = None         # None: configs/demo.yaml's budget
    incremental_steps: int | None = None
    max_test_per_class: int | None = None  # None: every test image
    capture_images: int | float | None = None  # None: demo.yaml's continual.capture.images
    seed: int = 0
    share_base_task: bool = True
    extra_overrides: list[str] = field(default_factory=list)  # any `--set` override, e.g. a smaller model

    @classmethod
    def quick(cls, config: str = DEFAULT_CONFIG) -> ContinualBenchConfig:
        """A few minutes: the two targets' strategies only, small budgets (indicative, not the study)."""
        return cls(config=config, strategies=["naive", "cdad", "joint"], base_steps=300, incremental_steps=100,
                   max_test_per_class=10, capture_images=8)

    def __post_init__(self) -> None:
        self.config = str(self.config)
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"bench continual: unknown strategies {unknown}; choose from {list(STRATEGIES)}")


GENERATED_DATASETS = ("demo", "real_photos")  # generated into the work folder; others are read where they are


def _common_overrides(cfg: ContinualBenchConfig, work: Path) -> list[str]:
    dataset = load_config(cfg.config).data.dataset
    out = [f"train.seed={cfg.seed}", "eval.heatmap_images=1", f"data.shards={work / ('shards-' + dataset)}",
           f"output_dir={work / 'runs'}"]
    if cfg.sequence is not None:
        out.append(f"sequence={cfg.sequence}")
    if dataset in GENERATED_DATASETS:
        out.append(f"data.root={work / (dataset + '_data')}")
    if cfg.base_steps is not None:
        out.append(f"train.base_steps={cfg.base_steps}")
    if cfg.incremental_steps is not None:
        out.append(f"train.incremental_steps={cfg.incremental_steps}")
    if cfg.max_test_per_class is not None:
        out.append(f"eval.max_test_per_class={cfg.max_test_per_class}")
    if cfg.capture_images is not None:
        out.append(f"continual.capture.images={cfg.capture_images}")
    return out + list(cfg.extra_overrides)


def _tag(overrides: list[str]) -> str:
    return hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]


def _finished(run_dir: Path, n_tasks: int) -> bool:
    return any(r.task_end and r.task == n_tasks - 1 for r in list_checkpoints(run_dir / "checkpoints"))


def _train(config: str, overrides: list[str], n_tasks: int, log) -> tuple[Path, float | None]:
    """Train (or reuse / resume) one run; returns its directory and the seconds spent (None when reused)."""
    from cdad_dist.engine.trainer import train

    run_cfg = load_config(config, overrides)
    run_dir = run_cfg.run_dir
    if _finished(run_dir, n_tasks):
        log(f"bench continual: reusing {run_dir}")
        return run_dir, None
    t0 = time.perf_counter()
    train(run_cfg, resume=(run_dir / "run.json").exists())
    return run_dir, time.perf_counter() - t0


def _points(value: float) -> float:
    return 100.0 * value


def summarise(matrices: dict[str, AccuracyMatrix]) -> dict[str, Any]:
    """Per strategy: A-AUROC and FM (image, pixel) in points; then the targets' ratios."""
    joint = matrices.get("joint")
    per: dict[str, Any] = {}
    for name, m in matrices.items():
        row: dict[str, Any] = {}
        for metric in ("image_auroc", "pixel_auroc"):
            s = m.summary(metric, joint if (joint is not None and name != "joint") else None)
            row[metric] = {"A": _points(s["final_average"]), "FM": _points(s["forgetting"]),
                           "diagonal": _points(s["diagonal_average"]),
                           "steps": {int(t): _points(v) for t, v in s["step_average"].items()},
                           "gap_to_joint": _points(s["gap_to_joint"]) if "gap_to_joint" in s else None}
        per[name] = row
    targets: dict[str, Any] = {}
    if "cdad" in per and "naive" in per:
        fm_c, fm_n = per["cdad"]["image_auroc"]["FM"], per["naive"]["image_auroc"]["FM"]
        # FM(naive) <= 0 means the baseline did not forget: the ratio says nothing then.
        ratio = fm_c / fm_n if fm_n > 0 else math.nan
        targets["fm_ratio_image"] = ratio
        targets["fm_ratio_met"] = bool(fm_n > 0 and (fm_c <= FM_RATIO_TARGET * fm_n))
    if "cdad" in per and "joint" in per:
        diff = per["cdad"]["image_auroc"]["A"] - per["joint"]["image_auroc"]["A"]
        targets["a_minus_joint_points_image"] = diff
        targets["joint_gap_met"] = bool(diff >= -JOINT_GAP_TARGET_POINTS)
    return {"strategies": per, "targets": targets}


def summary_line(summary: dict[str, Any]) -> str:
    per, t = summary["strategies"], summary["targets"]
    parts = [f"{name}: A img/pix {r['image_auroc']['A']:.1f}/{r['pixel_auroc']['A']:.1f}, "
             f"FM img/pix {r['image_auroc']['FM']:.2f}/{r['pixel_auroc']['FM']:.2f}" for name, r in per.items()]
    checks = []
    if "fm_ratio_image" in t:
        checks.append(f"FM(cdad)/FM(naive) = {t['fm_ratio_image']:.3f} (target <= {FM_RATIO_TARGET}: "
                      f"{'MET' if t['fm_ratio_met'] else 'NOT MET'})")
    if "a_minus_joint_points_image" in t:
        checks.append(f"A(cdad) - A(joint) = {t['a_minus_joint_points_image']:+.1f} points (target >= "
                      f"-{JOINT_GAP_TARGET_POINTS:.0f}: {'MET' if t['joint_gap_met'] else 'NOT MET'})")
    return "continual: " + "; ".join(parts) + (" | " + "; ".join(checks) if checks else "")


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| Strategy | A-AUROC img | A-AUROC pix | FM img | FM pix | diag img | gap to joint img |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary["strategies"].items():
        img, pix = r["image_auroc"], r["pixel_auroc"]
        gap = "–" if img["gap_to_joint"] is None else f"{img['gap_to_joint']:.1f}"
        lines.append(f"| {name} | {img['A']:.1f} | {pix['A']:.1f} | {_fmt(img['FM'])} | {_fmt(pix['FM'])} "
                     f"| {img['diagonal']:.1f} | {gap} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Mean image / pixel AUROC over the classes seen so far, after each task, one line per strategy."""
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    for i, metric in enumerate(("image_auroc", "pixel_auroc")):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, r in summary["strategies"].items():
            steps = r[metric]["steps"]
            xs = sorted(steps)
            if name == "joint":  # one evaluation after all tasks: drawn as a horizontal reference
                ax.axhline(steps[xs[-1]], linestyle="--", color="gray", label="joint")
                continue
            ax.plot(xs, [steps[x] for x in xs], marker="o", label=name)
        ax.set_xlabel("after task")
        ax.set_ylabel(f"mean {metric.replace('_', ' ')} of seen classes (%)")
        ax.set_xticks(sorted({x for r in summary["strategies"].values() for x in r[metric]["steps"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run(quick: bool, out_dir, *, cfg: ContinualBenchConfig | None = None, config: str | None = None,
        strategies: list[str] | None = None, log=print) -> dict[str, Any]:
    config = str(config or DEFAULT_CONFIG)
    cfg = cfg or (ContinualBenchConfig.quick(config) if quick else ContinualBenchConfig(config=config))
    if strategies:
        cfg = ContinualBenchConfig(**{**asdict(cfg), "strategies": list(strategies)})
    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = _common_overrides(cfg, work)
    n_tasks = len(resolve_sequence(load_config(cfg.config, common).sequence).tasks)
    seconds: dict[str, float | None] = {}
    run_dirs: dict[str, Path] = {}
    base_dir = None
    continual = [s for s in cfg.strategies if s != "joint" and s not in TRAINING_FREE]
    if cfg.share_base_task and continual:
        base = common + STRATEGIES["naive"] + ["tasks=0:1"]
        base_dir, seconds["base_task"] = _train(cfg.config, base + [f"name=cbench-base-{_tag([str(cfg.config)] + base)}"], 1, log)
    for name in cfg.strategies:
        overrides = common + STRATEGIES[name]
        if base_dir is not None and name in continual:
            overrides = overrides + [f"train.init_from={base_dir}"]
        log(f"bench continual: strategy {name}")
        tasks_in_run = 1 if name == "joint" else n_tasks  # joint collapses the sequence into one task
        run_dirs[name], seconds[name] = _train(cfg.config, overrides + [f"name=cbench-{name}-{_tag([str(cfg.config)] + overrides)}"],
                                               tasks_in_run, log)
    matrices = {name: AccuracyMatrix.from_dict(json.loads((d / "report" / "results.json").read_text())["matrix"])
                for name, d in run_dirs.items()}
    summary = summarise(matrices)
    result = {"config": asdict(cfg), "quick": quick, "runs": {k: str(v) for k, v in run_dirs.items()},
              "train_seconds": seconds, **summary, "summary": summary_line(summary)}
    write_json_atomic(work / "continual.json", result)
    (work / "continual.md").write_text(markdown_table(summary))
    result["figure"] = str(plot(summary, work / "continual.png"))
    log(result["summary"])
    return result
