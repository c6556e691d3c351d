"""Synthetic anomalies for the segmentation head: NSA patches and DiffusionAD's Perlin-mask blends.

Per image (DiffusionAD, ``data/dataset_beta_thresh.py``): with probability ``normal_fraction`` it stays normal
(empty mask); otherwise a Perlin-mask anomaly with probability ``perlin_fraction`` and an NSA patch (the AMN's
perturbation, always applied) else. Perlin mask: fractal-free Perlin noise at a scale of 2^U{lo..hi} cells per
axis, rotated by a uniform angle in ±90°, thresholded (redrawn when empty). The source filling the mask is a random
image of ``texture_dir`` when one is given (DTD in DiffusionAD), else DiffusionAD's self-augmentation branch: the
class's own image (another one of the class when the stream has one), colour-jittered and flipped, its 8×8 grid of
strips shuffled. Blend: ``x·(1−M) + (1−β)·src·M + β·x·M`` with β ~ U(beta_range).

Perlin noise is written out (25 lines of vectorised numpy, Perlin's gradient lattice with the quintic fade) rather
than taken from PyPI: the packages there (``perlin-noise``, ``fast-perlin-noise``, ...) are small single-author
projects, most evaluating point by point in Python, and the masks must come from the stream's seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cdad_dist.data.perturb import NSAConfig, NSAPerturber
from cdad_dist.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_REDRAWS = 50


@dataclass
class SyntheticAnomalyConfig:
    """``data.synthetic``: the head's training anomalies (used only when ``model.seg_head.enabled``)."""

    normal_fraction: float = 0.5
    perlin_fraction: float = 0.5            # of the anomalous images; the rest get NSA patches
    texture_dir: str | None = None          # Perlin sources (e.g. DTD); None: self-augmentation of the class
    perlin_scale_exponents: tuple[int, int] = (0, 5)   # 2^U{lo..hi} lattice cells per axis (DiffusionAD: 0..5)
    threshold: float = 0.5
    beta_range: tuple[float, float] = (0.2, 0.8)

    def __post_init__(self) -> None:
        for name in ("normal_fraction", "perlin_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.synthetic.{name}={getattr(self, name)} must be in [0, 1]")
        lo, hi = self.perlin_scale_exponents
        if not 0 <= lo <= hi <= 8:
            raise ConfigError(f"data.synthetic.perlin_scale_exponents={self.perlin_scale_exponents} must satisfy "
                              "0 <= lo <= hi <= 8")
        self.perlin_scale_exponents = (int(lo), int(hi))
        b_lo, b_hi = self.beta_range
        if not 0.0 <= b_lo <= b_hi < 1.0:
            raise ConfigError(f"data.synthetic.beta_range={self.beta_range} must satisfy 0 <= lo <= hi < 1")
        self.beta_range = (float(b_lo), float(b_hi))
        if not -1.0 < self.threshold < 1.0:
            raise ConfigError(f"data.synthetic.threshold={self.threshold} must be in (-1, 1)")
        if self.texture_dir is not None and not Path(self.texture_dir).is_dir():
            raise ConfigError(f"data.synthetic.texture_dir: {self.texture_dir} is not a directory")


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise in about [−1, 1] of ``shape`` with ``cells`` lattice cells per axis."""
    h, w = shape
    cy, cx = cells
    angles = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, cy, h, endpoint=False)
    xs = np.linspace(0, cx, w, endpoint=False)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


class SyntheticAnomalies:
    """``synth(target, source, rng) -> (image uint8 H×W×3, mask uint8 H×W in {0, 1})``, the stream's perturber
    signature; ``mask`` marks exactly the pixels the anomaly was blended into."""

    def __init__(self, cfg: SyntheticAnomalyConfig | None = None, nsa: NSAConfig | None = None) -> None:
        self.cfg = cfg or SyntheticAnomalyConfig()
        nsa = NSAConfig(**{**(nsa or NSAConfig()).__dict__, "probability": 1.0})
        self.nsa = NSAPerturber(nsa)
        self._textures: list[Path] | None = None

    def __call__(self, target: np.ndarray, source: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.cfg.normal_fraction:
            return target.copy(), np.zeros(target.shape[:2], np.uint8)
        if rng.random() < self.cfg.perlin_fraction:
            mask = self.perlin_mask(target.shape[:2], rng)
            if mask.any():
                return self.blend(target, self.texture(target, source, rng), mask, rng), mask
        return self.nsa(target, source, rng)

    def perlin_mask(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.cfg.perlin_scale_exponents
        h, w = shape
        for _ in range(MAX_REDRAWS):
            cells = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
            noise = perlin_noise(shape, cells, rng)
            angle = float(rng.uniform(-90, 90))
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            noise = cv2.warpAffine(noise.astype(np.float32), rot, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
            mask = (noise > self.cfg.threshold).astype(np.uint8)
            if mask.any():
                return mask
        return np.zeros(shape, np.uint8)

    def texture(self, target: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = target.shape[:2]
        files = self._texture_files()
        if files:
            path = files[int(rng.integers(len(files)))]
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise DatasetError(f"{path}: not a readable image (data.synthetic.texture_dir)")
            return cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (w, h), interpolation=cv2.INTER_AREA)
        return _self_augment(source if source.shape == target.shape else target, rng)

    def _texture_files(self) -> list[Path]:
        if self.cfg.texture_dir is None:
            return []
        if self._textures is None:
            root = Path(self.cfg.texture_dir)
            self._textures = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._textures:
                raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) for data.synthetic.texture_dir")
        return self._textures

    def blend(self, target: np.ndarray, src: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        beta = float(rng.uniform(*self.cfg.beta_range))
        m = mask[..., None].astype(np.float32)
        x, s = target.astype(np.float32), src.astype(np.float32)
        out = x * (1 - m) + ((1 - beta) * s + beta * x) * m
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        out[mask == 0] = target[mask == 0]  # exact outside the mask, whatever the float rounding
        return out


def _self_augment(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """DiffusionAD's self-augmentation: random colour changes and flips, then the image's grid×grid tiles
    shuffled (a defect-like texture in the class's own colours)."""
    x = image.astype(np.float32) * rng.uniform(0.6, 1.4, 3) + rng.uniform(-40, 40, 3)  # per-channel gain, shift
    if rng.random() < 0.5:
        x = 255 - x
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.5:
        x = x[::-1]
    x = np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))
    h, w = x.shape[:2]
    t = max(1, -(-max(h, w) // grid))
    side = grid * t
    sq = cv2.resize(x, (side, side), interpolation=cv2.INTER_LINEAR)
    tiles = sq.reshape(grid, t, grid, t, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, t, t, 3)
    tiles = tiles[rng.permutation(grid * grid)]
    sq = tiles.reshape(grid, grid, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(side, side, 3)
    return cv2.resize(np.ascontiguousarray(sq), (w, h), interpolation=cv2.INTER_NEAREST)
