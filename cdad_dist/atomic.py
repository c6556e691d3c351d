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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, **({"indent": 2, "sort_keys": True} | dump_kwargs))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
