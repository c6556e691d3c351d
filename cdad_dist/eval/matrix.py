"""The continual accuracy matrix ``A[metric][after_task][class]`` and every number derived from it.

It is the single source of the continual results (A-AUROC, FM, gap to joint); it is saved with each
checkpoint (``to_dict``) and in the report. ``after_task`` is the 0-based index of the task just learned;
``class`` a qualified class name such as ``"mvtec/bottle"``.

Undefined cells (NaN, e.g. a class without anomalous pixels) are stored as ``None`` in JSON and skipped,
with a warning, by the averages.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from cdad_dist.errors import CdadError

_FORMAT = 1


class AccuracyMatrix:
    """``A[metric][after_task][class] = value``; see the module docstring."""

    def __init__(self, task_classes: list[list[str]] | None = None) -> None:
        """``task_classes`` (optional): the classes of each task, in order. Without it, a class's own task is
        the first task after which it was evaluated (true when every seen class is evaluated after each task)."""
        self._values: dict[str, dict[int, dict[str, float]]] = {}
        self.task_classes: list[list[str]] | None = [list(t) for t in task_classes] if task_classes else None

    # --- filling ---------------------------------------------------------------------------------------------
    def record(self, metric: str, after_task: int, cls: str, value: float) -> None:
        """Set one cell (re-recording a cell overwrites it, e.g. when a resumed run repeats an evaluation)."""
        if not isinstance(metric, str) or not metric:
            raise CdadError(f"accuracy matrix: metric name must be a non-empty string, got {metric!r}")
        if isinstance(after_task, bool) or not isinstance(after_task, int) or after_task < 0:
            raise CdadError(f"accuracy matrix: after_task must be an int >= 0, got {after_task!r} ({metric}, {cls})")
        if not isinstance(cls, str) or not cls:
            raise CdadError(f"accuracy matrix: class must be a non-empty string, got {cls!r}")
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise CdadError(f"accuracy matrix: value of {metric}/{after_task}/{cls} is not a number: {value!r}") from exc
        self._values.setdefault(metric, {}).setdefault(after_task, {})[cls] = value

    def record_all(self, after_task: int, cls: str, values: dict[str, float]) -> None:
        """Record every metric of one class evaluation (e.g. ``ClassMetricAccumulator.compute()``)."""
        for metric, value in values.items():
            self.record(metric, after_task, cls, value)

    # --- reading ---------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        return list(self._values)

    def tasks(self, metric: str) -> list[int]:
        """The ``after_task`` indices recorded for ``metric``, ascending."""
        return sorted(self._table(metric))

    def classes(self, metric: str | None = None) -> list[str]:
        """Every class recorded (for ``metric``, or any), ordered by first evaluation, then name."""
        metrics = [metric] if metric else self.metrics
        first: dict[str, int] = {}
        for m in metrics:
            for t, row in self._table(m).items():
                for cls in row:
                    first[cls] = min(first.get(cls, t), t)
        order = self._class_order()
        return sorted(first, key=lambda c: (first[c], order.get(c, len(order)), c))

    def get(self, metric: str, after_task: int, cls: str) -> float:
        try:
            return self._table(metric)[after_task][cls]
        except KeyError:
            raise CdadError(f"accuracy matrix: no value for {metric} after task {after_task} for class {cls!r}") from None

    def row(self, metric: str, after_task: int) -> dict[str, float]:
        """``{class: value}`` of the evaluation after ``after_task``."""
        table = self._table(metric)
        if after_task not in table:
            raise CdadError(f"accuracy matrix: no evaluation of {metric} after task {after_task}")
        return dict(table[after_task])

    def own_task(self, cls: str) -> int:
        """The task that introduced ``cls``: from ``task_classes`` when given, else its first evaluation."""
        if self.task_classes:
            for t, classes in enumerate(self.task_classes):
                if cls in classes:
                    return t
            raise CdadError(f"accuracy matrix: class {cls!r} is in none of the task_classes")
        firsts = [min(t for t, row in table.items() if cls in row) for table in self._values.values()
                  if any(cls in row for row in table.values())]
        if not firsts:
            raise CdadError(f"accuracy matrix: class {cls!r} was never recorded")
        return min(firsts)

    # --- derived numbers -------------------------------------------------------------------------------------
    def step_average(self, metric: str, after_task: int) -> float:
        """Mean over the classes evaluated after ``after_task`` (the per-step columns of the paper's Table 5)."""
        return _mean(self.row(metric, after_task).values(), f"{metric} after task {after_task}")

    def final_average(self, metric: str) -> float:
        """Mean over all classes after the last task.

        This is what the paper calls A-AUROC (and A-AP, A-PRO for the other metrics). Its Eq. 13 writes
        ``1/N * sum_{i=1}^{N-1} A_{N,i}``, a typo: the sum must run over all N tasks' classes, as here.
        """
        return self.step_average(metric, self._last(metric))

    def diagonal_average(self, metric: str) -> float:
        """Mean over tasks of the mean over that task's own classes right after learning it (plasticity)."""
        table = self._table(metric)
        per_task = []
        for t in sorted(table):
            own = [v for cls, v in table[t].items() if self.own_task(cls) == t]
            if own:
                per_task.append(_mean(own, f"{metric} diagonal, task {t}"))
        return _mean(per_task, f"{metric} diagonal")

    def forgetting(self, metric: str, last_task_classes: list[str] | None = None) -> float:
        """Forgetting measure FM (Chaudhry et al. 2018; the paper's Eq. 14), averaged over classes.

        Mean, over the classes *not* learned in the last task, of (max over earlier evaluations − final value).
        ``last_task_classes`` defaults to the classes whose own task is the last one. NaN when no class
        qualifies (a single-task or joint run).
        """
        drops = self.class_drops(metric, last_task_classes)
        return sum(drops.values()) / len(drops) if drops else math.nan

    def class_drops(self, metric: str, last_task_classes: list[str] | None = None) -> dict[str, float]:
        """Per old class: max over earlier evaluations − final value (the terms FM averages)."""
        table = self._table(metric)
        last = self._last(metric)
        if last_task_classes is None:
            last_task_classes = [c for c in table[last] if self.own_task(c) == last]
        drops: dict[str, float] = {}
        for cls, final in table[last].items():
            if cls in last_task_classes:
                continue
            earlier = [table[t][cls] for t in table if t < last and cls in table[t] and math.isfinite(table[t][cls])]
            if earlier and math.isfinite(final):
                drops[cls] = max(earlier) - final
        return drops

    def per_task(self, metric: str) -> dict[int, dict[str, float]]:
        """Per task (its own classes): ``final`` mean after the last task and ``forgetting`` mean drop (NaN for
        the last task). Averaging over classes weighs a task by its class count; these rows do not."""
        last = self._last(metric)
        final_row, drops = self.row(metric, last), self.class_drops(metric)
        by_task: dict[int, list[str]] = {}
        for cls in final_row:
            by_task.setdefault(self.own_task(cls), []).append(cls)
        out: dict[int, dict[str, float]] = {}
        for t, classes in sorted(by_task.items()):
            task_drops = [drops[c] for c in classes if c in drops]
            out[t] = {"final": _mean([final_row[c] for c in classes], f"{metric} final, task {t}"),
                      "forgetting": sum(task_drops) / len(task_drops) if task_drops else math.nan}
        return out

    def task_averages(self, metric: str) -> dict[str, float]:
        """A and FM averaged over tasks instead of classes (each task counts once)."""
        rows = self.per_task(metric).values()
        fm = [r["forgetting"] for r in rows if math.isfinite(r["forgetting"])]
        return {"final_average": _mean([r["final"] for r in rows], f"{metric} task-averaged final"),
                "forgetting": sum(fm) / len(fm) if fm else math.nan}

    def gap_to(self, joint: "AccuracyMatrix", metric: str) -> float:
        """Joint final average − this final average (≥ 0 when this run is below its joint upper bound).

        The two final rows must hold the same classes."""
        mine, theirs = set(self.row(metric, self._last(metric))), set(joint.row(metric, joint._last(metric)))
        if mine != theirs:
            raise CdadError(
                f"gap to joint ({metric}): the runs evaluate different classes; only here: {sorted(mine - theirs)}, "
                f"only in joint: {sorted(theirs - mine)}"
            )
        return joint.final_average(metric) - self.final_average(metric)

    def summary(self, metric: str, joint: "AccuracyMatrix | None" = None) -> dict[str, Any]:
        """Every derived number of one metric, for reports."""
        out: dict[str, Any] = {
            "final_average": self.final_average(metric),
            "diagonal_average": self.diagonal_average(metric),
            "forgetting": self.forgetting(metric),
            "step_average": {t: self.step_average(metric, t) for t in self.tasks(metric)},
            "task_averaged": self.task_averages(metric),
            "per_task": self.per_task(metric),
        }
        if joint is not None:
            out["gap_to_joint"] = self.gap_to(joint, metric)
        return out

    # --- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (NaN as None; task keys as strings)."""
        values = {
            m: {str(t): {c: (v if math.isfinite(v) else None) for c, v in row.items()} for t, row in sorted(tab.items())}
            for m, tab in self._values.items()
        }
        return {"format": _FORMAT, "task_classes": self.task_classes, "values": values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AccuracyMatrix":
        if not isinstance(data, dict) or data.get("format") != _FORMAT or "values" not in data:
            raise CdadError(f"accuracy matrix: not a format-{_FORMAT} matrix dict (keys: {sorted(data or {})})")
        out = cls(task_classes=data.get("task_classes"))
        for metric, table in data["values"].items():
            for t, row in table.items():
                try:
                    task = int(t)
                except ValueError:
                    raise CdadError(f"accuracy matrix: task key {t!r} of metric {metric!r} is not an int") from None
                for c, v in row.items():
                    out.record(metric, task, c, math.nan if v is None else v)
        return out

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        tmp.replace(path)
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> "AccuracyMatrix":
        path = Path(path)
        if not path.is_file():
            raise CdadError(f"accuracy matrix file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CdadError(f"accuracy matrix file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccuracyMatrix) and self.to_dict() == other.to_dict()

    # --- internals -------------------------------------------------------------------------------------------
    def _table(self, metric: str) -> dict[int, dict[str, float]]:
        if metric not in self._values:
            raise CdadError(f"accuracy matrix: no values for metric {metric!r} (have: {self.metrics})")
        return self._values[metric]

    def _last(self, metric: str) -> int:
        return max(self._table(metric))

    def _class_order(self) -> dict[str, int]:
        if not self.task_classes:
            return {}
        return {c: i for i, c in enumerate(c for task in self.task_classes for c in task)}


def _mean(values, what: str) -> float:
    values = list(values)
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        warnings.warn(f"{what}: {len(values) - len(finite)} undefined (NaN) value(s) left out of the mean", stacklevel=3)
    return sum(finite) / len(finite) if finite else math.nan
