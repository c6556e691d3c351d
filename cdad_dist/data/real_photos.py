"""A real-photograph check: an MVTec-layout dataset cut from the photographs bundled with scikit-image.

Why: the generated demo data has one clean appearance per class, so a detector can look good on it and still be
near chance on real textures (sensor noise, non-stationary content, fine detail). This set is made of crops of
real photos, with defects painted on held-out crops, so detection quality can be measured offline.

- Train and test crops come from disjoint regions of each photo: the photo is cut into square blocks in a
  checkerboard; train crops lie inside "white" blocks, test crops inside "black" ones. Both cover the whole photo,
  so the test content is of the same kind as the training content, but no test pixel is ever seen in training.
- Defects (not the NSA perturbation the model trains on, which pastes patches of other normal images):
  ``stain`` (a translucent coloured blot), ``scratch`` (a thin bright or dark line), ``hole`` (a dark shaded
  ellipse), ``blur`` (a region smeared by a strong Gaussian blur, placed where the crop has texture) and
  ``colour_shift`` (a region whose colours are re-tinted). The mask is exactly the region painted; a defect whose
  mean change inside the mask is too small to see is re-drawn.
- Everything is seeded per image (seed, class, split, defect, index): any subset of classes or a different count
  renders the same images.

scikit-image is needed only here (a test/bench dependency): ``pip install scikit-image``.
"""
from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cdad_dist.errors import ConfigError, DatasetError

REAL_CLASSES = ("coffee", "chelsea", "astronaut", "rocket", "coins", "camera", "motorcycle_left")
DEFECTS = ("stain", "scratch", "hole", "blur", "colour_shift")
AREA_RANGE = (0.015, 0.08)  # defect area as a fraction of the image
MIN_VISIBLE_CHANGE = 0.06   # mean |Δ| (in [0,1] units) inside the mask, else the defect is re-drawn
MIN_VISIBLE_BLUR = 0.035    # blur changes only what has texture (measured: median 0.05 on chelsea's fur)
INFO_FILE = "real_photos_info.json"
CROP_FRACTION = 0.125        # crop side in the source photo as a fraction of its shorter side
BLOCK_MARGIN = 1.25         # block side = crop side × this: the crop's position jitter inside its block


def load_photo(name: str) -> np.ndarray:
    """The photo as float32 H×W×3 in [0, 1] (grey photos repeated on three channels)."""
    if name not in REAL_CLASSES:
        raise ConfigError(f"unknown real-photo class {name!r}; known: {list(REAL_CLASSES)}")
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise ConfigError("the real-photo dataset needs scikit-image (pip install scikit-image)") from exc
    if name == "motorcycle_left":
        img = skdata.stereo_motorcycle()[0]
    else:
        img = getattr(skdata, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.float32) / 255.0


def _blocks(shape: tuple[int, int], split: str) -> tuple[int, list[tuple[int, int]], int]:
    """(crop side, top-left corners of the blocks of `split`, block side) of a photo of `shape` (checkerboard)."""
    h, w = shape
    crop = max(16, int(round(min(h, w) * CROP_FRACTION)))
    block = int(round(crop * BLOCK_MARGIN))
    parity = 0 if split == "train" else 1
    corners = [(by * block, bx * block) for by in range(h // block) for bx in range(w // block)
               if (by + bx) % 2 == parity]
    if not corners:
        raise DatasetError(f"photo of shape {shape} is too small for a {split} block of {block} px")
    return crop, corners, block


def _crop(rng: np.random.Generator, photo: np.ndarray, split: str, size: int) -> np.ndarray:
    crop, corners, block = _blocks(photo.shape[:2], split)
    y0, x0 = corners[int(rng.integers(len(corners)))]
    dy, dx = (int(v) for v in rng.integers(0, block - crop + 1, 2))
    patch = photo[y0 + dy: y0 + dy + crop, x0 + dx: x0 + dx + crop]
    interp = cv2.INTER_AREA if crop > size else cv2.INTER_CUBIC
    return np.clip(cv2.resize(patch, (size, size), interpolation=interp), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------- defects


def _blob(rng: np.random.Generator, s: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    """An irregular filled blob: a disc whose edge is wobbled by smooth noise."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    white = rng.standard_normal((s, s)).astype(np.float32)
    wobble = cv2.GaussianBlur(white, (0, 0), sigmaX=max(1.0, s / 16.0), borderType=cv2.BORDER_REFLECT)
    wobble /= max(float(wobble.std()), 1e-6)
    return (np.hypot(yy - centre[0], xx - centre[1]) / radius + 0.25 * wobble) < 1.0


def _centre(rng: np.random.Generator, s: int, margin: float = 0.15) -> tuple[int, int]:
    lo, hi = int(margin * s), int((1 - margin) * s)
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def _stain(rng, img, s):
    region = _blob(rng, s, _centre(rng, s), rng.uniform(0.07, 0.15) * s)
    mean = img[region].mean(0) if region.any() else img.reshape(-1, 3).mean(0)
    colour = np.clip(1.0 - mean + rng.uniform(-0.15, 0.15, 3), 0, 1).astype(np.float32)  # opposite of the local mean
    alpha = np.float32(rng.uniform(0.5, 0.75))
    return region, np.where(region[..., None], (1 - alpha) * img + alpha * colour, img)


def _scratch(rng, img, s):
    cy, cx = _centre(rng, s, 0.25)
    length, angle = rng.uniform(0.35, 0.7) * s, rng.uniform(0, np.pi)
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.25, 0.25)
    pts = np.round(np.array([[cx, cy] - d, [cx, cy] + bend, [cx, cy] + d])).astype(np.int32)
    canvas = np.zeros((s, s), np.uint8)
    cv2.polylines(canvas, [pts], False, 1, max(2, round(rng.uniform(0.025, 0.045) * s)), cv2.LINE_8)
    region = canvas > 0
    luma = float(img[region].mean()) if region.any() else 0.5
    value = np.float32(rng.uniform(0.9, 1.0) if luma < 0.5 else rng.uniform(0.0, 0.1))
    return region, np.where(region[..., None], value, img)


def _hole(rng, img, s):
    canvas = np.zeros((s, s), np.uint8)
    cy, cx = _centre(rng, s)
    axes = tuple(int(v) for v in np.round(rng.uniform(0.05, 0.12, 2) * s))
    cv2.ellipse(canvas, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    region = canvas > 0
    yy = np.mgrid[0:s, 0:s][0].astype(np.float32)
    depth = (0.04 + 0.08 * (yy - cy + s) / (2 * s))[..., None]  # a faint gradient, like the wall of a hole
    return region, np.where(region[..., None], depth, img)


def _blur(rng, img, s):
    # Where the crop has texture: the highest local variance among a few random centres.
    grey = img.mean(2)
    var = cv2.GaussianBlur(grey * grey, (0, 0), s / 12) - cv2.GaussianBlur(grey, (0, 0), s / 12) ** 2
    candidates = [_centre(rng, s) for _ in range(8)]
    centre = max(candidates, key=lambda c: var[c])
    region = _blob(rng, s, centre, rng.uniform(0.08, 0.15) * s)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.03, 0.06) * s, borderType=cv2.BORDER_REFLECT)
    return region, np.where(region[..., None], blurred, img)


def _colour_shift(rng, img, s):
    region = _blob(rng, s, _centre(rng, s), rng.uniform(0.08, 0.15) * s)
    tint = rng.permutation(np.array([1.45, 0.75, 0.45], np.float32))  # re-tinted: one channel up, others down
    shifted = np.clip(img * tint + rng.uniform(-0.08, 0.08, 3).astype(np.float32), 0, 1)
    return region, np.where(region[..., None], shifted, img)


_DEFECT_MAKERS = {"stain": _stain, "scratch": _scratch, "hole": _hole, "blur": _blur,
                  "colour_shift": _colour_shift}


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str, s: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(defective image, exact mask), re-drawn until the area is in AREA_RANGE and the change is visible;
    None when this crop does not allow it (a blur on a flat sky)."""
    lo, hi = AREA_RANGE
    visible = MIN_VISIBLE_BLUR if kind == "blur" else MIN_VISIBLE_CHANGE
    for _ in range(50):
        region, out = _DEFECT_MAKERS[kind](rng, img, s)
        if lo <= region.mean() <= hi and float(np.abs(out - img)[region].mean()) >= visible:
            return np.clip(out, 0, 1).astype(np.float32), region
    return None


# ------------------------------------------------------------------------------------------------- public API


def _rng(seed: int, cls: str, split: str, defect: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"real/{cls}/{split}/{defect}".encode()), index])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_sample(cls: str, defect: str, *, size: int = 128, seed: int = 0, split: str = "test", index: int = 0,
                  photo: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal crop uint8, image uint8, mask uint8 {0,1}) of one sample; pixels change only inside the mask."""
    if defect != "good" and defect not in _DEFECT_MAKERS:
        raise ConfigError(f"unknown real-photo defect {defect!r}; known: {list(_DEFECT_MAKERS)}")
    if split == "train" and defect != "good":
        raise ConfigError("real photos: training images are normal (defect='good')")
    photo = load_photo(cls) if photo is None else photo
    rng = _rng(seed, cls, split, defect, index)
    for _ in range(20):  # another crop when this one cannot show the defect
        normal = _crop(rng, photo, split, size)
        if defect == "good":
            n = _to_uint8(normal)
            return n, n.copy(), np.zeros((size, size), np.uint8)
        painted = _defect(rng, normal, defect, size)
        if painted is not None:
            image, region = painted
            return _to_uint8(normal), _to_uint8(image), region.astype(np.uint8)
    raise DatasetError(f"real photos: could not place a visible {defect} defect on {cls} (image size {size})")


def make_real_dataset(out: str | Path, *, size: int = 128, n_train: int = 80, n_test_good: int = 15,
                      n_test_bad: int = 20, seed: int = 0, classes: Sequence[str] | None = None,
                      overwrite: bool = False) -> Path:
    """Write `<out>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}` (MVTec layout)."""
    from cdad_dist.data.demo import write_class

    classes = list(REAL_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in REAL_CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"real photos: classes {classes} invalid; choose distinct names from {list(REAL_CLASSES)}")
    if size < 32 or seed < 0 or n_train < 1 or n_test_good < 0 or n_test_bad < 0:
        raise ConfigError(f"real photos: need size >= 32, seed >= 0, n_train >= 1 and counts >= 0 "
                          f"(got size={size}, seed={seed}, n_train={n_train}, {n_test_good}, {n_test_bad})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for cls in classes:
        cdir = out / cls
        if cdir.exists():
            if not overwrite:
                raise DatasetError(f"{cdir} already exists; pass overwrite=True to regenerate it")
            shutil.rmtree(cdir)
        photo = load_photo(cls)
        write_class(cdir, lambda split, defect, idx, cls=cls, photo=photo: render_sample(
            cls, defect, size=size, seed=seed, split=split, index=idx, photo=photo), DEFECTS, n_train, n_test_good,
            n_test_bad)
    info = {"size": size, "seed": seed, "n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad,
            "classes": classes, "defects": list(DEFECTS), "source": "scikit-image data"}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out
