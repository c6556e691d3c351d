"""Typed run configuration: dataclasses, YAML loading and `--set a.b=c` overrides.

Each module owns the dataclass of its own options (model preset, NSA, continual strategy, reconstruction, anomaly
map); this file only composes them. Loading goes through `dacite` in strict mode, so an unknown key or a value of
the wrong type is an error that names the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dacite
import yaml

from cdad_dist.config_checks import check_choices
from cdad_dist.continual.config import ContinualConfig
from cdad_dist.data.formats import DATASET_REGISTRY
from cdad_dist.data.perturb import NSAConfig
from cdad_dist.data.synthetic import SyntheticAnomalyConfig
from cdad_dist.errors import ConfigError
from cdad_dist.eval.anomaly_map import AnomalyMapConfig
from cdad_dist.eval.head_maps import HeadScoringConfig
from cdad_dist.eval.metrics import MetricConfig
from cdad_dist.eval.reconstruct import ReconstructionConfig
from cdad_dist.models.presets import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


@dataclass
class DataConfig:
    """Where the images come from and how they are streamed."""

    dataset: str = "demo"  # a format of data/formats.py's registry: demo, real_photos, mvtec, visa, folder
    # dataset root; `demo` and `real_photos` (scikit-image's photographs) are generated there when missing
    root: str = "demo_data"
    folder_name: str = "folder"  # dataset name of a generic folder dataset (`dataset: folder`)
    shards: str = "shards/demo"  # WebDataset shard directory; built from `root` when missing
    shard_image_size: int | None = 128  # images are pre-resized to this side when shards are built
    samples_per_shard: int | None = 16  # None: about 1 GB per shard
    skip_bad: bool = False
    batch_size: int = 8  # per process
    num_workers: int = 0
    shuffle_buffer: int = 64
    nsa: NSAConfig = field(default_factory=NSAConfig)
    synthetic: SyntheticAnomalyConfig = field(default_factory=SyntheticAnomalyConfig)  # segmentation head only

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_REGISTRY:
            raise ConfigError(f"data.dataset must be one of {sorted(DATASET_REGISTRY)}, got {self.dataset!r}")


@dataclass
class TrainConfig:
    """Optimisation budget and schedule, per task (base task and incremental tasks separately, as the paper)."""

    base_steps: int = 1500
    incremental_steps: int = 500
    base_epochs: float = 0.0  # > 0 overrides base_steps (epochs of the task's training images)
    incremental_epochs: float = 0.0
    lr: float = 3e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was given
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at task ends
    keep_last: int = 2  # mid-task checkpoints kept (task-end checkpoints are always kept)
    log_every: int = 25
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    loss_balance_warn: float = 100.0  # warn when λ·AMN and ε loss terms differ by more than this factor (0: off)
    # Start from another run's task-end checkpoint (its run dir = its newest task end, or a checkpoint dir) whose
    # tasks are a prefix of this run's: e.g. several continual strategies from one trained base task.
    init_from: str | None = None


@dataclass
class EvalConfig:
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    anomaly_map: AnomalyMapConfig = field(default_factory=AnomalyMapConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)  # pixel-score resolution, AUPRO FPR limit, ...
    # the scored map: the feature distance, the segmentation head's map, or both fused (eval/head_maps.py)
    map: Literal["features", "head", "fused"] = "features"
    head_scoring: HeadScoringConfig = field(default_factory=HeadScoringConfig)
    # with a head: also record every map kind's metrics (`features.pixel_ap`, `head.…`, `fused.…`)
    compare_maps: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "eval")
    batch_size: int = 16
    heatmap_images: int = 2  # per class: this many normal and this many anomalous images in the heatmap grid
    max_test_per_class: int | None = None


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "runs"
    sequence: str | list[list[str]] = "demo-3x2"
    tasks: str | None = None  # run a slice of the sequence, e.g. "1:3" (quote it in YAML files)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _to_float(value: Any) -> float:
    # YAML reads `1e-4` as a string and `1` as an int; both are meant as floats. (In a union, dacite tries the
    # members in order, so `int | float` keeps ints as ints.)
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # type: ignore[return-value]  # dacite then reports the wrong type
    return value


_DACITE = dacite.Config(strict=True, cast=[tuple], type_hooks={float: _to_float})


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return dacite.from_dict(RunConfig, data, config=_DACITE)
    except dacite.UnexpectedDataError as err:
        keys = ", ".join(_unknown_keys(data, RunConfig) or sorted(err.keys))
        raise ConfigError(f"{source}: unknown key(s) {keys}") from None
    except dacite.WrongTypeError as err:
        raise ConfigError(
            f"{source}: key '{err.field_path}' must be {_type_name(err.field_type)}, got {err.value!r}"
        ) from None
    except dacite.DaciteError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:  # a section's own validation (__post_init__): say which file it came from
        raise ConfigError(f"{source}: {err}") from None


def _unknown_keys(data: Any, cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the keys in ``data`` that ``cls`` (a dataclass, nested) has no field for."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        if key not in hints:
            out.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            out += _unknown_keys(value, hints[key], f"{prefix}{key}.")
    return sorted(out)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`1e-4`, `[a, b]`, `null`, `true`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        value = yaml.safe_load(raw)
        if isinstance(value, int) and ":" in raw:
            value = raw  # YAML 1.1 reads `1:3` as a base-60 number; a task slice is meant
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (default `configs/demo.yaml`), apply overrides, validate types and keys."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if data is None or data == {}:
            raise ConfigError(f"{path}: the config file is empty (without --config the demo config is used)")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"config file not found: {path}")
    cfg = config_from_dict(data, source=str(path))  # the file's own errors are the file's
    overrides = list(overrides or [])
    if overrides:
        cfg = _with_overrides(data, overrides)
    validate(cfg, str(path), overrides)
    return cfg


def _with_overrides(data: dict[str, Any], overrides: list[str]) -> RunConfig:
    """The config with every --set applied. Keys that depend on each other (a source and the path it needs) are
    judged together; when the result is invalid, the error names the first --set after the last valid prefix."""
    prefixes = [data]
    for item in overrides:
        prefixes.append(apply_overrides(prefixes[-1], [item]))
    try:
        return config_from_dict(prefixes[-1], source=f"--set {overrides[-1]}")
    except ConfigError as final_error:
        for j in range(len(overrides) - 1, -1, -1):
            try:
                config_from_dict(prefixes[j], source="")
            except ConfigError:
                continue
            config_from_dict(prefixes[j + 1], source=f"--set {overrides[j]}")  # raises, naming that --set
            break
        raise final_error


def validate(cfg: RunConfig, source: str, overrides: list[str] | None = None) -> None:
    """Value checks across keys; the error names the --set that gave the offending key, else the file."""
    checks = [  # (holds, the key to blame, message)
        (cfg.data.batch_size > 0, "data.batch_size", "must be > 0"),
        (cfg.train.grad_accum > 0, "train.grad_accum", "must be > 0"),
        (cfg.train.base_steps > 0 or cfg.train.base_epochs > 0, "train.base_steps",
         "or train.base_epochs must be > 0"),
        (cfg.train.incremental_steps > 0 or cfg.train.incremental_epochs > 0, "train.incremental_steps",
         f"or train.incremental_epochs must be > 0 (got {cfg.train.incremental_steps} and "
         f"{cfg.train.incremental_epochs}): a task with 0 steps would learn nothing"),
        (cfg.train.base_steps >= 0 and cfg.train.incremental_steps >= 0 and cfg.train.base_epochs >= 0
         and cfg.train.incremental_epochs >= 0, "train.*_steps", "and train.*_epochs must be >= 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: at task ends only)"),
        (cfg.train.keep_last >= 1, "train.keep_last", "must be >= 1"),
        (cfg.train.log_every > 0, "train.log_every", "must be > 0"),
        (cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0"),
        (cfg.eval.heatmap_images >= 0, "eval.heatmap_images", "must be >= 0"),
        (cfg.eval.max_test_per_class is None or cfg.eval.max_test_per_class > 0, "eval.max_test_per_class",
         "must be > 0 or null (all)"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (bool(cfg.name) and "/" not in cfg.name, "name", "must be a non-empty directory name"),
        (cfg.eval.map == "features" or cfg.model.seg_head.enabled, "eval.map",
         f"={cfg.eval.map!r} needs a segmentation head: set model.seg_head.enabled=true"),
        (cfg.eval.map in ("features", "head", "fused"), "eval.map", "must be one of features, head, fused"),
    ]
    for ok, key, message in checks:
        if not ok:
            given = [o for o in overrides or [] if o.split("=", 1)[0].strip() == key]
            raise ConfigError(f"{'--set ' + given[-1] if given else source}: {key} {message}")
    try:  # the model section's own checks (preset values, widths, backends) at load time, not at build time
        from cdad_dist.models.presets import resolve_config

        resolve_config(cfg.model)
    except ConfigError as err:
        given = [o for o in overrides or [] if o.split("=", 1)[0].strip().startswith("model.")]
        raise ConfigError(f"{'--set ' + given[-1] if given else source}: {err}") from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
