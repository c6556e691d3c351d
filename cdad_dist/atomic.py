"""Small file helpers shared by every writer of finished work (shards, manifests, checkpoints, bases)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, data: Any, **dump_kwargs: Any) -> None:
    """Write JSON to a temporary file, fsync, then rename: readers see the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(data, **({"indent": 2, "sort_keys": True} | dump_kwargs)))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Text through a temporary file, fsync and rename (see write_json_atomic); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
