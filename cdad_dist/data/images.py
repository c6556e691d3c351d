"""Reading dataset images and masks into canonical numpy arrays (uint8 RGB, binary masks).

Datasets come in many encodings (8/16-bit, grey, RGBA, palette PNG masks whose pixel values are label indices);
everything downstream wants one format, so the normalisation lives here, once.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

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
