"""``cdad bench continual``: the forgetting study — naive vs CDAD (three variants) vs joint, same seed and budget.

Sequence ``demo-3x2`` of freshly generated demo data (carpet+bottle | grid+nut | wood+pill) with
``configs/demo.yaml``'s model and evaluation, and the strategies:

- ``naive``: fine-tuning, the forgetting baseline;
- ``cdad``: update projection (holds under AdamW) with the scaled iSVD sketch;
- ``cdad-grad``: gradient projection as the paper, same sketch (AdamW's scaling lets it leak);
- ``cdad-paper``: the paper as written: gradient projection, its unscaled iSVD and Eq. 6 cross-task merge;
- ``joint``: every class at once for the whole budget (base + incremental steps), the upper bound.

More rows (``STRATEGIES``): ``knn``, ``replay-buffer``, ``cdad+replay-buffer``, and, only when named, the ablation
``cdad-synthetic`` (cdad whose bases are also captured on synthetic anomalies).

The base task is the same for the four continual strategies (same seed, same data, same steps: fine-tuning before
any basis exists), so it is trained once and the four runs start after it (``train.init_from``); each CDAD variant
then captures its own task-0 basis. Runs are kept under ``out_dir`` with a name derived from their settings and
reused (or resumed) by the next run with the same settings.

Reported per strategy: A-AUROC (final average over all classes, image and pixel), FM (Chaudhry forgetting), the
per-step averages; and the two targets: FM(cdad) ≤ 0.25·FM(naive), and A-AUROC(cdad) within 3 points of joint.
``seeds`` > 1 repeats the whole study with seeds ``seed, seed + 1, ...``: every number is then the mean over seeds
with its standard deviation (error bars in the figure). The table also states the sampling error of one class's
AUROC with the test set used (Hanley & McNeil 1982), so that a difference smaller than it is read as noise.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cdad_dist.atomic import write_json_atomic
from cdad_dist.config import DEFAULT_CONFIG, load_config
from cdad_dist.data.sequences import resolve_sequence
from cdad_dist.engine.checkpoint import list_checkpoints
from cdad_dist.engine.run_dir import check_reusable
from cdad_dist.continual.protocol import build_strategy
from cdad_dist.errors import ConfigError
from cdad_dist.eval.head_maps import MAP_KINDS
from cdad_dist.eval.matrix import AccuracyMatrix

STRATEGIES: dict[str, list[str]] = {
    "naive": ["continual.strategy=naive"],
    "cdad": ["continual.strategy=cdad", "continual.project=update", "continual.sketch=isvd"],
    "cdad-grad": ["continual.strategy=cdad", "continual.project=grad", "continual.sketch=isvd"],
    "cdad-paper": ["continual.strategy=cdad", "continual.project=grad", "continual.paper_faithful=true"],
    # cdad whose bases are also captured on synthetic anomalies (Perlin blends, NSA), without a segmentation head.
    "cdad-synthetic": ["continual.strategy=cdad", "continual.project=update", "continual.sketch=isvd",
                       "continual.capture.synthetic=true"],
    "joint": ["continual.strategy=joint"],
    # Training-free nearest-neighbour baseline (PatchCore without coreset): what users compare against.
    "knn": ["continual.strategy=knn"],
    # Experience replay of real old-class images (continual.replay: per_class kept, ratio of each batch).
    "replay-buffer": ["continual.strategy=replay"],
    "cdad+replay-buffer": ["continual.strategy=cdad+replay", "continual.project=update", "continual.sketch=isvd"],
}
# Strategies that train nothing start on their own instead of after the shared base task.
TRAINING_FREE = ("knn",)
# Ablation rows run only when named in --strategies (the default study leaves them out).
OPT_IN = ("cdad-synthetic",)
FM_RATIO_TARGET = 0.25
MAP_OVERRIDES = ["model.seg_head.enabled=true", "eval.compare_maps=true"]
MAP_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")
FUSED_PIXEL_AP_GAIN_TARGET = 10.0   # points of final pixel AP, fused over features, for cdad
FUSED_IMAGE_AUROC_SLACK = 1.0       # points of image AUROC fused may lose against features
JOINT_GAP_TARGET_POINTS = 3.0


@dataclass
class ContinualBenchConfig:
    config: str = str(DEFAULT_CONFIG)      # the run config whose dataset, model and evaluation are compared
    sequence: str | None = None            # None: the config's sequence
    strategies: list[str] = field(default_factory=lambda: [s for s in STRATEGIES if s not in OPT_IN])
    base_steps: int | None = None         # None: configs/demo.yaml's budget
    incremental_steps: int | None = None
    max_test_per_class: int | None = None  # None: every test image
    capture_images: int | float | None = None  # None: demo.yaml's continual.capture.images
    seed: int = 0
    seeds: int = 1                         # repeats with seeds seed .. seed + seeds - 1 (mean ± std reported)
    share_base_task: bool = True
    extra_overrides: list[str] = field(default_factory=list)  # any `--set` override, e.g. a smaller model
    # Train every run with the segmentation head and record the features / head / fused maps' metrics side by
    # side (same runs: the head never changes the diffusion model's training).
    compare_maps: bool = False

    @classmethod
    def quick(cls, config: str = DEFAULT_CONFIG) -> ContinualBenchConfig:
        """A few minutes: the two targets' strategies only, small budgets (indicative, not the study)."""
        return cls(config=config, strategies=["naive", "cdad", "joint"], base_steps=300, incremental_steps=100,
                   max_test_per_class=10, capture_images=8)

    def __post_init__(self) -> None:
        self.config = str(self.config)
        if self.seeds < 1:
            raise ConfigError(f"bench continual: --seeds must be >= 1, got {self.seeds}")
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
    if cfg.compare_maps:
        out += MAP_OVERRIDES
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
        check_reusable(run_dir, run_cfg, "bench continual")  # e.g. the config file was edited since
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
        row["per_task"] = _per_task(m, "image_auroc")
        per[name] = row
    return {"strategies": per, "targets": _targets(per)}


def _per_task(m: AccuracyMatrix, metric: str) -> dict[int, dict[str, float]]:
    """Per task t (points): A over the classes seen after t, the diagonal (t's own classes right after t:
    plasticity), and t's own classes at the end and their forgetting."""
    tasks = m.per_task(metric)
    out = {}
    for t, after in sorted(m.summary(metric)["step_average"].items()):
        t = int(t)
        own = [v for cls, v in m.row(metric, t).items() if m.own_task(cls) == t]
        end = tasks.get(t, {})
        out[t] = {"A_after": _points(after), "diagonal": _points(sum(own) / len(own)) if own else math.nan,
                  "final": _points(end.get("final", math.nan)), "FM": _points(end.get("forgetting", math.nan))}
    return out


def _targets(per: dict[str, Any]) -> dict[str, Any]:
    """The two targets for ``cdad`` (top-level keys) and for every other projection row (``cdad-*``, under
    ``variants``), each against the same naive and joint rows."""
    targets = _targets_of(per, "cdad")
    variants = {name: _targets_of(per, name) for name in per if name.startswith("cdad-")}
    if any(variants.values()):
        targets["variants"] = {name: t for name, t in variants.items() if t}
    return targets


def _targets_of(per: dict[str, Any], name: str) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if name in per and "naive" in per:
        fm_c, fm_n = per[name]["image_auroc"]["FM"], per["naive"]["image_auroc"]["FM"]
        # FM(naive) <= 0 means the baseline did not forget: the ratio says nothing then.
        ratio = fm_c / fm_n if fm_n > 0 else math.nan
        targets["fm_ratio_image"] = ratio
        targets["fm_ratio_met"] = bool(fm_n > 0 and (fm_c <= FM_RATIO_TARGET * fm_n))
    if name in per and "joint" in per:
        diff = per[name]["image_auroc"]["A"] - per["joint"]["image_auroc"]["A"]
        targets["a_minus_joint_points_image"] = diff
        targets["joint_gap_met"] = bool(diff >= -JOINT_GAP_TARGET_POINTS)
    return targets


def map_comparison(matrices: dict[str, AccuracyMatrix]) -> dict[str, Any]:
    """Per strategy and map kind (features / head / fused): final average (A) and forgetting (FM) in points of
    each metric in MAP_METRICS, then the segmentation head's targets for cdad."""
    per: dict[str, Any] = {}
    for name, m in matrices.items():
        kinds: dict[str, Any] = {}
        for kind in MAP_KINDS:
            if f"{kind}.pixel_ap" not in m.metrics:
                continue
            kinds[kind] = {}
            for metric in MAP_METRICS:
                s = m.summary(f"{kind}.{metric}")
                kinds[kind][metric] = {"A": _points(s["final_average"]), "FM": _points(s["forgetting"]),
                                       "steps": {int(t): _points(v) for t, v in s["step_average"].items()}}
        if kinds:
            per[name] = kinds
    targets: dict[str, Any] = {}
    c = per.get("cdad")
    if c and {"features", "fused"} <= set(c):
        gain = c["fused"]["pixel_ap"]["A"] - c["features"]["pixel_ap"]["A"]
        drop = c["features"]["image_auroc"]["A"] - c["fused"]["image_auroc"]["A"]
        targets.update(fused_pixel_ap_gain=gain, fused_image_auroc_drop=drop,
                       fused_met=bool(gain >= FUSED_PIXEL_AP_GAIN_TARGET and drop <= FUSED_IMAGE_AUROC_SLACK))
        n = per.get("naive", {}).get("fused")
        if n:
            fm_c, fm_n = c["fused"]["pixel_ap"]["FM"], n["pixel_ap"]["FM"]
            targets.update(fm_ratio_pixel_ap_fused=fm_c / fm_n if fm_n > 0 else math.nan,
                           fm_ratio_pixel_ap_met=bool(fm_n > 0 and fm_c <= FM_RATIO_TARGET * fm_n))
    return {"strategies": per, "targets": targets}


def maps_lines(maps: dict[str, Any], cost: dict[str, Any] | None = None) -> list[str]:
    """Markdown: one row per (strategy, map kind) with the final A of every metric and FM of pixel AP."""
    lines = ["Anomaly maps (points; A = final average over all classes, FM = forgetting):", "",
             "| Strategy | map | image AUROC | pixel AUROC | pixel AP | AUPRO@0.3 | FM pixel AP |",
             "|---|---|---|---|---|---|---|"]
    for name, kinds in maps["strategies"].items():
        for kind, r in kinds.items():
            lines.append(f"| {name} | {kind} | " + " | ".join(_fmt1(r[m]["A"]) for m in MAP_METRICS)
                         + f" | {_fmt(r['pixel_ap']['FM'])} |")
    t = maps["targets"]
    if "fused_pixel_ap_gain" in t:
        lines += ["", f"cdad: fused − features final pixel AP {t['fused_pixel_ap_gain']:+.1f} points (target >= "
                      f"+{FUSED_PIXEL_AP_GAIN_TARGET:.0f}), image AUROC change {-t['fused_image_auroc_drop']:+.1f} "
                      f"(target >= -{FUSED_IMAGE_AUROC_SLACK:.0f}): {'MET' if t['fused_met'] else 'NOT MET'}"]
    if "fm_ratio_pixel_ap_fused" in t:
        lines.append(f"FM(cdad)/FM(naive) on fused pixel AP = {t['fm_ratio_pixel_ap_fused']:.3f} (target <= "
                     f"{FM_RATIO_TARGET}: {'MET' if t['fm_ratio_pixel_ap_met'] else 'NOT MET'})")
    if cost:
        lines.append(f"Head training cost: {cost['step_s_with_head']:.3f} s/step with the head vs "
                     f"{cost['step_s_without_head']:.3f} without ({cost['ratio']:.2f}x), batch {cost['batch_size']}, "
                     f"{cost['device']}.")
    return lines + [""]


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every number of :func:`summarise`, with ``<key>_std`` (sample std; NaN for 1 seed)."""
    def mean_std(values: list[float]) -> tuple[float, float]:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return math.nan, math.nan
        mean = sum(finite) / len(finite)
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
        return mean, std

    per: dict[str, Any] = {}
    for name in summaries[0]["strategies"]:
        row: dict[str, Any] = {}
        for metric in ("image_auroc", "pixel_auroc"):
            runs = [s["strategies"][name][metric] for s in summaries]
            out: dict[str, Any] = {}
            for key in ("A", "FM", "diagonal", "gap_to_joint"):
                if runs[0][key] is None:
                    out[key] = out[f"{key}_std"] = None
                    continue
                out[key], out[f"{key}_std"] = mean_std([r[key] for r in runs])
            steps = sorted(runs[0]["steps"])
            pairs = {t: mean_std([r["steps"][t] for r in runs]) for t in steps}
            out["steps"] = {t: m for t, (m, _) in pairs.items()}
            out["steps_std"] = {t: s for t, (_, s) in pairs.items()}
            row[metric] = out
        for key in ("per_task", "fill_per_task"):  # per-task detail: the first seed's (the table says so)
            if key in summaries[0]["strategies"][name]:
                row[key] = summaries[0]["strategies"][name][key]
        per[name] = row
    return {"strategies": per, "targets": _targets(per), "n_seeds": len(summaries)}


def auroc_standard_error(auroc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC measured on n_pos anomalous and n_neg normal images."""
    a = min(max(auroc, 1e-9), 1 - 1e-9)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _test_counts(config: str, overrides: list[str]) -> tuple[int, int] | None:
    """(anomalous, normal) test images of the smallest class in the run's shards, after eval.max_test_per_class."""
    from cdad_dist.data.shards import load_manifest

    cfg = load_config(config, overrides)
    try:
        groups = load_manifest(cfg.data.shards)["groups"]
    except Exception:  # noqa: BLE001 - only the note depends on it
        return None
    counts = [g["count"] for name, g in groups.items() if name.endswith("/test")]
    if not counts:
        return None
    n = min(counts) if cfg.eval.max_test_per_class is None else min(min(counts), cfg.eval.max_test_per_class)
    return max(1, n // 2), max(1, n - n // 2)  # about half anomalous, as in the MVTec/VisA test sets


def summary_line(summary: dict[str, Any]) -> str:
    per, t = summary["strategies"], summary["targets"]
    parts = [f"{name}: A img/pix {r['image_auroc']['A']:.1f}/{r['pixel_auroc']['A']:.1f}, "
             f"FM img/pix {r['image_auroc']['FM']:.2f}/{r['pixel_auroc']['FM']:.2f}" for name, r in per.items()]
    checks = _target_checks("cdad", t)
    for name, variant in t.get("variants", {}).items():
        checks += _target_checks(name, variant)
    return "continual: " + "; ".join(parts) + (" | " + "; ".join(checks) if checks else "")


def _target_checks(name: str, t: dict[str, Any]) -> list[str]:
    checks = []
    if "fm_ratio_image" in t:
        checks.append(f"FM({name})/FM(naive) = {t['fm_ratio_image']:.3f} (target <= {FM_RATIO_TARGET}: "
                      f"{'MET' if t['fm_ratio_met'] else 'NOT MET'})")
    if "a_minus_joint_points_image" in t:
        checks.append(f"A({name}) - A(joint) = {t['a_minus_joint_points_image']:+.1f} points (target >= "
                      f"-{JOINT_GAP_TARGET_POINTS:.0f}: {'MET' if t['joint_gap_met'] else 'NOT MET'})")
    return checks


def markdown_table(summary: dict[str, Any], test_counts: tuple[int, int] | None = None) -> str:
    n_seeds = summary.get("n_seeds", 1)
    lines = ["| Strategy | A-AUROC img | A-AUROC pix | FM img | FM pix | diag img | gap to joint img |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary["strategies"].items():
        img, pix = r["image_auroc"], r["pixel_auroc"]
        lines.append(f"| {name} | {_pm(img, 'A', 1)} | {_pm(pix, 'A', 1)} | {_pm(img, 'FM', 2)} | {_pm(pix, 'FM', 2)} "
                     f"| {_pm(img, 'diagonal', 1)} | {_pm(img, 'gap_to_joint', 1)} |")
    lines.append("")
    lines.append(f"Points (%). {'Mean ± std over ' + str(n_seeds) + ' seeds.' if n_seeds > 1 else 'One seed.'}")
    lines += ["", *per_task_table(summary)]
    if test_counts is not None:
        pos, neg = test_counts
        se = [100 * auroc_standard_error(a, pos, neg) for a in (0.9, 0.7)]
        lines.append(f"With {pos + neg} test images per class (~{pos} anomalous), one class's image AUROC has a "
                     f"standard error of {se[0]:.1f} points at AUROC 0.9 and {se[1]:.1f} at 0.7 (Hanley & McNeil); "
                     f"differences smaller than that are within noise{'' if n_seeds > 1 else ' (use --seeds N)'}.")
    return "\n".join(lines) + "\n"


def per_task_table(summary: dict[str, Any]) -> list[str]:
    """Image AUROC per task and strategy (first seed's runs when several): A after the task, the task's diagonal
    (plasticity), its final value and FM; and CDAD's fill fraction Σk/Σd after the task (saturation)."""
    rows = [(name, r) for name, r in summary["strategies"].items() if r.get("per_task")]
    if not rows:
        return []
    lines = ["Per task (image AUROC, points; fill = Σk/Σd of the projection bases after the task):", "",
             "| Strategy | task | A after task | diagonal | final | FM | fill |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        fill = r.get("fill_per_task") or []
        for t, v in sorted(r["per_task"].items(), key=lambda kv: int(kv[0])):
            f = fill[int(t)] if int(t) < len(fill) and fill[int(t)] is not None else None
            lines.append(f"| {name} | {t} | {_fmt1(v['A_after'])} | {_fmt1(v['diagonal'])} | {_fmt1(v['final'])} "
                         f"| {_fmt(v['FM'])} | {'–' if f is None else f'{f:.3f}'} |")
    return lines + [""]


def _fmt1(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and math.isfinite(std) else "")


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def plot(summary: dict[str, Any], path: Path, title: str | None = None) -> Path:
    """Mean image / pixel AUROC over the classes seen so far, after each task, one line per strategy (error bars:
    std over seeds, when there are several)."""
    fig = Figure(figsize=(10, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    for i, metric in enumerate(("image_auroc", "pixel_auroc")):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, r in summary["strategies"].items():
            steps = r[metric]["steps"]
            xs = sorted(steps)
            std = r[metric].get("steps_std", {})
            if name == "joint":  # one evaluation after all tasks: drawn as a horizontal reference
                ax.axhline(steps[xs[-1]], linestyle="--", color="gray", label="joint")
                continue
            yerr = [std.get(x, math.nan) for x in xs]
            ax.errorbar(xs, [steps[x] for x in xs], yerr=None if all(math.isnan(e) for e in yerr) else yerr,
                        marker="o", capsize=3, label=name, **_strategy_style(name))
        ax.set_xlabel("after task")
        ax.set_ylabel(f"mean {metric.replace('_', ' ')} of seen classes (%)")
        ax.set_xticks(sorted({x for r in summary["strategies"].values() for x in r[metric]["steps"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = summary.get("n_seeds", 1)
    fig.suptitle((title + " · " if title else "") + (f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"),
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _strategy_style(name: str) -> dict[str, Any]:
    from cdad_dist.eval.report import class_style

    return {k: v for k, v in class_style(list(STRATEGIES).index(name) if name in STRATEGIES else 9).items()
            if k == "color"}


def run(quick: bool, out_dir, *, cfg: ContinualBenchConfig | None = None, config: str | None = None,
        strategies: list[str] | None = None, seeds: int | None = None, sequence: str | None = None,
        compare_maps: bool = False, log=print) -> dict[str, Any]:
    config = str(config or DEFAULT_CONFIG)
    cfg = cfg or (ContinualBenchConfig.quick(config) if quick else ContinualBenchConfig(config=config))
    if strategies:
        cfg = ContinualBenchConfig(**{**asdict(cfg), "strategies": list(strategies)})
    if seeds is not None:
        cfg = ContinualBenchConfig(**{**asdict(cfg), "seeds": seeds})
    if sequence is not None:
        cfg = ContinualBenchConfig(**{**asdict(cfg), "sequence": sequence})
    if compare_maps:
        cfg = ContinualBenchConfig(**{**asdict(cfg), "compare_maps": True})
    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    per_seed = [_run_seed(replace(cfg, seed=cfg.seed + i), work, log) for i in range(cfg.seeds)]
    summary = aggregate([p["summary"] for p in per_seed]) if cfg.seeds > 1 else per_seed[0]["summary"]
    if cfg.seeds > 1:
        summary["per_seed"] = [p["summary"] for p in per_seed]
    common = _common_overrides(cfg, work)
    result = {"config": asdict(cfg), "quick": quick, "runs": [p["runs"] for p in per_seed],
              "train_seconds": [p["seconds"] for p in per_seed], **summary, "summary": summary_line(summary)}
    write_json_atomic(work / "continual.json", result)
    table = markdown_table(summary, _test_counts(cfg.config, common))
    if "maps" in summary:
        table += "\n" + "\n".join(maps_lines(summary["maps"], summary.get("head_cost")))
        log("\n".join(maps_lines(summary["maps"], summary.get("head_cost"))))
    (work / "continual.md").write_text(table)
    title = f"bench continual: {Path(cfg.config).name}, {load_config(cfg.config, common).sequence}"
    result["figure"] = str(plot(summary, work / "continual.png", title))
    log(result["summary"])
    return result


def _run_seed(cfg: ContinualBenchConfig, work: Path, log) -> dict[str, Any]:
    """Every strategy of the study with ``cfg.seed``: the run directories, training seconds and summary."""
    common = _common_overrides(cfg, work)
    sequence = resolve_sequence(load_config(cfg.config, common).sequence).tasks
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
        tasks_in_run = len(build_strategy(load_config(cfg.config, overrides).continual).plan_tasks(sequence))
        run_dirs[name], seconds[name] = _train(cfg.config, overrides + [f"name=cbench-{name}-{_tag([str(cfg.config)] + overrides)}"],
                                               tasks_in_run, log)
    results = {name: json.loads((d / "report" / "results.json").read_text()) for name, d in run_dirs.items()}
    matrices = {name: AccuracyMatrix.from_dict(r["matrix"]) for name, r in results.items()}
    summary = summarise(matrices)
    if cfg.compare_maps:
        summary["maps"] = map_comparison(matrices)
        from cdad_dist.bench.head_cost import head_step_cost

        summary["head_cost"] = head_step_cost(cfg.config, common, log=log)
    for name, r in results.items():  # projection's fill per task (Σk/Σd of the bases after each task)
        fill = (r.get("strategy_summary") or {}).get("fill_per_task")
        if fill:
            summary["strategies"][name]["fill_per_task"] = fill
    return {"runs": {k: str(v) for k, v in run_dirs.items()}, "seconds": seconds, "summary": summary}
