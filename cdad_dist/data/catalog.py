"""Dataset layouts (MVTec AD, VisA, generic folder) -> sample records."""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cdad_dist.data.images import JPEG_TAIL_WINDOW, jpeg_tail_complete
from cdad_dist.errors import DatasetError


@dataclass(frozen=True)
class SampleRecord:
    """One image of a dataset, with everything the shard writer and the evaluator need to know."""

    dataset: str
    cls: str
    split: str
    label: int
    defect: str
    image_path: str
    mask_path: str | None

    @property
    def qualified_class(self) -> str:
        return f"{self.dataset}/{self.cls}"


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "test")
VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_DEFAULT_CSV = Path("split_csv") / "1cls.csv"
# Checking a sample opens image and mask headers and CRC-verifies PNGs; that is I/O bound, so a few threads make
# scanning a dataset on a network file system much faster without changing the (ordered) result.
DEFAULT_SCAN_WORKERS = 8


# --------------------------------------------------------------------------------------------------- catalog


@dataclass
class Catalog:
    """The records of one or more scanned datasets, plus the samples skipped with `skip_bad=True`."""

    records: list[SampleRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SampleRecord]:
        return iter(self.records)

    def __add__(self, other: Catalog) -> Catalog:
        """Concatenate two catalogs (e.g. MVTec + VisA for the cross-dataset sequences)."""
        clash = set(self.classes()) & set(other.classes())
        if clash:
            raise DatasetError(f"catalogs overlap in classes {sorted(clash)}")
        return Catalog(self.records + other.records, self.skipped + other.skipped)

    def classes(self) -> list[str]:
        """Qualified class names (`dataset/cls`) in record order, each once."""
        return list(dict.fromkeys(r.qualified_class for r in self.records))

    def select(self, classes: Iterable[str] | None = None, split: str | None = None) -> list[SampleRecord]:
        """Records of the given classes (qualified, or bare when unambiguous) and split, in catalog order."""
        if split is not None and split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        wanted = None if classes is None else set(self._qualify(classes))
        return [
            r
            for r in self.records
            if (wanted is None or r.qualified_class in wanted) and (split is None or r.split == split)
        ]

    def groups(self) -> dict[str, list[SampleRecord]]:
        """Records keyed by `dataset/class/split` (the manifest's group key), in catalog order."""
        out: dict[str, list[SampleRecord]] = {}
        for r in self.records:
            out.setdefault(f"{r.qualified_class}/{r.split}", []).append(r)
        return out

    def _qualify(self, classes: Iterable[str]) -> list[str]:
        known = self.classes()
        by_bare: dict[str, list[str]] = {}
        for q in known:
            by_bare.setdefault(q.split("/", 1)[1], []).append(q)
        out = []
        for name in classes:
            if "/" in name:
                if name not in known:
                    raise DatasetError(f"class {name!r} is not in the catalog (classes: {known})")
                out.append(name)
                continue
            hits = by_bare.get(name, [])
            if len(hits) != 1:
                why = "is not in the catalog" if not hits else f"is ambiguous ({hits}); qualify it"
                raise DatasetError(f"class {name!r} {why} (classes: {known})")
            out.append(hits[0])
        return out


# --------------------------------------------------------------------------------------------- sample checks


@dataclass(frozen=True)
class _Candidate:
    """A sample found in the tree, before its files are checked."""

    record: SampleRecord | None  # None when the layout already tells us the sample is bad (see `problem`)
    path: str
    problem: str | None = None


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header, then a full structural check (PNG CRCs, JPEG end marker).

    PIL's `open` is lazy (reads the header only) and `verify` checks a PNG's chunk CRCs without decoding pixels,
    which keeps scanning ~100x faster than decoding every image. PIL does not verify JPEG data, so we check the
    end-of-image marker, which catches truncated copies, the usual corruption.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(path) - JPEG_TAIL_WINDOW))
                tail = fh.read()
            if not jpeg_tail_complete(tail):
                raise DatasetError(f"{path}: JPEG file is truncated (no end-of-image marker)")
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file does not exist") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt image ({exc})") from exc
    if size[0] <= 0 or size[1] <= 0:
        raise DatasetError(f"{path}: image has zero size {size}")
    return size


def _check(c: _Candidate) -> str | None:
    """Problem with a candidate sample (a DatasetError message), or None when it is usable."""
    if c.problem is not None:
        return c.problem
    assert c.record is not None
    try:
        isize = _image_size(c.record.image_path)
        if c.record.mask_path is not None:
            msize = _image_size(c.record.mask_path)
            if msize != isize:
                return (
                    f"{c.record.mask_path}: mask size {msize[0]}x{msize[1]} != image size {isize[0]}x{isize[1]} "
                    f"of {c.record.image_path}"
                )
    except DatasetError as exc:
        return str(exc)
    return None


def _resolve(candidates: Sequence[_Candidate], skip_bad: bool, workers: int) -> Catalog:
    """Check every candidate (in parallel threads, order kept); raise on the first bad one or skip it."""
    if workers > 1 and len(candidates) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(_check, candidates))
    else:
        problems = [_check(c) for c in candidates]
    cat = Catalog()
    for c, problem in zip(candidates, problems):
        if problem is None:
            assert c.record is not None
            cat.records.append(c.record)
        elif skip_bad:
            cat.skipped.append((c.path, problem))
        else:
            raise DatasetError(problem + " (pass skip_bad=True to skip bad samples)")
    return cat


def _require_nonempty(cat: Catalog, dataset: str, classes: Iterable[str], where: Callable[[str], str]) -> None:
    """Every class needs at least one usable train and one usable test sample."""
    have = {(r.cls, r.split) for r in cat.records}
    for cls in classes:
        for split in SPLITS:
            if (cls, split) not in have:
                raise DatasetError(f"class {dataset}/{cls} has no usable {split} images ({where(cls)})")


# --------------------------------------------------------------------------------------------- MVTec layout


def _check_name(kind: str, name: str, where: str | Path) -> None:
    """Dataset/class names end up in shard keys `<dataset>__<class>__...` and in qualified names `dataset/cls`."""
    if not name or "/" in name or "\\" in name or "__" in name or name.startswith("."):
        raise DatasetError(f"{where}: invalid {kind} name {name!r} (must be non-empty, without '/' or '__')")


def _require_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    return root


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder (extension case-insensitive, hidden files ignored), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pick_classes(available: Sequence[str], requested: Iterable[str] | None, dataset: str, root: Path) -> list[str]:
    if requested is None:
        if not available:
            raise DatasetError(f"{root}: no {dataset} classes found")
        return list(available)
    requested = list(requested)
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise DatasetError(f"{root}: unknown {dataset} class(es) {unknown}; available: {list(available)}")
    if len(set(requested)) != len(requested):
        raise DatasetError(f"{root}: class list {requested} names a class twice")
    return requested


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """`<stem>` -> mask file for masks named `<stem>_mask.<ext>` (png preferred when several exist)."""
    if not gt_dir.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in _image_files(gt_dir):
        if p.stem.endswith("_mask") and (p.stem[:-5] not in out or p.suffix.lower() == ".png"):
            out[p.stem[:-5]] = p
    return out


def _mvtec_class_candidates(root: Path, dataset: str, cls: str) -> list[_Candidate]:
    cdir = root / cls
    train_dir, test_dir = cdir / "train" / "good", cdir / "test"
    for need in (train_dir, test_dir):
        if not need.is_dir():
            raise DatasetError(f"class {dataset}/{cls}: missing directory {need}")
    out = [
        _Candidate(SampleRecord(dataset, cls, "train", 0, "good", str(p), None), str(p))
        for p in _image_files(train_dir)
    ]
    for ddir in _subdirs(test_dir):
        defect = ddir.name
        masks = {} if defect == "good" else _mask_index(cdir / "ground_truth" / defect)
        for p in _image_files(ddir):
            if defect == "good":
                out.append(_Candidate(SampleRecord(dataset, cls, "test", 0, "good", str(p), None), str(p)))
            elif p.stem in masks:
                rec = SampleRecord(dataset, cls, "test", 1, defect, str(p), str(masks[p.stem]))
                out.append(_Candidate(rec, str(p)))
            else:
                want = cdir / "ground_truth" / defect / f"{p.stem}_mask.png"
                out.append(_Candidate(None, str(p), f"{p}: anomalous image has no mask (expected {want})"))
    return out


def _scan_mvtec_layout(
    root: str | Path, dataset: str, classes: Iterable[str] | None, skip_bad: bool, workers: int
) -> Catalog:
    root = _require_root(root)
    _check_name("dataset", dataset, root)
    # A class is a directory holding any of the layout's folders (MVTec's root also has licence/readme files).
    found = [d.name for d in _subdirs(root) if any((d / s).is_dir() for s in ("train", "test", "ground_truth"))]
    chosen = _pick_classes(found, classes, dataset, root)
    candidates: list[_Candidate] = []
    for cls in chosen:
        _check_name("class", cls, root / cls)
        candidates += _mvtec_class_candidates(root, dataset, cls)
    cat = _resolve(candidates, skip_bad, workers)
    _require_nonempty(cat, dataset, chosen, lambda c: f"looked in {root / c}/train/good and {root / c}/test")
    return cat


def scan_mvtec(
    root: str | Path,
    classes: Iterable[str] | None = None,
    *,
    skip_bad: bool = False,
    workers: int = DEFAULT_SCAN_WORKERS,
) -> Catalog:
    """MVTec AD: `<root>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}`."""
    return _scan_mvtec_layout(root, "mvtec", classes, skip_bad, workers)


def scan_folder(
    root: str | Path,
    name: str,
    classes: Iterable[str] | None = None,
    *,
    skip_bad: bool = False,
    workers: int = DEFAULT_SCAN_WORKERS,
) -> Catalog:
    """Any classes in MVTec layout (png/jpg/jpeg/bmp/tif/tiff, any case) as dataset `name`."""
    return _scan_mvtec_layout(root, name, classes, skip_bad, workers)


# ---------------------------------------------------------------------------------------------- VisA layout


def _read_visa_csv(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of the split csv; header and values are validated."""
    if not csv_path.is_file():
        raise DatasetError(f"VisA split csv {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_CSV_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        rows = []
        for row in reader:
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            line = reader.line_num
            if not any(row.values()):
                continue
            if row["split"] not in SPLITS:
                raise DatasetError(f"{csv_path}:{line}: split {row['split']!r} is not one of {SPLITS}")
            if row["label"] not in ("normal", "anomaly"):
                raise DatasetError(f"{csv_path}:{line}: label {row['label']!r} is not 'normal' or 'anomaly'")
            if not row["object"] or not row["image"]:
                raise DatasetError(f"{csv_path}:{line}: empty object or image column")
            rows.append((line, row))
    if not rows:
        raise DatasetError(f"{csv_path}: no samples listed")
    return rows


def _visa_candidate(root: Path, csv_path: Path, line: int, row: dict[str, str]) -> _Candidate:
    cls, image = row["object"], str(root / row["image"])
    if row["label"] == "normal":
        return _Candidate(SampleRecord("visa", cls, row["split"], 0, "good", image, None), image)
    if not row["mask"]:
        return _Candidate(None, image, f"{image}: anomalous image has no mask ({csv_path}:{line})")
    rec = SampleRecord("visa", cls, row["split"], 1, "anomaly", image, str(root / row["mask"]))
    return _Candidate(rec, image)


def scan_visa(
    root: str | Path,
    split_csv: str | Path | None = None,
    classes: Iterable[str] | None = None,
    *,
    skip_bad: bool = False,
    workers: int = DEFAULT_SCAN_WORKERS,
) -> Catalog:
    """VisA in its official layout, driven by the official split csv (default `<root>/split_csv/1cls.csv`).

    The csv columns are object, split, label (normal|anomaly), image, mask with paths relative to `root`.
    """
    root = _require_root(root)
    csv_path = Path(split_csv) if split_csv is not None else root / VISA_DEFAULT_CSV
    rows = _read_visa_csv(csv_path)
    found = list(dict.fromkeys(row["object"] for _, row in rows))
    chosen = _pick_classes(sorted(found), classes, "visa", root)
    for cls in chosen:
        _check_name("class", cls, csv_path)
        if not (root / cls / "Data").is_dir():
            raise DatasetError(f"class visa/{cls}: missing directory {root / cls / 'Data'} (listed in {csv_path})")
    keep = set(chosen)
    candidates = [_visa_candidate(root, csv_path, line, row) for line, row in rows if row["object"] in keep]
    cat = _resolve(candidates, skip_bad, workers)
    order = {c: i for i, c in enumerate(chosen)}
    cat.records.sort(key=lambda r: order[r.cls])  # stable: csv order within a class
    _require_nonempty(cat, "visa", chosen, lambda c: f"rows of {csv_path}")
    return cat


# ----------------------------------------------------------------------------------------------- dispatcher


def scan_dataset(kind: str, root: str | Path, *, name: str | None = None, split_csv: str | Path | None = None,
                 classes: Iterable[str] | None = None, skip_bad: bool = False, workers: int | None = None) -> Catalog:
    """Scan a dataset by its format name (the registry of ``data/formats.py``: mvtec, visa, folder (needs
    ``name``), demo, real_photos)."""
    from cdad_dist.data.formats import DATASET_REGISTRY, ScanOptions, scan_format

    if kind not in DATASET_REGISTRY:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {sorted(DATASET_REGISTRY)}")
    options = ScanOptions(name=name, split_csv=None if split_csv is None else str(split_csv),
                          classes=None if classes is None else tuple(classes), skip_bad=skip_bad, workers=workers)
    return scan_format(kind, root, options)
