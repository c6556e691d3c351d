"""NSA-style patch perturbation: rectangles cut from another image of the class, Poisson-blended into the target.

This is what the AMN learns to undo (x̃ -> x). It follows NSA (Schlüter et al., 2022) as configured by the CDAD
authors (official_code_notes.md §2): 1–4 patches (the first always, each further one independently with p=0.5),
half-widths 3–40 % of the side per axis, an optional ×[0.7, 1.3] resize, and `cv2.seamlessClone(NORMAL_CLONE)`.
Unlike the authors' MVTec loader, the patch comes from a *different* image (`source`) than the one it is pasted
into (`target`), as NSA intends.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cdad_dist.errors import ConfigError, DatasetError

MIN_PATCH_SIDE = 4  # seamlessClone needs an interior: at least one pixel inside a one-pixel boundary ring
# Padding around the image before cloning. seamlessClone (a) zeroes the outermost pixel ring of the mask, so a patch
# touching the image edge would lose its edge row/column and shift its bounding box, and (b) requires the
# destination ROI to lie inside the destination, and takes the Poisson boundary values from the pixels around the
# patch. Reflect-padding by a few pixels keeps every patch strictly inside, with natural boundary values; we crop
# the margin off again afterwards.
CLONE_MARGIN = 4
BLEND_MODES = ("poisson", "paste")


@dataclass
class NSAConfig:
    """Options of the patch perturbation (defaults: the CDAD authors' NSA arguments)."""

    probability: float = 0.5  # chance that an image is perturbed at all
    max_patches: int = 4
    extra_patch_probability: float = 0.5  # each patch after the first is added independently with this chance
    half_width_range: tuple[float, float] = (0.03, 0.4)  # patch half-width per axis, fraction of the image side
    resize: bool = True
    resize_range: tuple[float, float] = (0.7, 1.3)
    resize_std: float = 0.5  # scale = clip(N(1, std), *resize_range), as in NSA
    blend: str = "poisson"  # "poisson" (cv2.seamlessClone NORMAL_CLONE) or "paste"

    def __post_init__(self) -> None:
        for name in ("half_width_range", "resize_range"):  # YAML gives lists; keep (lo, hi) float tuples
            value = getattr(self, name)
            if len(value) != 2:
                raise ConfigError(f"nsa.{name}={value} must be a pair (lo, hi)")
            setattr(self, name, (float(value[0]), float(value[1])))
        for name in ("probability", "extra_patch_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"nsa.{name}={getattr(self, name)} must be in [0, 1]")
        if int(self.max_patches) != self.max_patches or self.max_patches < 1:
            raise ConfigError(f"nsa.max_patches={self.max_patches} must be an integer >= 1")
        lo, hi = self.half_width_range
        if not 0.0 < lo <= hi <= 0.5:
            raise ConfigError(f"nsa.half_width_range={self.half_width_range} must satisfy 0 < lo <= hi <= 0.5")
        rlo, rhi = self.resize_range
        if not 0.0 < rlo <= 1.0 <= rhi:
            raise ConfigError(f"nsa.resize_range={self.resize_range} must satisfy 0 < lo <= 1 <= hi")
        if self.resize_std < 0:
            raise ConfigError(f"nsa.resize_std={self.resize_std} must be >= 0")
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"nsa.blend={self.blend!r} must be one of {BLEND_MODES}")


@dataclass(frozen=True)
class PatchSpec:
    """One patch: the box cut from the source and the (possibly resized) box it covers in the target."""

    src_y: int
    src_x: int
    src_h: int
    src_w: int
    dst_y: int
    dst_x: int
    dst_h: int
    dst_w: int


def _check_image(name: str, img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        what = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DatasetError(f"NSA perturbation: {name} must be a uint8 H×W×3 array, got {what}")


class NSAPerturber:
    """`perturber(target, source, rng) -> (perturbed uint8 H×W×3, mask uint8 H×W in {0, 1})`."""

    def __init__(self, cfg: NSAConfig | None = None) -> None:
        self.cfg = cfg or NSAConfig()

    def __call__(
        self, target: np.ndarray, source: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_image("target", target)
        _check_image("source", source)
        if rng.random() >= self.cfg.probability:
            return target.copy(), np.zeros(target.shape[:2], np.uint8)
        return self.apply(target, source, self.sample_patches(target.shape[:2], source.shape[:2], rng))

    # -------------------------------------------------------------------------------------------- sampling

    def num_patches(self, rng: np.random.Generator) -> int:
        """1 + the number of further patches, each drawn independently (NSA's loop), so 1..max_patches."""
        extra = rng.random(self.cfg.max_patches - 1) < self.cfg.extra_patch_probability
        return 1 + int(extra.sum())

    def sample_patches(
        self, target_hw: tuple[int, int], source_hw: tuple[int, int], rng: np.random.Generator
    ) -> list[PatchSpec]:
        return [self._sample_one(target_hw, source_hw, rng) for _ in range(self.num_patches(rng))]

    def _side_bounds(self, side: int) -> tuple[int, int]:
        """Allowed full patch side for an image side: 2·half-width range, at least MIN_PATCH_SIDE, at most side."""
        lo, hi = self.cfg.half_width_range
        top = min(side, max(MIN_PATCH_SIDE, int(round(2 * hi * side))))
        bottom = min(top, max(MIN_PATCH_SIDE, int(round(2 * lo * side))))
        return bottom, top

    def _sample_one(
        self, target_hw: tuple[int, int], source_hw: tuple[int, int], rng: np.random.Generator
    ) -> PatchSpec:
        (th, tw), (sh, sw) = target_hw, source_hw
        lo, hi = self.cfg.half_width_range
        half = rng.uniform(lo, hi, 2)
        ph = int(np.clip(round(2 * half[0] * th), MIN_PATCH_SIDE, min(sh, th)))
        pw = int(np.clip(round(2 * half[1] * tw), MIN_PATCH_SIDE, min(sw, tw)))
        ph, pw = min(ph, sh), min(pw, sw)  # tiny source images
        sy, sx = int(rng.integers(0, sh - ph + 1)), int(rng.integers(0, sw - pw + 1))
        dh, dw = ph, pw
        if self.cfg.resize:
            scale = float(np.clip(rng.normal(1.0, self.cfg.resize_std), *self.cfg.resize_range))
            # As in NSA the resized side is clipped back into the patch-size bounds (and into the target).
            dh = int(np.clip(round(ph * scale), *self._side_bounds(th)))
            dw = int(np.clip(round(pw * scale), *self._side_bounds(tw)))
        dh, dw = min(dh, th), min(dw, tw)
        ty, tx = int(rng.integers(0, th - dh + 1)), int(rng.integers(0, tw - dw + 1))
        return PatchSpec(sy, sx, ph, pw, ty, tx, dh, dw)

    # ------------------------------------------------------------------------------------------- blending

    def apply(
        self, target: np.ndarray, source: np.ndarray, patches: list[PatchSpec]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Blend `patches` (in order) from `source` into a copy of `target`; returns (image, union mask)."""
        _check_image("target", target)
        _check_image("source", source)
        out = target.copy()
        mask = np.zeros(target.shape[:2], np.uint8)
        for p in patches:
            piece = source[p.src_y : p.src_y + p.src_h, p.src_x : p.src_x + p.src_w]
            if (p.dst_h, p.dst_w) != (p.src_h, p.src_w):
                piece = cv2.resize(piece, (p.dst_w, p.dst_h), interpolation=cv2.INTER_LINEAR)
            if self.cfg.blend == "poisson":
                out = _poisson_blend(out, piece, p.dst_y, p.dst_x)
            else:
                out[p.dst_y : p.dst_y + p.dst_h, p.dst_x : p.dst_x + p.dst_w] = piece
            mask[p.dst_y : p.dst_y + p.dst_h, p.dst_x : p.dst_x + p.dst_w] = 1
        return out, mask


def _poisson_blend(dst: np.ndarray, piece: np.ndarray, y: int, x: int) -> np.ndarray:
    """Poisson-blend `piece` into `dst` with its top-left corner at (y, x); pixels outside the box are unchanged."""
    m = CLONE_MARGIN
    h, w = piece.shape[:2]
    padded = cv2.copyMakeBorder(dst, m, m, m, m, cv2.BORDER_REFLECT_101)
    # The source canvas is the padded destination with the piece already in place, so that source and
    # destination ROIs coincide and no off-by-one from seamlessClone's centre convention can shift the patch.
    src = padded.copy()
    src[y + m : y + m + h, x + m : x + m + w] = piece
    clone_mask = np.zeros(padded.shape[:2], np.uint8)
    clone_mask[y + m : y + m + h, x + m : x + m + w] = 255
    # seamlessClone places the mask's bounding box (x0, y0, w, h) at centre - (w // 2, h // 2).
    centre = (x + m + w // 2, y + m + h // 2)
    blended = cv2.seamlessClone(src, padded, clone_mask, centre, cv2.NORMAL_CLONE)[m:-m, m:-m]
    # The Poisson solve runs on the box only; copying just the box back makes "outside the mask is untouched"
    # exact rather than approximate.
    out = dst.copy()
    out[y : y + h, x : x + w] = blended[y : y + h, x : x + w]
    return out
