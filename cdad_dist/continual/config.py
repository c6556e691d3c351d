"""Options of the continual core (``continual:`` in the run config), torch-free.

Every section validates when it is built (``__post_init__``: ``check_choices`` for Literal fields, plus range
checks), so a bad value fails when the config loads, not after a task has trained. Strategy and sketch names come
from the registries (``continual/registry.py``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

from cdad_dist.config_checks import check_choices
from cdad_dist.continual.registry import SKETCH_REGISTRY, STRATEGY_REGISTRY
from cdad_dist.errors import ConfigError

StrategyName = Literal[tuple(STRATEGY_REGISTRY)]  # type: ignore[valid-type]
SketchName = Literal[("auto", *SKETCH_REGISTRY)]  # type: ignore[valid-type]


@dataclass
class LayerPatterns:
    """Glob patterns (``fnmatch``) on qualified names such as ``unet.down_blocks.0.resnets.0.conv1``."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"continual.layer_patterns.{key} must be a list of glob strings, got {value!r}")

    def matches(self, name: str) -> bool:
        included = any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


@dataclass
class CaptureConfig:
    """Which forward passes feed the sketches after a task."""

    mode: Literal["trajectory", "random_t"] = "trajectory"  # trajectory: DDIM steps from the start timestep
    # int ≥ 1: images of the task over all ranks; float in (0, 1]: fraction of each class. Applied once, by the
    # caller that streams the images (Trainer.capture_batches → eval_stream), never again by the strategy.
    images: int | float = 0.1
    max_columns_per_block: int | None = None  # None keeps every column of every block
    seed: int = 0
    ddim_steps: int = 10  # trajectory mode
    random_timesteps: int = 10  # random_t mode: timesteps drawn per image
    # Also capture each image's NSA-perturbed version, as training shows it (the AMN condition from x̃, and the
    # U-Net input from x̃'s latent under denoise_from=perturbed): the directions those inputs use are protected
    # too. Doubles the capture's forward passes.
    perturbed: bool = True
    # Also capture the U-Net and AMN on synthetic anomalies (data.synthetic: Perlin-mask blends and NSA patches,
    # the segmentation head's training inputs) when there is no head. A head always has them captured. The
    # features map of an old class rests on the U-Net repairing its *anomalous* images; clean and NSA inputs
    # alone leave the directions those use unprotected (docs/benchmarks.md "Forgetting on real-3x2").
    synthetic: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "continual.capture")
        images = self.images
        if isinstance(images, bool) or not isinstance(images, (int, float)):
            raise ConfigError(f"continual.capture.images must be an int count or a float fraction, got {images!r}")
        if isinstance(images, int) and images < 1:
            raise ConfigError(f"continual.capture.images: a count must be >= 1, got {images}")
        if isinstance(images, float) and not 0.0 < images <= 1.0:
            raise ConfigError(f"continual.capture.images: a fraction must be in (0, 1], got {images}")
        if self.max_columns_per_block is not None and self.max_columns_per_block < 1:
            raise ConfigError("continual.capture.max_columns_per_block must be >= 1 or null, "
                              f"got {self.max_columns_per_block}")
        for key in ("ddim_steps", "random_timesteps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"continual.capture.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class KnnConfig:
    """``continual.knn``: the memory-bank baseline's options."""

    input_size: int | None = None  # extractor input side; None: the model's image size
    coreset: float = 1.0           # fraction of each class's patches kept by greedy k-center selection (1 = all)
    coreset_dim: int = 128         # random projection used only to choose the coreset (PatchCore's trick)
    query_chunk: int = 4096        # test patches per distance block (bounds memory)
    sigma: float = 4.0             # Gaussian smoothing of the map, in image pixels

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset <= 1.0:
            raise ConfigError(f"continual.knn.coreset must be in (0, 1], got {self.coreset}")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"continual.knn.input_size must be >= 16 or null, got {self.input_size}")
        if self.coreset_dim < 1 or self.query_chunk < 1 or self.sigma < 0:
            raise ConfigError("continual.knn: coreset_dim and query_chunk must be >= 1 and sigma >= 0")


@dataclass
class GenerativeReplayConfig:
    """``continual.replay.generative``: ReplayCAD's compression of each finished class into a frozen local
    text-to-image LDM (a diffusers folder with text_encoder, tokenizer, unet, vae, optional scheduler) and the
    generation of ``replay.per_class`` replay images from it (continual/generative_replay.py)."""

    generator_path: str | None = None  # the diffusers folder; never downloaded
    tokens: int = 20                   # K learned token embeddings per class (the paper's default)
    mask_tokens: int = 4               # extra context tokens from the foreground mask (spatial branch)
    mask_dir: str | None = None        # <mask_dir>/<class>/*.png foreground masks; None: the documented fallback
    steps: int = 300                   # embedding-learning steps per class
    lr: float = 5e-3
    batch_size: int = 4
    ddim_steps: int = 50
    guidance: float = 5.0              # classifier-free guidance scale
    template: str = "a photo of a"     # the prompt the tokens follow
    chunk: int = 8                     # images generated per resumable chunk
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "steps", "batch_size", "ddim_steps", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"continual.replay.generative.{name} must be >= 1, got {getattr(self, name)}")
        if self.mask_tokens < 0 or self.lr <= 0 or self.guidance < 0:
            raise ConfigError("continual.replay.generative: mask_tokens must be >= 0, lr > 0 and guidance >= 0")


@dataclass
class ReplayConfig:
    """``continual.replay``: experience replay for the ``replay`` and ``cdad+replay`` strategies.

    After each task a bounded reservoir of each finished class's real training images is written as WebDataset
    shards under ``<run dir>/replay/``; in later tasks that share of every batch comes from them."""

    source: Literal["buffer", "generative"] = "buffer"  # real images kept, or images generated (ReplayCAD)
    per_class: int = 16      # images kept (buffer) or generated (generative) per finished class
    ratio: float = 0.25      # share of each training batch drawn from the replay shards (rounded per batch)
    seed: int = 0            # which images the reservoir keeps
    generative: GenerativeReplayConfig = field(default_factory=GenerativeReplayConfig)

    def __post_init__(self) -> None:
        if isinstance(self.generative, dict):
            self.generative = build_section(GenerativeReplayConfig, self.generative, "continual.replay.generative")
        check_choices(self, "continual.replay")
        if self.source == "generative":
            path = self.generative.generator_path
            if not path:
                raise ConfigError("continual.replay.source=generative needs continual.replay.generative."
                                  "generator_path (a local diffusers text-to-image folder)")
            from pathlib import Path

            missing = [d for d in ("text_encoder", "tokenizer", "unet", "vae") if not (Path(path) / d).is_dir()]
            if missing:
                raise ConfigError(f"continual.replay.generative.generator_path: {path} lacks {missing} (a diffusers "
                                  "folder with text_encoder, tokenizer, unet and vae)")
        if self.per_class < 1:
            raise ConfigError(f"continual.replay.per_class must be >= 1, got {self.per_class}")
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"continual.replay.ratio must be in (0, 1), got {self.ratio}")


@dataclass
class ContinualConfig:
    """Options of the continual core (``continual:`` in the run config)."""

    strategy: StrategyName = "cdad"
    sketch: SketchName = "auto"  # auto: the cost model's choice per layer
    gamma: float = 0.999
    # Per-layer energy thresholds: glob pattern on the qualified name → γ (first match wins; else `gamma`), as GPM
    # thresholds layers differently. Default: the segmentation head's small layers (model.seg_head) at 0.9 — at
    # 0.999 they fill to 94–98 % of their input space after two demo tasks and the head stops learning new
    # classes; 0.9 gave the best final average of every metric on demo-3x2, 0.95 half its forgetting
    # (docs/benchmarks.md, "Segmentation head").
    gamma_by_layer: dict[str, float] = field(default_factory=lambda: {"seg_head.*": 0.9})
    project: Literal["update", "grad"] = "update"  # update (holds under AdamW) | grad (paper; exact only for SGD)
    paper_faithful: bool = False  # paper's unscaled iSVD + Eq. 6 cross-task merge
    layer_patterns: LayerPatterns = field(default_factory=LayerPatterns)
    freeze_unprotected: bool = True  # in incremental tasks, requires_grad=False on everything but protected weights
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)  # the `knn` baseline's memory banks
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # the `replay` / `cdad+replay` buffer
    memory_budget_mb: float = 256.0  # per layer: auto's cost model keeps each sketch's peak within it
    basis_dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    isvd_carry_gamma: float | None = None  # None = 1 - (1 - gamma) / 100 (sketches.default_carry_gamma)
    isvd_max_rank: int | None = None
    isvd_buffer_columns: int | None = None  # columns buffered per SVD fold; None: d (isvd) or budget-sized (auto)
    plan_rank_fraction: float = 0.25  # basis rank / d assumed by auto's cost model and `cdad plan`
    sketch_device: str | None = None  # None: where the activations are
    # With several ranks, each protected layer's sketch, decomposition and (update mode) projection run on one
    # owner rank (continual/ownership.py); false replicates them on every rank (the comparison baseline).
    layer_ownership: bool = True

    def __post_init__(self) -> None:
        for key, cls in (("layer_patterns", LayerPatterns), ("capture", CaptureConfig), ("knn", KnnConfig),
                         ("replay", ReplayConfig)):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, build_section(cls, getattr(self, key), f"continual.{key}"))
        check_choices(self, "continual")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"continual.gamma must be in [0, 1], got {self.gamma}")
        for pattern, value in self.gamma_by_layer.items():
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"continual.gamma_by_layer[{pattern!r}] must be in [0, 1], got {value!r}")
        if self.paper_faithful and self.sketch not in ("auto", "isvd_paper"):
            raise ConfigError(f"continual.paper_faithful uses the paper's iSVD; continual.sketch={self.sketch!r} "
                              "contradicts it (use auto or isvd_paper)")
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"continual.memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.isvd_buffer_columns is not None and self.isvd_buffer_columns < 1:
            raise ConfigError(f"continual.isvd_buffer_columns must be >= 1 or null, got {self.isvd_buffer_columns}")
        if not 0.0 < self.plan_rank_fraction <= 1.0:
            raise ConfigError(f"continual.plan_rank_fraction must be in (0, 1], got {self.plan_rank_fraction}")

    def gamma_for(self, name: str) -> float:
        """γ of protected layer ``name``: the first matching pattern of ``gamma_by_layer``, else ``gamma``."""
        for pattern, value in self.gamma_by_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return float(value)
        return self.gamma

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualConfig:
        return build_section(cls, data, "continual")


def build_section(cls, data: dict, where: str):
    """A config dataclass from a plain dict, refusing unknown keys by their dotted name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
