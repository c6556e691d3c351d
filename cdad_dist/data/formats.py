"""Dataset formats: one registry from ``data.dataset`` (and ``cdad shards build --dataset``) to a scanner.

A format is a :class:`DatasetFormat`: ``scan(root, options) -> Catalog`` and, for the datasets this project
generates, ``generate(root)`` (run when the root is missing). The registry maps names to ``"module:attribute"``
strings and imports on first use, like the continual core's registries, so the run config validates
``data.dataset`` before anything heavy is imported. Adding a format is one file with its scanner and one line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cdad_dist.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class ScanOptions:
    """What a scanner may need besides the root (each format reads its own)."""

    name: str | None = None              # dataset name of a generic folder dataset (required for "folder")
    split_csv: str | None = None         # VisA split file (default <root>/split_csv/1cls.csv)
    classes: tuple[str, ...] | None = None
    skip_bad: bool = False
    workers: int | None = None           # None: the catalog's default number of scan threads


@dataclass(frozen=True)
class DatasetFormat:
    scan: Callable[[Path, ScanOptions], object]        # -> Catalog
    generate: Callable[[Path], object] | None = None   # writes the dataset when its root is missing


DATASET_REGISTRY: dict[str, str] = {
    "mvtec": "cdad_dist.data.formats:MVTEC",
    "visa": "cdad_dist.data.formats:VISA",
    "folder": "cdad_dist.data.formats:FOLDER",
    "demo": "cdad_dist.data.formats:DEMO",
    "real_photos": "cdad_dist.data.formats:REAL_PHOTOS",
}


def dataset_format(name: str) -> DatasetFormat:
    if name not in DATASET_REGISTRY:
        raise ConfigError(f"data.dataset must be one of {sorted(DATASET_REGISTRY)}, got {name!r}")
    module, _, attribute = DATASET_REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def scan_format(name: str, root: str | Path, options: ScanOptions | None = None, *, generate: bool = False):
    """The catalog of dataset ``name`` at ``root`` (generated first when ``generate`` and the root is missing)."""
    fmt = dataset_format(name)
    root = Path(root)
    if generate and fmt.generate is not None and not root.exists():
        fmt.generate(root)
    return fmt.scan(root, options or ScanOptions())


# -- the built-in formats ------------------------------------------------------------------------------------------
def _catalog():
    from cdad_dist.data import catalog

    return catalog


def _workers(o: ScanOptions) -> dict:
    return {} if o.workers is None else {"workers": o.workers}


def _scan_mvtec(root: Path, o: ScanOptions):
    return _catalog().scan_mvtec(root, o.classes, skip_bad=o.skip_bad, **_workers(o))


def _scan_visa(root: Path, o: ScanOptions):
    return _catalog().scan_visa(root, o.split_csv, o.classes, skip_bad=o.skip_bad, **_workers(o))


def _named_folder(name: str | None) -> Callable[[Path, ScanOptions], object]:
    def scan(root: Path, o: ScanOptions):
        folder_name = name or o.name
        if not folder_name:
            raise DatasetError(f"{root}: a folder dataset needs a name (data.folder_name / --name)")
        return _catalog().scan_folder(root, folder_name, o.classes, skip_bad=o.skip_bad, **_workers(o))

    return scan


def _generate_demo(root: Path):
    from cdad_dist.data.demo import make_demo_dataset

    return make_demo_dataset(root)


def _generate_real(root: Path):
    from cdad_dist.data.real_photos import make_real_dataset

    return make_real_dataset(root)


MVTEC = DatasetFormat(_scan_mvtec)
VISA = DatasetFormat(_scan_visa)
FOLDER = DatasetFormat(_named_folder(None))
DEMO = DatasetFormat(_named_folder("demo"), generate=_generate_demo)
REAL_PHOTOS = DatasetFormat(_named_folder("real"), generate=_generate_real)
