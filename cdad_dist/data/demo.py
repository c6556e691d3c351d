"""A generated demo dataset in MVTec layout: 3 textures + 3 objects with exact defect masks.

Why generated: the framework must run end to end (train, protect, evaluate) on a laptop and in tests without any
download. Each class has one clear "normal" appearance with small jitter (phase, colour, position, sensor noise) so
that a small model can learn it from ~60 images, and each defect is large (4–20 % of the image) and high-contrast to
its surroundings so that a tiny CPU model can find it. Everything is vectorised numpy/OpenCV and seeded per image,
so a tree is byte-identical for a given seed, and any subset of classes renders the same images as the full set.
"""
from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cdad_dist.errors import ConfigError, DatasetError

TEXTURE_CLASSES = ("carpet", "grid", "wood")
OBJECT_CLASSES = ("bottle", "nut", "pill")
# Same order as sequences.DEMO_CLASSES: textures and objects interleaved.
DEMO_CLASSES = ("carpet", "bottle", "grid", "nut", "wood", "pill")
DEFECTS = ("scratch", "hole", "stain", "missing_part", "foreign_patch")
AREA_RANGE = (0.04, 0.20)  # defect area as a fraction of the image
SENSOR_NOISE = 0.012  # std of the per-pixel noise, in [0, 1] units
INFO_FILE = "demo_info.json"

# Colours far from every class's normal appearance, for stains and foreign patches.
_VIVID = np.array(
    [[0.95, 0.85, 0.05], [0.05, 0.35, 0.95], [0.05, 0.85, 0.25], [0.90, 0.05, 0.80], [0.95, 0.45, 0.00]],
    dtype=np.float32,
)
_FLAT = np.array([[0.05, 0.05, 0.07], [0.95, 0.95, 0.90]], dtype=np.float32)


@dataclass
class _Scene:
    """A rendered normal image before sensor noise, plus where defects may go."""

    image: np.ndarray  # float32 H×W×3 in [0, 1]
    body: np.ndarray  # bool H×W: the object's body (whole image for textures); defects stay inside it
    background: np.ndarray | None  # float32 H×W×3 behind the object (objects only): what a missing part reveals

    def __post_init__(self) -> None:
        # One dtype for every renderer, so normal and defective images round identically outside the defect.
        self.image = np.ascontiguousarray(self.image, dtype=np.float32)
        if self.background is not None:
            self.background = np.ascontiguousarray(self.background, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- helpers


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float, sigma_y: float | None = None) -> np.ndarray:
    """Gaussian-filtered white noise with unit std (OpenCV's blur is a vectorised separable filter)."""
    white = rng.standard_normal((size, size)).astype(np.float32)
    field = cv2.GaussianBlur(white, (0, 0), sigmaX=sigma, sigmaY=sigma_y or sigma, borderType=cv2.BORDER_REFLECT)
    return field / max(float(field.std()), 1e-6)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 0.025) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0.0, amount, 3).astype(np.float32), 0.0, 1.0)


def _fill(size: int, colour: np.ndarray) -> np.ndarray:
    return np.broadcast_to(colour, (size, size, 3)).astype(np.float32)


def _blend(base: np.ndarray, top: np.ndarray | Sequence[float], alpha: np.ndarray) -> np.ndarray:
    return base * (1.0 - alpha[..., None]) + np.asarray(top, np.float32) * alpha[..., None]


def _luma(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114], np.float32))


def _farthest(palette: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return palette[int(np.argmax(np.linalg.norm(palette - colour, axis=1)))]


# ------------------------------------------------------------------------------------------------ textures


def _carpet(rng: np.random.Generator, s: int) -> _Scene:
    yy, xx = _coords(s)
    period = s / 16.0
    px, py = rng.uniform(0, period, 2)
    weave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + px) / period) * np.sin(2 * np.pi * (yy + py) / period)
    fibre = 0.05 * _smooth_noise(rng, s, 0.8)
    base = _jitter(rng, (0.62, 0.30, 0.22), 0.02)
    img = base * (0.65 + 0.5 * weave)[..., None] + fibre[..., None]
    return _Scene(np.clip(img, 0, 1), np.ones((s, s), bool), None)


def _grid(rng: np.random.Generator, s: int) -> _Scene:
    yy, xx = _coords(s)
    period, width = s / 8.0, max(2.0, s / 48.0)
    ox, oy = rng.uniform(0, period, 2)
    lines = (((xx + ox) % period) < width) | (((yy + oy) % period) < width)
    alpha = cv2.GaussianBlur(lines.astype(np.float32), (0, 0), 0.6)
    img = _blend(_fill(s, _jitter(rng, (0.80, 0.80, 0.75))), _jitter(rng, (0.15, 0.16, 0.20)), alpha)
    img += 0.02 * _smooth_noise(rng, s, 2.0)[..., None]
    return _Scene(np.clip(img, 0, 1), np.ones((s, s), bool), None)


def _wood(rng: np.random.Generator, s: int) -> _Scene:
    yy, xx = _coords(s)
    period = s / 9.0
    warp = s * 0.03 * _smooth_noise(rng, s, s / 8.0) + s * 0.04 * np.sin(2 * np.pi * yy / s + rng.uniform(0, 6.3))
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (xx + warp) / period + rng.uniform(0, 6.3))) ** 2
    grain = 0.05 * _smooth_noise(rng, s, 0.6, 4.0)  # streaks along the grain (vertical)
    light, dark = _jitter(rng, (0.80, 0.60, 0.36)), _jitter(rng, (0.45, 0.27, 0.13))
    img = dark + (light - dark) * rings[..., None] + grain[..., None]
    return _Scene(np.clip(img, 0, 1), np.ones((s, s), bool), None)


# ------------------------------------------------------------------------------------------------- objects


def _centre(rng: np.random.Generator, s: int) -> tuple[float, float]:
    cy, cx = s / 2.0 + rng.uniform(-0.03, 0.03, 2) * s
    return float(cy), float(cx)


def _bottle(rng: np.random.Generator, s: int) -> _Scene:
    """Top view of a bottle: glass rim ring, lighter shoulder, dark opening; a highlight that moves a little."""
    yy, xx = _coords(s)
    cy, cx = _centre(rng, s)
    r = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    r_out, r_mid, r_hole = 0.40 * s, 0.27 * s, 0.12 * s
    bg = _fill(s, _jitter(rng, (0.10, 0.10, 0.12), 0.01))
    rim = _jitter(rng, (0.25, 0.55, 0.35))
    shoulder = _jitter(rng, (0.62, 0.80, 0.66))
    shade = (1.0 + 0.12 * np.cos(theta - rng.uniform(-0.4, 0.4) - np.pi / 4))[..., None]
    img = _blend(bg, rim * shade, np.clip(r_out - r + 0.5, 0, 1))
    img = _blend(img, shoulder * shade, np.clip(r_mid - r + 0.5, 0, 1))
    img = _blend(img, _jitter(rng, (0.03, 0.06, 0.04), 0.01), np.clip(r_hole - r + 0.5, 0, 1))
    body = (r < r_out - 0.5) & (r > r_hole + 0.5)
    return _Scene(np.clip(img, 0, 1), body, bg)


def _nut(rng: np.random.Generator, s: int) -> _Scene:
    """A hexagonal nut with a round hole on a plain blue background."""
    yy, xx = _coords(s)
    cy, cx = _centre(rng, s)
    rot = rng.uniform(-np.pi / 18, np.pi / 18)
    angles = rot + np.arange(6) * np.pi / 3
    radius = 0.38 * s
    shift = 4  # draw with sub-pixel precision (fixed-point coordinates)
    pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1) * (1 << shift)
    canvas = np.zeros((s, s), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA, shift)
    hexa = canvas.astype(np.float32) / 255.0
    r = np.hypot(yy - cy, xx - cx)
    r_chamfer, r_hole = 0.24 * s, 0.14 * s
    bg = _fill(s, _jitter(rng, (0.25, 0.38, 0.60), 0.01))
    metal = _jitter(rng, (0.72, 0.72, 0.70), 0.02)
    grad = (0.9 + 0.2 * ((xx - cx) - (yy - cy)) / s)[..., None]
    img = _blend(bg, metal * grad, hexa)
    img = _blend(img, metal * 0.75 * grad, np.clip(r_chamfer - r + 0.5, 0, 1))
    img = _blend(img, bg, np.clip(r_hole - r + 0.5, 0, 1))
    body = (hexa > 0.5) & (r > r_hole + 0.5)
    return _Scene(np.clip(img, 0, 1), body, bg)


def _pill(rng: np.random.Generator, s: int) -> _Scene:
    """A cream capsule with a red print on a dark background."""
    yy, xx = _coords(s)
    cy, cx = _centre(rng, s)
    half_len, rad = 0.36 * s, 0.17 * s
    # Signed distance to a capsule = distance to its axis segment minus the radius.
    ax = np.clip(xx - cx, -(half_len - rad), half_len - rad)
    dist = np.hypot(xx - cx - ax, yy - cy) - rad
    alpha = np.clip(0.5 - dist, 0, 1)
    bg = _fill(s, _jitter(rng, (0.14, 0.14, 0.16), 0.01))
    cream = _jitter(rng, (0.93, 0.88, 0.76), 0.015)
    shade = (1.0 - 0.3 * ((yy - cy) / rad) ** 2).clip(0.6, 1.0)[..., None]
    img = _blend(bg, cream * shade, alpha)
    text = np.zeros((s, s), np.uint8)
    scale, thick = s / 128.0 * 0.9, max(1, round(s / 64))
    (tw, th), _ = cv2.getTextSize("CD", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    org = (round(cx - tw / 2), round(cy + th / 2))
    cv2.putText(text, "CD", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    img = _blend(img, _jitter(rng, (0.70, 0.10, 0.12), 0.02), text.astype(np.float32) / 255.0 * alpha)
    return _Scene(np.clip(img, 0, 1), dist < -0.5, bg)


RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "carpet": _carpet, "grid": _grid, "wood": _wood, "bottle": _bottle, "nut": _nut, "pill": _pill,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------- defects


def _pick_centre(rng: np.random.Generator, body: np.ndarray, margin: int) -> tuple[int, int]:
    """A random pixel of the body at least `margin` px inside it (the body's own pixels if it is too thin)."""
    margin = max(1, margin)
    inner = cv2.erode(body.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    inner = cv2.copyMakeBorder(inner[margin:-margin, margin:-margin], *(margin,) * 4, cv2.BORDER_CONSTANT, value=0)
    ys, xs = np.nonzero(inner if inner.any() else body)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _local_mean(img: np.ndarray, region: np.ndarray) -> np.ndarray:
    return img[region].mean(axis=0) if region.any() else img.reshape(-1, 3).mean(axis=0)


def _scratch(rng, scene, s):
    cy, cx = _pick_centre(rng, scene.body, int(0.1 * s))
    length, angle = rng.uniform(0.55, 0.85) * s, rng.uniform(0, np.pi)
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.3, 0.3)
    pts = np.array([[cx, cy] - d, [cx, cy] + bend, [cx, cy] + d])
    canvas = np.zeros((s, s), np.uint8)
    cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, 1, max(3, round(0.08 * s)), cv2.LINE_8)
    region = (canvas > 0) & scene.body
    colour = _FLAT[1] if _luma(_local_mean(scene.image, region)) < 0.5 else _FLAT[0]
    return region, lambda img: np.where(region[..., None], colour, img)


def _ellipse(rng, s, centre, lo, hi) -> np.ndarray:
    canvas = np.zeros((s, s), np.uint8)
    axes = tuple(int(v) for v in np.round(rng.uniform(lo, hi, 2) * s))
    cv2.ellipse(canvas, (centre[1], centre[0]), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    return canvas > 0


def _hole(rng, scene, s):
    region = _ellipse(rng, s, _pick_centre(rng, scene.body, int(0.12 * s)), 0.12, 0.2) & scene.body
    yy, xx = _coords(s)
    depth = 0.03 + 0.04 * (yy / s)[..., None]  # a faint gradient inside, like the wall of a hole
    return region, lambda img: np.where(region[..., None], depth, img)


def _stain(rng, scene, s):
    cy, cx = _pick_centre(rng, scene.body, int(0.12 * s))
    yy, xx = _coords(s)
    radius = rng.uniform(0.13, 0.2) * s
    wobble = 0.3 * _smooth_noise(rng, s, s / 14.0)
    region = ((np.hypot(yy - cy, xx - cx) / radius + wobble) < 1.0) & scene.body
    colour = _farthest(_VIVID, _local_mean(scene.image, region))
    return region, lambda img: np.where(region[..., None], 0.85 * colour + 0.15 * img, img)


def _missing_part(rng, scene, s):
    if scene.background is None:  # texture: a rectangle of the weave is gone, a flat backing shows
        h, w = np.round(rng.uniform(0.2, 0.4, 2) * s).astype(int)
        y0, x0 = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        region = np.zeros((s, s), bool)
        region[y0 : y0 + h, x0 : x0 + w] = True
        colour = _farthest(_FLAT, _local_mean(scene.image, region))
        return region, lambda img: np.where(region[..., None], colour, img)
    # object: a slice of the body is broken off and the background shows through
    ys, xs = np.nonzero(scene.body)
    cy, cx = ys.mean(), xs.mean()
    yy, xx = _coords(s)
    angle = rng.uniform(0, 2 * np.pi)
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    extent = float(along[scene.body].max())
    region = (along > extent * rng.uniform(0.35, 0.65)) & scene.body
    bg = scene.background
    return region, lambda img: np.where(region[..., None], bg, img)


def _foreign_patch(rng, scene, s):
    cy, cx = _pick_centre(rng, scene.body, int(0.1 * s))
    h, w = rng.uniform(0.2, 0.36, 2) * s
    box = ((float(cx), float(cy)), (float(w), float(h)), float(rng.uniform(0, 90)))
    canvas = np.zeros((s, s), np.uint8)
    cv2.fillPoly(canvas, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1, cv2.LINE_8)
    region = (canvas > 0) & scene.body
    colour = _farthest(_VIVID, _local_mean(scene.image, region))
    yy, xx = _coords(s)
    cell = max(2, round(s / 32))
    checker = ((yy // cell + xx // cell) % 2)[..., None]
    patch = colour * (0.45 + 0.55 * checker)
    return region, lambda img: np.where(region[..., None], patch, img)


_DEFECT_MAKERS = {
    "scratch": _scratch, "hole": _hole, "stain": _stain, "missing_part": _missing_part,
    "foreign_patch": _foreign_patch,
}  # fmt: skip


def _defect(rng: np.random.Generator, scene: _Scene, kind: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply defect `kind`; returns (image, exact mask). Re-draws until its area is within AREA_RANGE."""
    lo, hi = AREA_RANGE
    for _ in range(100):
        region, paint = _DEFECT_MAKERS[kind](rng, scene, s)
        if lo <= region.mean() <= hi:
            return np.clip(paint(scene.image), 0, 1).astype(np.float32), region
    raise RuntimeError(f"demo: could not place a {kind} defect of area {AREA_RANGE} (image size {s})")


# --------------------------------------------------------------------------------------------- public API


def _rng(seed: int, cls: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Per-image generator: a class subset or another count renders the very same images."""
    return np.random.default_rng([seed, zlib.crc32(f"{cls}/{split}/{defect}".encode()), index])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_sample(
    cls: str, defect: str, *, size: int = 128, seed: int = 0, split: str = "test", index: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal uint8 RGB, image uint8 RGB, mask uint8 {0,1}) of one demo sample.

    The normal image is the same scene and noise without the defect, which lets tests check that a defect changes
    pixels only inside its mask. For `defect="good"` both images are equal and the mask is empty.
    """
    if cls not in RENDERERS:
        raise ConfigError(f"unknown demo class {cls!r}; known: {list(RENDERERS)}")
    if defect != "good" and defect not in _DEFECT_MAKERS:
        raise ConfigError(f"unknown demo defect {defect!r}; known: {list(_DEFECT_MAKERS)}")
    rng = _rng(seed, cls, split, defect, index)
    scene = RENDERERS[cls](rng, size)
    gain = np.float32(rng.uniform(0.97, 1.03))  # exposure jitter
    noise = rng.normal(0.0, SENSOR_NOISE, (size, size, 3)).astype(np.float32)
    normal = _to_uint8(scene.image * gain + noise)
    if defect == "good":
        return normal, normal.copy(), np.zeros((size, size), np.uint8)
    image, region = _defect(rng, scene, defect, size)
    return normal, _to_uint8(image * gain + noise), region.astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> None:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise DatasetError(f"{path}: could not write PNG")


def _check_args(size: int, seed: int, counts: dict[str, int], classes: Sequence[str]) -> None:
    if seed < 0:
        raise ConfigError(f"demo seed={seed} must be >= 0")
    if size < 32:
        raise ConfigError(f"demo size={size} is too small (minimum 32)")
    for name, n in counts.items():
        if n < 0:
            raise ConfigError(f"demo {name}={n} must be >= 0")
    if counts["n_train"] < 1:
        raise ConfigError("demo n_train must be >= 1")
    unknown = [c for c in classes if c not in RENDERERS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"demo classes {list(classes)} invalid; choose distinct names from {list(RENDERERS)}")


def make_demo_dataset(
    out: str | Path,
    *,
    size: int = 128,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_bad: int = 15,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the demo tree `<out>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}`.

    Anomalous test images cycle through DEFECTS. Scan it with `scan_folder(out, "demo")`. An existing class folder
    is an error unless `overwrite=True` (which deletes that class folder first).
    """
    classes = list(DEMO_CLASSES if classes is None else classes)
    _check_args(size, seed, {"n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad}, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for cls in classes:
        cdir = out / cls
        if cdir.exists():
            if not overwrite:
                raise DatasetError(f"{cdir} already exists; pass overwrite=True to regenerate it")
            shutil.rmtree(cdir)
        write_class(cdir, lambda split, defect, idx, cls=cls: render_sample(cls, defect, size=size, seed=seed,
                                                                             split=split, index=idx),
                    DEFECTS, n_train, n_test_good, n_test_bad)
    info = {"size": size, "seed": seed, "n_train": n_train, "n_test_good": n_test_good,
            "n_test_bad": n_test_bad, "classes": classes, "defects": list(DEFECTS)}  # fmt: skip
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out


def write_class(cdir: Path, render: Callable[[str, str, int], tuple], defects: Sequence[str], n_train: int,
                n_good: int, n_bad: int) -> None:
    """One class in MVTec layout; `render(split, defect, index) -> (normal, image, mask)`. Anomalous test images
    cycle through `defects`. Shared by the generated datasets (demo, real photos)."""
    width = max(3, len(str(max(n_train, n_good, n_bad))))
    jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_good)]
    per_defect: dict[str, int] = {}
    for i in range(n_bad):
        kind = defects[i % len(defects)]
        jobs.append(("test", kind, per_defect.get(kind, 0)))
        per_defect[kind] = per_defect.get(kind, 0) + 1
    for split, defect, idx in jobs:
        folder = cdir / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        _, image, mask = render(split, defect, idx)
        write_png(folder / f"{idx:0{width}d}.png", image)
        if defect != "good":
            gt = cdir / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            write_png(gt / f"{idx:0{width}d}_mask.png", mask * np.uint8(255))
