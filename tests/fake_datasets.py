"""Small fake MVTec / VisA trees for tests (import as `from fake_datasets import make_fake_mvtec, ...`).

Images are random noise (content does not matter to the readers); masks are rectangles. VisA trees are built from
rows of the official split csv (`VISA_SAMPLE_ROWS`, copied verbatim from `1cls.csv` with its CRLF line ends), so the
reader is tested against the real path and column conventions.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

# Twelve rows of the official VisA `split_csv/1cls.csv` (header + rows, verbatim).
VISA_CSV_HEADER = ("object", "split", "label", "image", "mask")
VISA_SAMPLE_ROWS_TEXT = """\
object,split,label,image,mask
candle,train,normal,candle/Data/Images/Normal/0836.JPG,
candle,train,normal,candle/Data/Images/Normal/0451.JPG,
candle,train,normal,candle/Data/Images/Normal/0516.JPG,
candle,test,normal,candle/Data/Images/Normal/0790.JPG,
candle,test,normal,candle/Data/Images/Normal/0107.JPG,
candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png
candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/001.png
capsules,train,normal,capsules/Data/Images/Normal/078.JPG,
capsules,train,normal,capsules/Data/Images/Normal/384.JPG,
capsules,test,normal,capsules/Data/Images/Normal/062.JPG,
capsules,test,anomaly,capsules/Data/Images/Anomaly/000.JPG,capsules/Data/Masks/Anomaly/000.png
capsules,test,anomaly,capsules/Data/Images/Anomaly/001.JPG,capsules/Data/Masks/Anomaly/001.png
"""


def visa_sample_rows() -> list[list[str]]:
    """The sample rows (without header) as lists of 5 strings."""
    return [row for row in csv.reader(io.StringIO(VISA_SAMPLE_ROWS_TEXT))][1:]


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), arr):
        raise RuntimeError(f"could not write {path}")
    return path


def noise_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def rect_mask(h: int, w: int, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2 + 1, w // 4 : w // 2 + 1] = value
    return mask


def make_fake_mvtec(
    root: str | Path,
    classes: Sequence[str] = ("bottle", "cable"),
    n_train: int = 3,
    n_test_good: int = 2,
    defects: Sequence[str] = ("crack",),
    size: int = 32,
    *,
    n_per_defect: int = 2,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """`<root>/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in classes:
        cdir = root / cls
        (cdir / "train" / "good").mkdir(parents=True, exist_ok=True)
        (cdir / "test").mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _write(cdir / "train" / "good" / f"{i:03d}{ext}", noise_image(rng, size, size))
        for i in range(n_test_good):
            _write(cdir / "test" / "good" / f"{i:03d}{ext}", noise_image(rng, size, size))
        for defect in defects:
            for i in range(n_per_defect):
                _write(cdir / "test" / defect / f"{i:03d}{ext}", noise_image(rng, size, size))
                _write(cdir / "ground_truth" / defect / f"{i:03d}_mask.png", rect_mask(size, size))
    (root / "license.txt").write_text("fake\n")  # MVTec's root holds files besides the class folders
    return root


def make_fake_visa(
    root: str | Path,
    csv_rows: Iterable[Sequence[str]] | None = None,
    *,
    image_hw: tuple[int, int] = (30, 40),
    mask_labels: tuple[int, ...] = (1, 2),
    write_csv: bool = True,
    seed: int = 0,
) -> Path:
    """Official VisA layout for `csv_rows` (default: VISA_SAMPLE_ROWS); returns the root.

    Images are JPEGs at the listed paths; masks are label-indexed PNGs (values `mask_labels`, as VisA's masks
    are), and `<root>/split_csv/1cls.csv` lists exactly these rows with CRLF line ends like the official file.
    """
    root = Path(root)
    rows = [list(r) for r in (visa_sample_rows() if csv_rows is None else csv_rows)]
    rng = np.random.default_rng(seed)
    h, w = image_hw
    for obj, _split, label, image, mask in rows:
        _write(root / image, noise_image(rng, h, w))
        if label == "anomaly" and mask:
            m = np.zeros((h, w), np.uint8)
            m[: h // 2, : w // 2] = mask_labels[0]
            m[h // 2 :, w // 2 :] = mask_labels[-1]
            _write(root / mask, m)
    if write_csv:
        write_visa_csv(root / "split_csv" / "1cls.csv", rows)
    return root


def write_visa_csv(path: str | Path, rows: Iterable[Sequence[str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(VISA_CSV_HEADER)
        writer.writerows(rows)
    return path
