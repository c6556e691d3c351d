"""Run reports: JSON / Markdown / CSV tables, per-class plots, heat-map grids, and run comparisons.

Nothing here checks the process rank: call these functions from the main process only (e.g. under
``accelerator.is_main_process``), otherwise every rank writes the same files. Figures use matplotlib's
object API with the Agg canvas (no pyplot, no display, no global backend switch), so it works headless.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cdad_dist.errors import CdadError
from cdad_dist.eval.matrix import AccuracyMatrix
from cdad_dist.eval.metrics import METRIC_NAMES

REPORT_FORMAT = 1
_TITLES = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_aupro": "pixel AUPRO@0.3",
}


# ----------------------------------------------------------------------------------------------------------------
# write_report
# ----------------------------------------------------------------------------------------------------------------
def write_report(
    run_dir: str | Path,
    matrix: AccuracyMatrix,
    sequence_tasks: Sequence[Sequence[str]],
    extra: dict[str, Any] | None = None,
    *,
    joint: AccuracyMatrix | None = None,
) -> dict[str, Path]:
    """Write ``<run_dir>/report/``: results.json (everything), results.md, per_class.csv and one PNG per metric.

    ``sequence_tasks``: the qualified classes of each task. ``extra``: free JSON-able run facts (``setting``,
    ``strategy``, ``name``, timings…), stored as is; ``setting``/``strategy``/``name`` label the tables.
    ``joint``: the matrix of a joint run of the same classes, for the gap-to-joint numbers.
    Returns ``{"json", "markdown", "csv", "fig:<metric>"...: path}``. Main process only (no rank check).
    """
    extra = dict(extra or {})
    tasks = [list(t) for t in sequence_tasks]
    metrics = _ordered_metrics(matrix)
    if not metrics:
        raise CdadError(f"write_report({run_dir}): the accuracy matrix is empty")
    out_dir = Path(run_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {m: matrix.summary(m, joint) for m in metrics}
    results = {
        "format": REPORT_FORMAT,
        "name": extra.get("name", Path(run_dir).name),
        "setting": extra.get("setting"),
        "strategy": extra.get("strategy"),
        "strategy_summary": extra.get("strategy_summary"),  # the strategy's own summary() (what it holds)
        "tasks": tasks,
        "summary": summary,
        "matrix": matrix.to_dict(),
        "joint_matrix": joint.to_dict() if joint is not None else None,
        "extra": extra,
    }
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "csv": out_dir / "per_class.csv"}
    paths["json"].write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    paths["markdown"].write_text(render_markdown(results, matrix))
    _write_csv(paths["csv"], matrix, metrics)
    for m in metrics:
        paths[f"fig:{m}"] = plot_metric_over_tasks(out_dir / f"fig_{m}.png", matrix, m, tasks, _run_label(results))
    return paths


def _run_label(results: dict[str, Any]) -> str:
    parts = [results["name"], results.get("setting"), results.get("strategy")]
    return " · ".join(str(p) for p in parts if p)


def _ordered_metrics(matrix: AccuracyMatrix) -> list[str]:
    known = [m for m in METRIC_NAMES if m in matrix.metrics]
    return known + sorted(m for m in matrix.metrics if m not in METRIC_NAMES)


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None, tuple → list, int keys → str, tensors/numpy scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.generic, np.ndarray)):
        return _json_safe(np.asarray(obj).tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise CdadError(f"report: value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100.0 * value:.{digits}f}"


def _pair(summary: dict, key: str, a: str, b: str, digits: int) -> str:
    def get(m):
        return summary.get(m, {}).get(key)

    return f"{_pct(get(a), digits)} / {_pct(get(b), digits)}"


def render_markdown(results: dict[str, Any], matrix: AccuracyMatrix) -> str:
    """The results.md text (percent values; FM with two decimals, as in the paper)."""
    s, name = results["summary"], results["name"]
    setting = results.get("setting") or "–"
    strategy = results.get("strategy") or "–"
    lines = [f"# Results: {name}", "", f"Setting: {setting} · strategy: {strategy} · tasks: {len(results['tasks'])}", ""]
    lines += [
        "## Continual summary (image / pixel, %; shaped like the CDAD paper's Tables 2–4)",
        "",
        "| Setting | Method | A-AUROC (↑) | FM (↓) | A-AP (↑) | FM (↓) | A-PRO (↑) | FM (↓) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {setting} | {strategy} | {_pair(s, 'final_average', 'image_auroc', 'pixel_auroc', 1)} "
        f"| {_pair(s, 'forgetting', 'image_auroc', 'pixel_auroc', 2)} "
        f"| {_pair(s, 'final_average', 'image_ap', 'pixel_ap', 1)} "
        f"| {_pair(s, 'forgetting', 'image_ap', 'pixel_ap', 2)} "
        f"| {_pct(s.get('pixel_aupro', {}).get('final_average'))} "
        f"| {_pct(s.get('pixel_aupro', {}).get('forgetting'), 2)} |",
        "",
        "A-x: mean over all classes after the last task. FM: mean over classes not in the last task of "
        "(best earlier value − final value). Both are averaged over **classes** (as in the paper): a task with "
        "more classes weighs more; the per-task table below averages over tasks instead. Diagonal: mean over "
        "tasks of each task's own classes right after it.",
        "",
        "| Metric | A (final average) | Diagonal average | FM | Gap to joint |",
        "|---|---|---|---|---|",
    ]
    for m, v in s.items():
        lines.append(
            f"| {_TITLES.get(m, m)} | {_pct(v.get('final_average'))} | {_pct(v.get('diagonal_average'))} "
            f"| {_pct(v.get('forgetting'), 2)} | {_pct(v.get('gap_to_joint'), 2)} |"
        )
    lines += ["", *_task_table(results), "", *_step_table(results, matrix), "", *_strategy_section(results),
              "## Per task and class", ""]
    lines += _per_task_tables(results, matrix)
    return "\n".join(lines) + "\n"


def _strategy_section(results: dict[str, Any]) -> list[str]:
    """The strategy's summary(): its scalar facts as a table, and a table per nested table of rows (e.g. CDAD's
    layer classes: count, k, d, fill)."""
    summary = results.get("strategy_summary")
    if not summary:
        return []
    lines = [f"## Strategy: {results.get('strategy') or '–'}", "", "| Quantity | Value |", "|---|---|"]
    tables = []

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return ", ".join(cell(v) for v in value) if len(value) <= 12 else f"{len(value)} entries"
        return str(value)

    def walk(data: dict[str, Any], prefix: str = "") -> None:
        for key, value in data.items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                tables.append((prefix + key, value))
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"| {prefix}{key} | {cell(value)} |")

    walk(summary)
    for title, rows in tables:
        columns = sorted({c for row in rows.values() for c in row})
        lines += ["", f"{title}:", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(cell(row.get(c, "–")) for c in columns) + " |"
                  for name, row in rows.items()]
    return lines + [""]


def _task_table(results: dict[str, Any]) -> list[str]:
    """Final value and FM of each task's own classes (image / pixel AUROC), and their task-averaged means."""
    s = results["summary"]
    if not {"image_auroc", "pixel_auroc"} <= set(s) or "per_task" not in s["image_auroc"]:
        return []

    def cell(metric: str, t: Any, key: str, digits: int) -> str:
        return _pct(s[metric]["per_task"].get(t, {}).get(key), digits)

    lines = ["## Per task (AUROC of each task's own classes after the last task; image / pixel, %)", "",
             "| Task | Classes | Final | FM |", "|---|---|---|---|"]
    for t in sorted(s["image_auroc"]["per_task"], key=int):
        classes = results["tasks"][int(t)] if int(t) < len(results["tasks"]) else []
        lines.append(f"| {t} | {', '.join(classes) or '–'} | {cell('image_auroc', t, 'final', 1)} / "
                     f"{cell('pixel_auroc', t, 'final', 1)} | {cell('image_auroc', t, 'forgetting', 2)} / "
                     f"{cell('pixel_auroc', t, 'forgetting', 2)} |")
    avg = {m: s[m]["task_averaged"] for m in ("image_auroc", "pixel_auroc")}
    lines.append(f"| **task-averaged** | | {_pct(avg['image_auroc']['final_average'])} / "
                 f"{_pct(avg['pixel_auroc']['final_average'])} | {_pct(avg['image_auroc']['forgetting'], 2)} / "
                 f"{_pct(avg['pixel_auroc']['forgetting'], 2)} |")
    return lines


def _step_labels(tasks: list[list[str]]) -> list[str]:
    """Paper-style step labels: cumulative class indices, e.g. ``1-10``, ``11``, ``12``."""
    labels, seen = [], 0
    for t in tasks:
        lo, hi = seen + 1, seen + len(t)
        labels.append(f"{lo}" if lo == hi else f"{lo}-{hi}")
        seen = hi
    return labels


def _step_table(results: dict[str, Any], matrix: AccuracyMatrix) -> list[str]:
    """Mean over seen classes after each step (image / pixel AUROC), then FM — the paper's Table 5 shape."""
    if not {"image_auroc", "pixel_auroc"} <= set(matrix.metrics):
        return []
    labels = _step_labels(results["tasks"])
    steps = sorted(set(matrix.tasks("image_auroc")) & set(matrix.tasks("pixel_auroc")))
    head = [labels[t] if t < len(labels) else str(t + 1) for t in steps]
    cells = [f"{_pct(matrix.step_average('image_auroc', t))} / {_pct(matrix.step_average('pixel_auroc', t))}" for t in steps]
    s = results["summary"]
    return [
        "## AUROC after each step (image / pixel, %; the paper's Table 5 shape)",
        "",
        "| Step | " + " | ".join(head) + " | FM |",
        "|---|" + "---|" * (len(head) + 1),
        f"| {results.get('strategy') or results['name']} | " + " | ".join(cells)
        + f" | {_pair(s, 'forgetting', 'image_auroc', 'pixel_auroc', 2)} |",
    ]


def _per_task_tables(results: dict[str, Any], matrix: AccuracyMatrix) -> list[str]:
    metrics = list(results["summary"])
    tasks = results["tasks"]
    lines: list[str] = []
    for t in sorted({t for m in metrics for t in matrix.tasks(m)}):
        new = tasks[t] if t < len(tasks) else []
        lines += [f"### After task {t} (learned: {', '.join(new) or '–'})", ""]
        lines += ["| Class | Task | " + " | ".join(_TITLES.get(m, m) for m in metrics) + " |"]
        lines += ["|---|---|" + "---|" * len(metrics)]
        rows = {m: matrix.row(m, t) if t in matrix.tasks(m) else {} for m in metrics}
        for cls in [c for c in matrix.classes() if any(c in r for r in rows.values())]:
            cells = [_pct(rows[m].get(cls)) for m in metrics]
            lines.append(f"| {cls} | {matrix.own_task(cls)} | " + " | ".join(cells) + " |")
        means = [_pct(_nanmean(rows[m].values())) for m in metrics]
        lines += ["| **mean** | | " + " | ".join(means) + " |", ""]
    return lines


def _nanmean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _write_csv(path: Path, matrix: AccuracyMatrix, metrics: list[str]) -> None:
    """Long format: one row per (after_task, class) with every metric as a column (empty = undefined)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task", "class", "own_task", *metrics])
        for t in sorted({t for m in metrics for t in matrix.tasks(m)}):
            rows = {m: matrix.row(m, t) if t in matrix.tasks(m) else {} for m in metrics}
            for cls in [c for c in matrix.classes() if any(c in r for r in rows.values())]:
                vals = [rows[m].get(cls, math.nan) for m in metrics]
                writer.writerow([t, cls, matrix.own_task(cls), *("" if not math.isfinite(v) else f"{v:.6f}" for v in vals)])


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_metric_over_tasks(path: str | Path, matrix: AccuracyMatrix, metric: str, tasks: list[list[str]],
                           run_label: str | None = None) -> Path:
    """One line per class (its value after each step since it was learned) plus the mean over seen classes;
    ``run_label`` (run name · setting · strategy) heads the plot, so a figure seen alone says what it shows."""
    steps = matrix.tasks(metric)
    labels = _step_labels(tasks)
    classes = matrix.classes(metric)
    fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, cls in enumerate(classes):
        xs = [t for t in steps if cls in matrix.row(metric, t)]
        ys = [100.0 * matrix.get(metric, t, cls) for t in xs]
        ax.plot(xs, ys, ms=4, lw=1.2, label=cls.split("/", 1)[-1], **class_style(i))
    mean = [100.0 * matrix.step_average(metric, t) for t in steps]
    ax.plot(steps, mean, color="black", lw=2.5, marker="s", label="mean")
    ax.set_xticks(steps, [labels[t] if t < len(labels) else str(t + 1) for t in steps])
    ax.set_xlabel("after learning classes (task step)")
    ax.set_ylabel(f"{_TITLES.get(metric, metric)} (%)")
    title = f"{_TITLES.get(metric, metric)} per class over the task sequence"
    ax.set_title(f"{run_label}\n{title}" if run_label else title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(classes) > 12 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def class_style(i: int) -> dict[str, Any]:
    """Line style of class i: the 10 well-separated tab10 colours, then the same colours dashed, then dotted, each
    pass with its own marker (tab20's paired light/dark shades are hard to tell apart in a 15-class plot)."""
    from matplotlib import colormaps

    lap = i // 10
    return {"color": colormaps["tab10"](i % 10), "linestyle": ("-", "--", ":")[lap % 3],
            "marker": ("o", "^", "s", "D")[lap % 4]}


def _to_numpy_images(x: torch.Tensor | np.ndarray, channels: int) -> np.ndarray:
    """B×C×H×W (tensor or array) → B×H×W×C float in [0, 1] (C squeezed when 1)."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise CdadError(f"heat-map grid: expected B×{channels}×H×W, got shape {arr.shape}")
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if channels == 1 else np.clip(arr, 0.0, 1.0)


def save_heatmap_grid(
    path: str | Path,
    images: torch.Tensor,
    recons: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor,
    titles: Sequence[str],
    suptitle: str | None = None,
) -> Path:
    """A grid, one row per image: input | reconstruction | anomaly-map overlay | ground truth; ``suptitle`` (run,
    task, class) heads it.

    The map colour scale is shared by every row of the grid (min..max over all maps given), so normal and
    anomalous images of the class are comparable. Pass a few normal and a few anomalous images of one class.
    Main process only (no rank check).
    """
    imgs, recs = _to_numpy_images(images, 3), _to_numpy_images(recons, 3)
    amaps, gts = _to_numpy_images(maps, 1), _to_numpy_images(masks, 1)
    n = imgs.shape[0]
    if not (recs.shape[0] == amaps.shape[0] == gts.shape[0] == len(titles) == n):
        raise CdadError(
            f"heat-map grid {path}: counts differ: images {n}, recons {recs.shape[0]}, maps {amaps.shape[0]}, "
            f"masks {gts.shape[0]}, titles {len(titles)}"
        )
    lo, hi = float(amaps.min()), float(amaps.max())
    fig = Figure(figsize=(4 * 2.2, n * 2.3 + 0.3), dpi=110, layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        panels = [
            (imgs[i], None, titles[i]),
            (recs[i], None, "reconstruction"),
            (None, None, f"anomaly map (max {amaps[i].max():.3g})"),
            (gts[i], "gray", "ground truth"),
        ]
        for j, (img, cmap, title) in enumerate(panels):
            ax = axes[i, j]
            if j == 2:
                ax.imshow(imgs[i])
                im = ax.imshow(amaps[i], cmap="jet", alpha=0.5, vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
            else:
                ax.imshow(img, cmap=cmap, vmin=0.0 if cmap else None, vmax=1.0 if cmap else None)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(0.8, 0.35 * n), label="anomaly score (shared scale)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# comparing runs
# ----------------------------------------------------------------------------------------------------------------
def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``<run_dir>/report/results.json`` (or ``run_dir`` itself when it is that file)."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.suffix == ".json" else run_dir / "report" / "results.json"
    if not path.is_file():
        raise CdadError(f"no report found: {path} is missing (run `cdad eval` / finish the run first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CdadError(f"report {path} is not valid JSON: {exc}") from exc
    if data.get("format") != REPORT_FORMAT or "matrix" not in data:
        raise CdadError(f"report {path} is not a format-{REPORT_FORMAT} cdad results.json")
    return data


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """One Markdown table comparing runs (e.g. naive vs cdad vs joint) from their results.json.

    The gap to joint is filled when exactly one run has ``strategy == "joint"`` and its final classes match."""
    if not run_dirs:
        raise CdadError("compare_runs: no run directories given")
    runs = [load_results(d) for d in run_dirs]
    matrices = [AccuracyMatrix.from_dict(r["matrix"]) for r in runs]
    joints = [i for i, r in enumerate(runs) if r.get("strategy") == "joint"]
    joint = matrices[joints[0]] if len(joints) == 1 else None
    lines = [
        "| Run | Strategy | Setting | A-AUROC img / pix (↑) | FM img / pix (↓) | A-AP img / pix (↑) | A-PRO (↑) "
        "| Gap to joint img / pix (↓) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for run, mat in zip(runs, matrices):
        s = run["summary"]
        gap = "–"
        if joint is not None and {"image_auroc", "pixel_auroc"} <= set(mat.metrics) & set(joint.metrics):
            try:
                gap = f"{_pct(mat.gap_to(joint, 'image_auroc'), 2)} / {_pct(mat.gap_to(joint, 'pixel_auroc'), 2)}"
            except CdadError as exc:
                notes.append(f"- {run['name']}: no gap to joint ({exc})")
        lines.append(
            f"| {run['name']} | {run.get('strategy') or '–'} | {run.get('setting') or '–'} "
            f"| {_pair(s, 'final_average', 'image_auroc', 'pixel_auroc', 1)} "
            f"| {_pair(s, 'forgetting', 'image_auroc', 'pixel_auroc', 2)} "
            f"| {_pair(s, 'final_average', 'image_ap', 'pixel_ap', 1)} "
            f"| {_pct(s.get('pixel_aupro', {}).get('final_average'))} | {gap} |"
        )
    final_sets = {tuple(sorted(m.classes())) for m in matrices}
    if len(final_sets) > 1:
        notes.append("- the runs do not evaluate the same classes: compare with care")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
