"""A shard set of kept samples: a bounded, seeded subset of each finished class's training images, copied byte for
byte from the run's shards into a WebDataset shard set of its own (same manifest format, so ``train_stream``
reads it like any shard set and splits it across ranks).

Used by experience replay (continual/replay.py): one shard per class, written once when its task ends,
atomically (``.tmp`` + rename, manifest last), so a killed run never leaves a half-written buffer that a resume
would trust.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from cdad_dist.atomic import sha256_file, write_json_atomic
from cdad_dist.data.shards import (_TAR_MODE, _TAR_MTIME, _TAR_USER, MANIFEST_FORMAT, MANIFEST_NAME, _encode_image,
                                   _encode_mask, group_key, load_manifest, parse_sample_key, sample_key, shard_name)
from cdad_dist.data.stream import _load_task, _read_items
from cdad_dist.errors import ShardError


def chosen_positions(n: int, keep: int, seed: int, cls: str) -> list[int]:
    """Sorted positions of the ``keep`` samples (of ``n``) a class keeps: a uniform random subset, seeded by
    (seed, class name), so the same run keeps the same images on any number of ranks."""
    if keep >= n:
        return list(range(n))
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(cls.encode())]))
    return sorted(int(i) for i in rng.choice(n, size=keep, replace=False))


def _empty_manifest(source: dict[str, Any]) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "image_size": source.get("image_size"),
            "image_format": source.get("image_format"), "groups": {}, "skipped": [], "empty_shards": []}


def write_class_buffer(source_dir: str | os.PathLike, cls: str, keep: int, out_dir: str | os.PathLike,
                       seed: int) -> dict[str, Any]:
    """Copy ``keep`` training samples of qualified class ``cls`` from ``source_dir`` into ``out_dir`` (one shard,
    manifest updated); returns the class's manifest group. Re-writing a class replaces its shard."""
    source_manifest, shards = _load_task(source_dir, [cls], "train")
    items = [(s, p) for s, shard in enumerate(shards) for p in range(shard.count)]
    if not items:
        raise ShardError(f"{source_dir}: class {cls!r} has no training samples to keep for replay")
    wanted = chosen_positions(len(items), keep, seed, cls)

    def samples():
        for _, raw in _read_items(shards, items, wanted):
            parse_sample_key(raw["__key__"])  # a foreign key would not be readable back
            yield {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}

    return write_class_shard(out_dir, cls, samples(), source_manifest)


def generated_samples(cls: str, images: list[np.ndarray], source: str) -> list[dict[str, Any]]:
    """Encoded shard samples (normal, empty mask) of generated uint8 H×W×3 images of qualified class ``cls``."""
    dataset, name = cls.split("/", 1)
    out = []
    for i, image in enumerate(images):
        meta = {"dataset": dataset, "class": name, "split": "train", "label": 0, "defect": "good",
                "source": f"{source}#{i}"}
        out.append({"__key__": sample_key(dataset, name, "train", i), "image.png": _encode_image(image, "png"),
                    "mask.png": _encode_mask(np.zeros(image.shape[:2], np.uint8)),
                    "meta.json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")})
    return out


def write_class_shard(out_dir: str | os.PathLike, cls: str, samples: Iterable[dict[str, Any]],
                      source_manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``samples`` (encoded, keys of class ``cls``) as the class's one shard in ``out_dir`` atomically
    (``.tmp`` + rename, then the manifest); returns the class's manifest group."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset, name = cls.split("/", 1)
    final = out / shard_name(dataset, name, "train", 0)
    tmp = final.with_name(final.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE, mtime=_TAR_MTIME,
                               encoder=False) as writer:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest_path = out / MANIFEST_NAME
    manifest = load_manifest(out) if manifest_path.is_file() else _empty_manifest(source_manifest)
    group = {"count": count, "samples_per_shard": count,
             "shards": [{"name": final.name, "count": count, "bytes": final.stat().st_size,
                         "sha256": sha256_file(final)}]}
    manifest["groups"][group_key(dataset, name, "train")] = group
    write_json_atomic(manifest_path, manifest)
    return group


def buffer_bytes(out_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk per kept class (qualified name), from the buffer's manifest."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    groups = json.loads(path.read_text(encoding="utf-8"))["groups"]
    return {"/".join(g.split("/")[:2]): sum(s["bytes"] for s in e["shards"]) for g, e in groups.items()}
