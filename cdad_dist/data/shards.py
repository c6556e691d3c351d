"""Write and verify WebDataset tar shards of dataset records (format in docs/contracts.md).

Training reads images from many ranks and workers at once; tar shards turn millions of small random reads into a few
sequential ones and make the data set a fixed, checksummed artefact. Shards are grouped by (dataset, class, split)
so that a task (a list of classes) selects whole shards.

Building is resumable and parallel: every shard is planned up front from the records (deterministic), written to
``<name>.tmp`` and renamed atomically, and recorded in ``manifest.partial.json`` as soon as it is finished. A later
build reuses every shard whose plan fingerprint, size and sha256 match, so an interrupted build loses at most the
shards that were in flight. The same records give byte-identical tars (fixed mtime/owner/mode, sorted members,
fixed encoder settings; PNG/JPEG bytes can differ between OpenCV builds).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
import webdataset as wds

from cdad_dist.data.catalog import SampleRecord
from cdad_dist.data.images import read_mask, read_rgb, resize_mask
from cdad_dist.atomic import sha256_file, write_json_atomic
from cdad_dist.errors import CdadError, DatasetError, ShardError

MANIFEST_FORMAT = 2  # 2: masks resized centre-aligned without losing defects (images.resize_mask)
MANIFEST_NAME = "manifest.json"
PARTIAL_MANIFEST_NAME = "manifest.partial.json"
IMAGE_FORMATS = ("png", "jpg")
DEFAULT_SHARD_BYTES = 1e9
JPEG_QUALITY = 95
SPLITS = ("train", "test")

# Fixed tar header fields so that the same samples always give the same bytes (TarWriter otherwise stamps
# time.time() into every member and the uid/uname of nobody in particular).
_TAR_MTIME = 0.0
_TAR_MODE = 0o444
_TAR_USER = "cdad"
# Names end up in tar member names ("<key>.<ext>") and webdataset splits keys from extensions at the first dot,
# and "__" separates the key fields, so both are refused in dataset and class names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_KEY_RE = re.compile(r"^(?P<dataset>.+?)__(?P<cls>.+?)__(?P<split>train|test)__(?P<index>\d{6,})$")
# Bytes a tar adds per sample: one 512-byte header per member (3 members) plus on average half a block of padding.
_TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 3 * 256
_ESTIMATE_SAMPLES = 3


# ----------------------------------------------------------------------------------------------------------------
# names


def group_key(dataset: str, cls: str, split: str) -> str:
    """Manifest group name ``<dataset>/<class>/<split>``."""
    return f"{dataset}/{cls}/{split}"


def sample_key(dataset: str, cls: str, split: str, index: int) -> str:
    """Sample ``__key__`` inside a shard: ``<dataset>__<class>__<split>__<index:06d>``."""
    return f"{dataset}__{cls}__{split}__{index:06d}"


def shard_name(dataset: str, cls: str, split: str, shard_index: int) -> str:
    """Shard file name: ``<dataset>__<class>__<split>-<shardindex:05d>.tar``."""
    return f"{dataset}__{cls}__{split}-{shard_index:05d}.tar"


def parse_sample_key(key: str) -> tuple[str, str, str, int]:
    """Inverse of :func:`sample_key`; raises ShardError for a key of another format."""
    m = _KEY_RE.match(key)
    if m is None:
        raise ShardError(f"sample key {key!r} does not have the form <dataset>__<class>__<split>__<index:06d>")
    return m["dataset"], m["cls"], m["split"], int(m["index"])


# ----------------------------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class _PlannedSample:
    key: str
    index: int
    record: SampleRecord
    source_stat: tuple[int, int]  # (size, mtime_ns) of the image file, so an edited source invalidates its shard


@dataclass(frozen=True)
class _ShardPlan:
    name: str
    group: str
    samples: tuple[_PlannedSample, ...]
    image_size: int | None
    image_format: str
    skip_bad: bool

    def fingerprint(self) -> str:
        """sha256 of everything that determines the shard's bytes; a reused shard must match it."""
        h = hashlib.sha256()
        head = {"format": MANIFEST_FORMAT, "name": self.name, "image_size": self.image_size,
                "image_format": self.image_format, "skip_bad": self.skip_bad}
        h.update(json.dumps(head, sort_keys=True).encode())
        for s in self.samples:
            r = s.record
            row = [s.key, r.dataset, r.cls, r.split, r.label, r.defect, r.image_path, r.mask_path, *s.source_stat]
            h.update(json.dumps(row).encode())
        return h.hexdigest()


def _check_record(record: SampleRecord) -> None:
    for what, value in (("dataset", record.dataset), ("class", record.cls)):
        if not _NAME_RE.match(value) or "__" in value:
            raise DatasetError(
                f"{record.image_path}: {what} name {value!r} must be letters, digits, '_' or '-' without '__' "
                "(it becomes part of shard and sample names)")
    if record.split not in SPLITS:
        raise DatasetError(f"{record.image_path}: split {record.split!r} is not one of {SPLITS}")
    if record.label not in (0, 1):
        raise DatasetError(f"{record.image_path}: label {record.label!r} must be 0 or 1")


def _source_stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)  # a missing file surfaces as a DatasetError when the shard is written
    return (st.st_size, st.st_mtime_ns)


def _group_records(records: Iterable[SampleRecord]) -> dict[str, list[SampleRecord]]:
    """Records per group, each group sorted by image path so scanner order does not change the shards."""
    groups: dict[str, list[SampleRecord]] = {}
    seen: set[str] = set()
    for r in records:
        _check_record(r)
        if r.image_path in seen:
            raise DatasetError(f"{r.image_path}: the same image appears twice in the records")
        seen.add(r.image_path)
        groups.setdefault(group_key(r.dataset, r.cls, r.split), []).append(r)
    return {g: sorted(rs, key=lambda r: r.image_path) for g, rs in sorted(groups.items())}


def _plan_group(group: str, records: list[SampleRecord], per_shard: int, image_size: int | None,
                image_format: str, skip_bad: bool) -> list[_ShardPlan]:
    plans = []
    for shard_index, start in enumerate(range(0, len(records), per_shard)):
        chunk = records[start:start + per_shard]
        samples = tuple(
            _PlannedSample(sample_key(r.dataset, r.cls, r.split, start + i), start + i, r, _source_stat(r.image_path))
            for i, r in enumerate(chunk))
        first = chunk[0]
        plans.append(_ShardPlan(shard_name(first.dataset, first.cls, first.split, shard_index), group, samples,
                                image_size, image_format, skip_bad))
    return plans


# ----------------------------------------------------------------------------------------------------------------
# encoding one sample


def _load_sample(record: SampleRecord, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and {0, 255} mask of one record, optionally resized to a square image_size."""
    image = read_rgb(record.image_path)
    if record.mask_path is None:
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
    else:
        mask = read_mask(record.mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{record.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                               f"{record.image_path} is {image.shape[1]}x{image.shape[0]}")
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        mask = resize_mask(mask, (image_size, image_size))  # centre-aligned, no defect lost (its doc)
    return image, (mask > 0).astype(np.uint8) * 255


def _encode_image(rgb: np.ndarray, image_format: str) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DatasetError(f"cannot encode an image as {image_format}")
    return buf.tobytes()


def _encode_mask(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DatasetError("cannot encode a mask as png")
    return buf.tobytes()


def _encode_sample(s: _PlannedSample, image_size: int | None, image_format: str) -> dict[str, Any]:
    r = s.record
    image, mask = _load_sample(r, image_size)
    meta = {"dataset": r.dataset, "class": r.cls, "split": r.split, "label": int(r.label), "defect": r.defect,
            "source": r.image_path}
    return {"__key__": s.key, f"image.{image_format}": _encode_image(image, image_format),
            "mask.png": _encode_mask(mask),
            "meta.json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")}


# ----------------------------------------------------------------------------------------------------------------
# writing one shard (runs in worker processes)


def _write_shard(plan: _ShardPlan, out_dir: str) -> dict[str, Any]:
    """Write one shard atomically; returns its manifest entry (count 0 and no file if every sample was bad)."""
    out = Path(out_dir)
    final, tmp = out / plan.name, out / (plan.name + ".tmp")
    skipped: list[dict[str, str]] = []
    count = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE, mtime=_TAR_MTIME,
                               encoder=False) as writer:
                for s in plan.samples:
                    try:
                        sample = _encode_sample(s, plan.image_size, plan.image_format)
                    except DatasetError as exc:
                        if not plan.skip_bad:
                            raise
                        skipped.append({"image_path": s.record.image_path, "error": str(exc)})
                        continue
                    writer.write(sample)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        if count == 0:
            tmp.unlink()
            return {"name": plan.name, "count": 0, "bytes": 0, "sha256": None, "plan": plan.fingerprint(),
                    "skipped": skipped}
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": plan.name, "count": count, "bytes": final.stat().st_size, "sha256": sha256_file(final),
            "plan": plan.fingerprint(), "skipped": skipped}


def _estimate_sample_bytes(records: list[SampleRecord], image_size: int | None, image_format: str) -> float:
    """Mean encoded size of the first few decodable records of a group (bad ones are left to the writer)."""
    sizes = []
    for r in records[: 4 * _ESTIMATE_SAMPLES]:
        try:
            s = _encode_sample(_PlannedSample("x", 0, r, (0, 0)), image_size, image_format)
        except DatasetError:
            continue
        sizes.append(sum(len(v) for k, v in s.items() if k != "__key__") + _TAR_OVERHEAD_PER_SAMPLE)
        if len(sizes) == _ESTIMATE_SAMPLES:
            break
    if not sizes:  # nothing decodable: assume a raw-sized sample; the writer reports the bad files
        side = image_size or 1024
        return float(side * side * 3)
    return float(np.mean(sizes))


def samples_per_shard_for(sample_bytes: float, shard_bytes: float = DEFAULT_SHARD_BYTES) -> int:
    """Samples that fit into a byte budget (at least one)."""
    return max(1, int(shard_bytes // max(sample_bytes, 1.0)))


# ----------------------------------------------------------------------------------------------------------------
# manifests


def _previous_entries(out: Path) -> dict[str, dict[str, Any]]:
    """Shard entries of an earlier (finished or interrupted) build in out_dir, by shard name."""
    entries: dict[str, dict[str, Any]] = {}
    for name in (MANIFEST_NAME, PARTIAL_MANIFEST_NAME):  # partial last: it is the newer one when both exist
        path = out / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable old manifest only means nothing is reused
        if name == MANIFEST_NAME:
            shards = [s for g in data.get("groups", {}).values() for s in g.get("shards", [])]
            shards += data.get("empty_shards", [])
        else:
            shards = list(data.get("shards", {}).values())
        for s in shards:
            if isinstance(s, dict) and "name" in s:
                entries[s["name"]] = s
    return entries


def _reusable(entry: dict[str, Any] | None, plan: _ShardPlan, out: Path) -> bool:
    """An earlier shard is kept only if it was built from the same plan and its file is intact."""
    if entry is None or entry.get("plan") != plan.fingerprint():
        return False
    if entry.get("count", 0) == 0:
        return not (out / plan.name).exists()
    path = out / plan.name
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return sha256_file(path) == entry.get("sha256")


def _final_manifest(plans: list[_ShardPlan], entries: dict[str, dict[str, Any]], image_size: int | None,
                    image_format: str, per_shard: dict[str, int]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    empty: list[dict[str, Any]] = []
    for p in plans:
        e = entries[p.name]
        g = groups.setdefault(p.group, {"count": 0, "samples_per_shard": per_shard[p.group], "shards": []})
        skipped += [dict(s, shard=p.name) for s in e.get("skipped", [])]
        if e["count"] == 0:
            empty.append(e)
            continue
        g["count"] += e["count"]
        g["shards"].append(e)
    return {"format": MANIFEST_FORMAT, "image_size": image_size, "image_format": image_format,
            "groups": groups, "skipped": sorted(skipped, key=lambda s: s["image_path"]), "empty_shards": empty}


# ----------------------------------------------------------------------------------------------------------------
# build


def _executor(num_workers: int) -> cf.Executor | None:
    if num_workers <= 1:
        return None
    # spawn: the caller may hold threads (torch, pytest), and forking a threaded process can deadlock
    return cf.ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"))


def _per_shard_counts(groups: dict[str, list[SampleRecord]], samples_per_shard: int | None, shard_bytes: float,
                      image_size: int | None, image_format: str, pool: cf.Executor | None) -> dict[str, int]:
    if samples_per_shard is not None:
        return {g: samples_per_shard for g in groups}
    args = [(rs, image_size, image_format) for rs in groups.values()]
    sizes = pool.map(_estimate_sample_bytes, *zip(*args)) if pool else [_estimate_sample_bytes(*a) for a in args]
    return {g: samples_per_shard_for(b, shard_bytes) for g, b in zip(groups, sizes)}


def _run_plans(todo: list[_ShardPlan], out: Path, pool: cf.Executor | None,
               done: dict[str, dict[str, Any]], partial: Path) -> None:
    """Write the shards in `todo`, recording each in the partial manifest as soon as it is finished."""

    def record(entry: dict[str, Any]) -> None:
        done[entry["name"]] = entry
        write_json_atomic(partial, {"format": MANIFEST_FORMAT, "shards": done})

    if pool is None:
        for plan in todo:
            record(_write_shard(plan, str(out)))
        return
    futures = [pool.submit(_write_shard, plan, str(out)) for plan in todo]
    first_error: BaseException | None = None
    for fut in cf.as_completed(futures):
        try:
            record(fut.result())
        except cf.CancelledError:
            continue
        except BaseException as exc:  # keep recording the shards that do finish, then re-raise
            if first_error is None:
                first_error = exc
                for other in futures:
                    other.cancel()
    if first_error is not None:
        raise first_error


def build_shards(records: list[SampleRecord], out_dir: str | os.PathLike, *, image_size: int | None = None,
                 samples_per_shard: int | None = None, shard_bytes: float = DEFAULT_SHARD_BYTES,
                 image_format: str = "png", num_workers: int = 1, skip_bad: bool = False) -> dict[str, Any]:
    """Write shards of `records` into out_dir and return the manifest (also written to out_dir/manifest.json).

    samples_per_shard defaults to what fits into `shard_bytes`, estimated per group by encoding a few samples.
    Re-running with the same records reuses every intact shard (resume). With skip_bad, undecodable images are
    left out and listed in manifest["skipped"]; otherwise the first one raises DatasetError naming the file.
    """
    if image_format not in IMAGE_FORMATS:
        raise CdadError(f"image_format {image_format!r} is not one of {IMAGE_FORMATS}")
    if image_size is not None and image_size <= 0:
        raise CdadError(f"image_size must be positive, got {image_size}")
    if samples_per_shard is not None and samples_per_shard <= 0:
        raise CdadError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if not records:
        raise DatasetError(f"no records to write into {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _group_records(records)
    previous = _previous_entries(out)
    pool = _executor(num_workers)
    try:
        per_shard = _per_shard_counts(groups, samples_per_shard, shard_bytes, image_size, image_format, pool)
        plans = [p for g, rs in groups.items()
                 for p in _plan_group(g, rs, per_shard[g], image_size, image_format, skip_bad)]
        done = {p.name: previous[p.name] for p in plans if _reusable(previous.get(p.name), p, out)}
        todo = [p for p in plans if p.name not in done]
        _run_plans(todo, out, pool, done, out / PARTIAL_MANIFEST_NAME)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    manifest = _final_manifest(plans, done, image_size, image_format, per_shard)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    (out / PARTIAL_MANIFEST_NAME).unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# reading manifests


def _manifest_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "top level is not a JSON object"
    if data.get("format") != MANIFEST_FORMAT:
        older = isinstance(data.get("format"), int) and data["format"] < MANIFEST_FORMAT
        hint = " (built by an older cdad-dist, whose resized masks were misaligned: delete the shard folder and " \
               "they are rebuilt)" if older else ""
        return f"format is {data.get('format')!r}, expected {MANIFEST_FORMAT}{hint}"
    if not isinstance(data.get("groups"), dict):
        return "missing 'groups' object"
    for name, g in data["groups"].items():
        if len(name.split("/")) != 3 or name.split("/")[2] not in SPLITS:
            return f"group name {name!r} is not <dataset>/<class>/<split>"
        if not isinstance(g, dict) or not isinstance(g.get("count"), int) or not isinstance(g.get("shards"), list):
            return f"group {name!r} lacks an integer 'count' or a 'shards' list"
        for s in g["shards"]:
            if not isinstance(s, dict) or not {"name", "count", "bytes", "sha256"} <= set(s):
                return f"group {name!r} has a shard entry without name/count/bytes/sha256"
        if sum(s["count"] for s in g["shards"]) != g["count"]:
            return f"group {name!r}: count {g['count']} differs from the sum of its shard counts"
    return None


def load_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate shard_dir/manifest.json; raises ShardError naming the file when missing or malformed."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = " (an interrupted build left manifest.partial.json: run the build again)" \
            if (Path(shard_dir) / PARTIAL_MANIFEST_NAME).is_file() else ""
        raise ShardError(f"{path}: shard manifest not found{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: not a readable JSON manifest ({exc})") from exc
    problem = _manifest_problem(data)
    if problem is not None:
        raise ShardError(f"{path}: not a cdad shard manifest: {problem}")
    return data


def manifest_classes(manifest: dict[str, Any], split: str | None = None) -> list[str]:
    """Qualified class names (``<dataset>/<class>``) in a manifest, optionally only those with a given split."""
    out = set()
    for name in manifest["groups"]:
        dataset, cls, sp = name.split("/")
        if split is None or sp == split:
            out.add(f"{dataset}/{cls}")
    return sorted(out)


def task_shards(manifest: dict[str, Any], classes: list[str], split: str,
                shard_dir: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(qualified class, shard entry) for every shard of the classes' split, in class then shard order.

    Raises ShardError naming the class and the shard dir when a class has no such group.
    """
    out = []
    for qc in classes:
        g = manifest["groups"].get(f"{qc}/{split}")
        if g is None:
            known = ", ".join(manifest_classes(manifest, split)) or "none"
            raise ShardError(f"class {qc!r} has no {split!r} shards in {shard_dir} (classes there: {known})")
        out += [(qc, s) for s in g["shards"]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_shards`: `problems` maps a shard name to what is wrong with it."""

    shard_dir: str
    shards_checked: int = 0
    samples_checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)  # .tar files not in the manifest (harmless leftovers)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str, problem: str) -> None:
        self.problems.setdefault(shard, []).append(problem)

    def summary(self) -> str:
        lines = [f"{self.shard_dir}: {self.shards_checked} shards, {self.samples_checked} samples checked"]
        lines += [f"  {name}: {'; '.join(ps)}" for name, ps in sorted(self.problems.items())]
        return "\n".join(lines)


def iter_shard_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__`` plus member bytes by extension) of one tar, via webdataset's tar reader."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    it = iter(pipeline)
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
    """RGB uint8 image from encoded bytes; ShardError naming `what` if it does not decode."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ShardError(f"{what}: image does not decode")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def decode_mask_bytes(data: bytes, what: str) -> np.ndarray:
    """uint8 {0, 1} mask from encoded PNG bytes; ShardError naming `what` if it does not decode."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ShardError(f"{what}: mask does not decode")
    return (arr > 127).astype(np.uint8)


def _check_sample(sample: dict[str, Any], group: str, image_size: int | None) -> None:
    key = sample["__key__"]
    dataset, cls, split, _ = parse_sample_key(key)
    if group_key(dataset, cls, split) != group:
        raise ShardError(f"sample {key} does not belong to group {group}")
    images = [k for k in ("image.png", "image.jpg") if k in sample]
    missing = [k for k in ("mask.png", "meta.json") if k not in sample] + ([] if images else ["image.png|jpg"])
    if missing:
        raise ShardError(f"sample {key} lacks {', '.join(missing)}")
    image = decode_image_bytes(sample[images[0]], f"sample {key}")
    mask = decode_mask_bytes(sample["mask.png"], f"sample {key}")
    if mask.shape != image.shape[:2]:
        raise ShardError(f"sample {key}: mask {mask.shape} and image {image.shape[:2]} differ in size")
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        raise ShardError(f"sample {key}: image is {image.shape[:2]}, manifest says {image_size}")
    try:
        meta = json.loads(sample["meta.json"])
    except ValueError as exc:
        raise ShardError(f"sample {key}: meta.json is not JSON ({exc})") from exc
    need = {"dataset", "class", "split", "label", "defect", "source"}
    if not isinstance(meta, dict) or not need <= set(meta):
        raise ShardError(f"sample {key}: meta.json lacks one of {sorted(need)}")
    if (meta["dataset"], meta["class"], meta["split"]) != (dataset, cls, split):
        raise ShardError(f"sample {key}: meta.json names {meta['dataset']}/{meta['class']}/{meta['split']}")


def _verify_one(path: Path, entry: dict[str, Any], group: str, image_size: int | None, report: VerifyReport) -> None:
    name = entry["name"]
    if not path.is_file():
        report.add(name, "missing")
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        report.add(name, f"size {size} != manifest {entry['bytes']} (truncated or replaced)")
    if sha256_file(path) != entry["sha256"]:
        report.add(name, "sha256 differs from the manifest (corrupt)")
    count = 0
    try:
        for sample in iter_shard_samples(path):
            _check_sample(sample, group, image_size)
            count += 1
    except (ShardError, tarfile.TarError, ValueError, OSError, EOFError) as exc:
        report.add(name, f"unreadable after {count} samples: {exc}")
    report.samples_checked += count
    if count != entry["count"]:
        report.add(name, f"{count} samples read, manifest says {entry['count']}")


def verify_shards(shard_dir: str | os.PathLike, *, strict: bool = True) -> VerifyReport:
    """Check every shard against the manifest (exists, size, sha256, count) and decode every sample.

    strict: raise ShardError naming the bad shards; otherwise return them in the report.
    """
    root = Path(shard_dir)
    manifest = load_manifest(root)
    report = VerifyReport(str(root))
    listed = set()
    for group, g in sorted(manifest["groups"].items()):
        for entry in g["shards"]:
            listed.add(entry["name"])
            _verify_one(root / entry["name"], entry, group, manifest.get("image_size"), report)
            report.shards_checked += 1
    report.unlisted = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if strict and not report.ok:
        raise ShardError(f"shard verification failed:\n{report.summary()}")
    return report


def total_count(manifest: dict[str, Any], classes: list[str], split: str) -> int:
    """Number of samples of the classes' split (0 for a class without that split)."""
    return sum(manifest["groups"].get(f"{qc}/{split}", {}).get("count", 0) for qc in classes)
