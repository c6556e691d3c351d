"""Reading dataset images and masks into canonical numpy arrays (uint8 RGB, binary masks).

Datasets come in many encodings (8/16-bit, grey, RGBA, palette PNG masks whose pixel values are label indices);
everything downstream wants one format, so the normalisation lives here, once.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from cdad_dist.errors import DatasetError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# A JPEG may carry a few trailing bytes after its end-of-image marker (padding, vendor junk); we only require the
# marker somewhere near the end, which still catches the common corruption: a file cut short while copying.
JPEG_TAIL_WINDOW = 4096


def _read_bytes(path: str | Path) -> bytes:
    """Read a file's bytes; missing/unreadable files raise DatasetError naming the path."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc


def jpeg_tail_complete(tail: bytes) -> bool:
    """True when the last bytes of a JPEG file hold its end-of-image marker."""
    return _JPEG_EOI in tail[-JPEG_TAIL_WINDOW:]


def jpeg_is_truncated(data: bytes) -> bool:
    """True when `data` is a JPEG whose end-of-image marker is missing (a file cut short).

    libjpeg decodes truncated files with only a warning (grey fill), so the decoders cannot be trusted to notice.
    """
    return data[:2] == _JPEG_SOI and not jpeg_tail_complete(data)


def _decode(data: bytes, path: str | Path) -> np.ndarray:
    """Decode bytes with OpenCV keeping depth/channels (IMREAD_UNCHANGED); corrupt data raises DatasetError."""
    if not data:
        raise DatasetError(f"{path}: image file is empty")
    if jpeg_is_truncated(data):
        raise DatasetError(f"{path}: JPEG file is truncated (no end-of-image marker)")
    # imdecode on the bytes (rather than cv2.imread on the path) works for non-ASCII paths on every platform and
    # lets us tell "missing file" from "corrupt file".
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise DatasetError(f"{path}: not a decodable image (corrupt or unsupported format)")
    return arr


def _to_uint8(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """Scale any integer/float depth to uint8 (16-bit >> 8, floats in [0, 1] * 255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if arr.dtype in (np.float32, np.float64):
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise DatasetError(f"{path}: unsupported pixel type {arr.dtype}")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as uint8 H×W×3 RGB. Grey is replicated, alpha dropped, 16-bit scaled down."""
    arr = _to_uint8(_decode(_read_bytes(path), path), path)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DatasetError(f"{path}: unsupported image shape {arr.shape}")
    if arr.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    code = cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(arr, code)


def _is_palette_png(data: bytes) -> bool:
    """PNG colour type 3 (palette): byte 25 of the IHDR chunk."""
    return data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[25] == 3


def _palette_indices(data: bytes, path: str | Path) -> np.ndarray:
    """Raw palette indices of a palette PNG.

    OpenCV expands palettes to colours, so a mask whose palette maps index 0 to a non-black colour would look
    anomalous everywhere; PIL gives the indices, which are what label-indexed masks mean.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"{path}: not a decodable mask ({exc})") from exc


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as uint8 H×W in {0, 1}: any non-zero value (label index, 255, 65535, any colour) is 1."""
    data = _read_bytes(path)
    if _is_palette_png(data):
        arr = _palette_indices(data, path)
    else:
        arr = _decode(data, path)
    if arr.ndim == 3:
        if arr.shape[2] not in (1, 3, 4):
            raise DatasetError(f"{path}: unsupported mask shape {arr.shape}")
        arr = arr[:, :, : min(arr.shape[2], 3)].max(axis=2)  # alpha is not a label
    if arr.ndim != 2:
        raise DatasetError(f"{path}: unsupported mask shape {arr.shape}")
    return (arr != 0).astype(np.uint8)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """n_out × n_in: the fraction of output cell o covered by input cell i (rows sum to 1); INTER_AREA's footprint."""
    edges = np.arange(n_out + 1) * (n_in / n_out)  # output cell boundaries in input pixels
    lo, hi = edges[:-1, None], edges[1:, None]
    i = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0.0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ground-truth mask (H×W, non-zero = anomalous) to ``size`` = (height, width); uint8 {0, 1}.

    Why not ``cv2.INTER_NEAREST``: it samples the top-left input pixel of each output cell, so at 1024 → 256 the
    mask shifts by 1.5 input pixels against the INTER_AREA image, and any defect narrower than the sampling
    step can vanish (PRO then silently loses regions). Here the mask stays pixel-centre aligned with the image:
    - upsampling: pixel-centre nearest neighbour (``nearest-exact``, as PIL and torch's nearest-exact);
    - downsampling: an output pixel is anomalous when at least half of its area is (the INTER_AREA footprint of
      the image's resize), and every connected defect (8-connectivity) that would vanish keeps the output pixels
      where its own coverage is at least half its maximum: a speck becomes one pixel, a thin scratch a one-pixel
      line, so no ground-truth region is lost.
    Written with numpy and scipy rather than OpenCV: masks are resized inside forked DataLoader workers, where
    OpenCV's thread pool (started in the parent) can deadlock.
    """
    height, width = size
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    h_in, w_in = binary.shape
    if (h_in, w_in) == (height, width):
        return binary
    if height >= h_in and width >= w_in:
        rows = np.minimum(((np.arange(height) + 0.5) * h_in / height).astype(np.int64), h_in - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * w_in / width).astype(np.int64), w_in - 1)
        return binary[rows[:, None], cols[None, :]]
    coverage = _area_weights(h_in, height) @ binary.astype(np.float32) @ _area_weights(w_in, width).T
    out = (coverage >= 0.5 - 1e-6).astype(np.uint8)
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return out
    # which components are still visible: any of their pixels under a kept output pixel (centre mapping)
    rows = np.minimum(((np.arange(h_in) + 0.5) * height / h_in).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(w_in) + 0.5) * width / w_in).astype(np.int64), width - 1)
    target = rows[:, None] * width + cols[None, :]  # the output pixel each input pixel falls in
    on = labels > 0
    comp, cell = labels[on], target[on]
    visible = np.zeros(n + 1, dtype=bool)
    visible[np.unique(comp[out.reshape(-1)[cell] > 0])] = True
    lost = ~visible[comp]
    if not lost.any():
        return out
    # per (lost component, output pixel): how many of the component's pixels fall there
    pairs, counts = np.unique(comp[lost].astype(np.int64) * (height * width) + cell[lost], return_counts=True)
    owner, where = pairs // (height * width), pairs % (height * width)
    best = np.zeros(n + 1, dtype=np.int64)
    np.maximum.at(best, owner, counts)
    keep = where[2 * counts >= best[owner]]
    out.reshape(-1)[keep] = 1
    return out
