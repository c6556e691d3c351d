"""Named continual task sequences (class orders of the CDAD/IUF protocols) and inline sequences.

Class orders follow the authors' task lists (see shared/design/official_code_notes.md §5): MVTec settings S1–S4
and VisA S1–S3 use the classes in alphabetical order. The cross-dataset settings are only in the paper (Table 4:
"base training on MVTec followed by incremental training on VisA"), so they are two tasks: one dataset each.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cdad_dist.errors import ConfigError

MVTEC_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
# Demo order interleaves textures and objects so that every multi-class demo task mixes both kinds.
DEMO_CLASSES: tuple[str, ...] = ("carpet", "bottle", "grid", "nut", "wood", "pill")
# The real-photo check (data/real_photos.py): colour photos, then grey ones, then colour again, so that the
# sequence crosses a strong change of image statistics in both directions.
REAL_SEQUENCE_CLASSES: tuple[str, ...] = ("coffee", "chelsea", "coins", "camera", "astronaut", "rocket")

ONE_CLASS_PER_TASK = "one-class-per-task"


@dataclass(frozen=True)
class TaskSequence:
    """An ordered list of tasks; each task is a list of qualified class names (`dataset/cls`)."""

    name: str
    tasks: list[list[str]]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(f"task sequence {self.name!r} has no tasks")
        seen: dict[str, int] = {}
        for t, task in enumerate(self.tasks):
            if not task:
                raise ConfigError(f"task sequence {self.name!r}: task {t} is empty")
            for cls in task:
                if not isinstance(cls, str) or cls.count("/") != 1 or not all(cls.split("/")):
                    raise ConfigError(f"task sequence {self.name!r}: {cls!r} is not a qualified 'dataset/class' name")
                if cls in seen:
                    raise ConfigError(
                        f"task sequence {self.name!r}: class {cls!r} appears twice (tasks {seen[cls]} and {t})"
                    )
                seen[cls] = t

    def __len__(self) -> int:
        return len(self.tasks)

    def _check_index(self, t: int) -> None:
        if not 0 <= t < len(self.tasks):
            raise IndexError(f"task index {t} out of range for sequence {self.name!r} with {len(self.tasks)} tasks")

    def new_classes(self, t: int) -> list[str]:
        """Classes trained in task t."""
        self._check_index(t)
        return list(self.tasks[t])

    def classes_seen(self, t: int) -> list[str]:
        """Every class of tasks 0..t, in sequence order."""
        self._check_index(t)
        return [c for task in self.tasks[: t + 1] for c in task]

    def eval_classes(self, t: int) -> list[str]:
        """Classes evaluated after task t: every class seen so far (the continual protocol)."""
        return self.classes_seen(t)

    def all_classes(self) -> list[str]:
        return self.classes_seen(len(self.tasks) - 1)

    def task_of(self, cls: str) -> int:
        """Index of the task that trains `cls`."""
        for t, task in enumerate(self.tasks):
            if cls in task:
                return t
        raise ConfigError(f"class {cls!r} is not in task sequence {self.name!r}")

    def datasets(self) -> list[str]:
        """Datasets used, in order of first appearance."""
        return list(dict.fromkeys(c.split("/", 1)[0] for c in self.all_classes()))

    def to_dict(self) -> dict:
        return {"name": self.name, "tasks": [list(t) for t in self.tasks]}


def _q(dataset: str, classes: Iterable[str]) -> list[str]:
    return [f"{dataset}/{c}" for c in classes]


def _base_plus_steps(dataset: str, classes: Sequence[str], base: int, step: int) -> list[list[str]]:
    """First `base` classes as task 0, then the rest in tasks of `step` classes."""
    rest = classes[base:]
    return [_q(dataset, classes[:base])] + [_q(dataset, rest[i : i + step]) for i in range(0, len(rest), step)]


def _named() -> dict[str, list[list[str]]]:
    m, v, d = MVTEC_CLASSES, VISA_CLASSES, DEMO_CLASSES
    return {
        "14-1": _base_plus_steps("mvtec", m, 14, 1),
        "10-5": _base_plus_steps("mvtec", m, 10, 5),
        "3x5": _base_plus_steps("mvtec", m, 3, 3),
        "10-1x5": _base_plus_steps("mvtec", m, 10, 1),
        "11-1": _base_plus_steps("visa", v, 11, 1),
        "8-4": _base_plus_steps("visa", v, 8, 4),
        "8-1x4": _base_plus_steps("visa", v, 8, 1),
        "mvtec-to-visa": [_q("mvtec", m), _q("visa", v)],
        "visa-to-mvtec": [_q("visa", v), _q("mvtec", m)],
        "demo-3x2": _base_plus_steps("demo", d, 2, 2),
        "demo-2x3": _base_plus_steps("demo", d, 3, 3),
        "demo-1x6": _base_plus_steps("demo", d, 1, 1),
        "real-3x2": _base_plus_steps("real", REAL_SEQUENCE_CLASSES, 2, 2),
    }


_ALIASES = {
    **{f"mvtec-{k}": k for k in ("14-1", "10-5", "3x5", "10-1x5")},
    **{f"visa-{k}": k for k in ("11-1", "8-4", "8-1x4")},
}


def sequence_names() -> list[str]:
    """Names accepted by `resolve_sequence` (besides inline specs and aliases)."""
    return [*_named(), ONE_CLASS_PER_TASK]


def named_sequence(name: str) -> TaskSequence:
    """A named sequence; `×` is accepted for `x` and `mvtec-`/`visa-` prefixes for the per-dataset settings."""
    key = name.strip().lower().replace("×", "x").replace(" ", "")
    key = _ALIASES.get(key, key)
    table = _named()
    if key not in table:
        raise ConfigError(f"unknown task sequence {name!r}; known: {sequence_names()}")
    return TaskSequence(key, table[key])


def one_class_per_task(classes: Sequence[str], dataset: str | None = None) -> TaskSequence:
    """One task per class, in the given order (bare names are qualified with `dataset`)."""
    return TaskSequence(ONE_CLASS_PER_TASK, [[c] for c in _qualify_all(classes, dataset, None)])


def _qualify_all(names: Iterable[str], dataset: str | None, available: Sequence[str] | None) -> list[str]:
    """Qualify bare names with `dataset`, or by a unique match among `available` qualified names."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"class name {name!r} is not a non-empty string")
        name = name.strip()
        if "/" in name:
            out.append(name)
        elif dataset is not None:
            out.append(f"{dataset}/{name}")
        elif available is not None:
            hits = [a for a in available if a.split("/", 1)[1] == name]
            if len(hits) != 1:
                why = "matches no available class" if not hits else f"is ambiguous between {hits}"
                raise ConfigError(f"class {name!r} {why}; qualify it as 'dataset/{name}'")
            out.append(hits[0])
        else:
            raise ConfigError(f"class {name!r} is not qualified and no dataset was given to qualify it")
    return out


def _parse_inline(spec: str) -> list[list[str]]:
    """'a,b|c' -> [['a','b'],['c']] (for command-line overrides)."""
    return [[c for c in part.split(",") if c.strip()] for part in spec.split("|")]


def resolve_sequence(
    spec: str | Sequence[Sequence[str]] | TaskSequence,
    available_classes: Iterable[str] | None = None,
    dataset: str | None = None,
) -> TaskSequence:
    """Turn a sequence name, an inline spec (list of class lists, or 'a,b|c' text) into a validated TaskSequence.

    `available_classes` (qualified, or bare with `dataset`) are the classes the data provides; every class of the
    sequence must be among them. "one-class-per-task" uses the available classes in their given order.
    """
    available = None
    if available_classes is not None:
        available = _qualify_all(list(available_classes), dataset, None)
    if isinstance(spec, TaskSequence):
        seq = spec
    elif isinstance(spec, str):
        text = spec.strip()
        if text == ONE_CLASS_PER_TASK:
            if available is None:
                raise ConfigError(f"sequence {ONE_CLASS_PER_TASK!r} needs the available classes")
            seq = one_class_per_task(available)
        elif "|" in text or "," in text:
            seq = TaskSequence("inline", [_qualify_all(t, dataset, available) for t in _parse_inline(text)])
        else:
            seq = named_sequence(text)
    else:
        tasks = []
        for t, task in enumerate(spec):
            if isinstance(task, str):
                raise ConfigError(f"inline sequence: task {t} is the string {task!r}; expected a list of classes")
            tasks.append(_qualify_all(task, dataset, available))
        seq = TaskSequence("inline", tasks)
    if available is not None:
        have = set(available)
        for t, task in enumerate(seq.tasks):
            for cls in task:
                if cls not in have:
                    raise ConfigError(
                        f"sequence {seq.name!r}: class {cls!r} (task {t}) is not in the data; available: {available}"
                    )
    return seq
