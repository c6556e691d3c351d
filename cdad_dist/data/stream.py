"""Streaming batches out of WebDataset shards: infinite, shuffled training streams and finite evaluation streams.

Splitting (training). Each epoch the task's shards are permuted with a seed that depends on (seed, epoch); then
- shard mode (at least ranks × workers shards): the shards are dealt to the ranks × workers "bins", each next shard
  to the bin with the fewest samples so far (ties: lowest bin), so bins are disjoint and nearly balanced;
- sample mode (fewer shards than bins, e.g. one class with one 1-GB shard on 8 GPUs): every bin reads all of the
  task's shards in the permuted order and keeps sample i where i % world == rank, and among those the j-th where
  j % workers == worker. Every rank reads all bytes but decodes only its own samples; small data sets still work.
Within a bin, samples go through a seeded shuffle buffer (seed = f(seed, epoch, rank, worker)). A bin's stream is
infinite: when its part of epoch e is done it goes on with its part of epoch e + 1 (a rank with fewer samples
simply wraps around earlier), so every rank can take the same number of steps; `steps_per_epoch` says how many
steps one pass over the task is worth.

Why the shuffle buffer is ours and not `wds.shuffle`: the emission order here is computed from sample counts in the
manifest alone (a simulated buffer over indices), so a resumed run can skip batches without decoding them, and skip
whole shards or epochs without reading them, and still see exactly what an uninterrupted run would have seen.
Why rank/world are resolved once up front rather than by `wds.split_by_node` inside the pipeline: DataLoader workers
do not reliably see the parent's process group, and an explicit rank makes the split testable and reproducible.
The tar reading itself is webdataset's (`wds.tarfile_to_samples`, via `shards.iter_shard_samples`).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch

from cdad_dist.data.images import resize_mask
from cdad_dist.data.shards import (decode_image_bytes, decode_mask_bytes, iter_shard_samples, load_manifest,
                                   task_shards)
from cdad_dist.errors import ConfigError, ShardError

# perturber(target uint8 HxWx3, source uint8 HxWx3, rng) -> (perturbed uint8 HxWx3, mask uint8 HxW in {0, 1})
Perturber = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# Distinct stream tags so the different random choices never share a seed sequence.
_TAG_SHARDS, _TAG_BUFFER, _TAG_PERTURB, _TAG_SUBSET, _TAG_TOTAL, _TAG_SYNTH = 1, 2, 3, 4, 5, 6


@dataclass
class StreamConfig:
    """Options of the training stream (the perturbation probability lives in NSAConfig)."""

    batch_size: int = 8           # per rank
    image_size: int = 256         # square side the images are resized to (if the shards are not already)
    num_workers: int = 0          # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 256     # samples held for shuffling (1: no sample shuffling, only shard order)
    seed: int = 0
    source_reservoir: int = 8     # recent images per class that perturbation sources are drawn from

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "shuffle_buffer", "source_reservoir"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"stream.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ConfigError(f"stream.num_workers must be >= 0, got {self.num_workers!r}")
        if self.seed < 0:
            raise ConfigError(f"stream.seed must be >= 0, got {self.seed!r}")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world, else torch.distributed's when initialised, else a single process."""
    if (rank is None) != (world_size is None):
        raise ConfigError("give both rank and world_size, or neither (then torch.distributed decides)")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    return int(rank), int(world_size)


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if not classes:
        raise ConfigError("a stream needs at least one class")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ConfigError(f"classes listed twice: {dup}")
    return classes


@dataclass(frozen=True)
class _Shard:
    path: str
    name: str
    cls: str     # qualified class name
    count: int


def _load_task(shard_dir: str | os.PathLike, classes: list[str], split: str) -> tuple[dict, list[_Shard]]:
    manifest = load_manifest(shard_dir)
    shards = [_Shard(str(Path(shard_dir) / e["name"]), e["name"], qc, int(e["count"]))
              for qc, e in task_shards(manifest, classes, split, shard_dir)]
    return manifest, shards


def steps_per_epoch(manifest: dict[str, Any], classes: Sequence[str], batch_size: int, world_size: int) -> int:
    """Optimizer steps that make one pass over the classes' training samples: ceil(total / (batch × world))."""
    total = 0
    for qc in _check_classes(classes):
        g = manifest["groups"].get(f"{qc}/train")
        if g is None:
            raise ShardError(f"class {qc!r} has no 'train' shards in the manifest")
        total += int(g["count"])
    return max(1, math.ceil(total / (batch_size * world_size)))


def _buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of `buffer` slots fed items 0..n-1 in order.

    Each incoming item is appended; once the buffer is full a uniformly chosen slot is emitted (swap with the last
    and pop); at the end the remainder is emitted in random order. Item order[p] is always < p + buffer, so a reader
    holds at most `buffer` items.
    """
    draws = rng.integers(0, buffer, size=max(0, n - buffer + 1))
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    p = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            k = int(draws[p])
            buf[k], buf[-1] = buf[-1], buf[k]
            out[p] = buf.pop()
            p += 1
    out[p:] = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))] if buf else []
    return out


def _deal_shards(counts: Sequence[int], bins: int) -> list[list[int]]:
    """Shard positions per bin: each next shard goes to the bin with the fewest samples (ties: lowest bin)."""
    load = [0] * bins
    dealt: list[list[int]] = [[] for _ in range(bins)]
    for j, c in enumerate(counts):
        b = min(range(bins), key=lambda i: (load[i], i))
        dealt[b].append(j)
        load[b] += c
    return dealt


def _read_items(shards: Sequence[_Shard], items: Sequence[tuple[int, int]],
                wanted: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, raw sample) for the wanted item indices (ascending), opening only the shards that hold them."""
    current, it, pos = -1, None, -1
    try:
        for idx in wanted:
            s, want_pos = items[idx]
            if s != current or want_pos <= pos:
                if it is not None:
                    it.close()
                current, it, pos = s, iter_shard_samples(shards[s].path), -1
            while pos < want_pos:
                try:
                    raw = next(it)
                except StopIteration:
                    raise ShardError(f"{shards[s].path}: shard ended after {pos + 1} samples, manifest says "
                                     f"{shards[s].count} (rebuild or verify the shards)") from None
                except (OSError, ValueError, EOFError) as exc:
                    raise ShardError(f"{shards[s].path}: unreadable shard ({exc})") from exc
                pos += 1
            yield idx, raw
    finally:
        if it is not None:
            it.close()


def _decode_raw(raw: dict[str, Any], image_size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """uint8 RGB image, uint8 {0,1} mask (both image_size square) and the meta dict of a raw shard sample."""
    key = raw.get("__key__", "?")
    data = raw.get("image.png", raw.get("image.jpg"))
    if data is None or "mask.png" not in raw or "meta.json" not in raw:
        raise ShardError(f"{raw.get('__url__', '?')}: sample {key} lacks image, mask.png or meta.json")
    image = decode_image_bytes(data, f"{raw.get('__url__', '?')}: sample {key}")
    mask = decode_mask_bytes(raw["mask.png"], f"{raw.get('__url__', '?')}: sample {key}")
    if image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    if mask.shape != (image_size, image_size):
        mask = resize_mask(mask, (image_size, image_size))  # centre-aligned, no defect lost (its doc)
    return image, mask, json.loads(raw["meta.json"])


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[name] for s in samples])).permute(0, 3, 1, 2).float().div_(255.0)

    def masks(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[name] for s in samples])).unsqueeze(1).float()

    batch: dict[str, Any] = {
        "image": images("image"), "mask": masks("mask"),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "cls": [s["cls"] for s in samples], "defect": [s["defect"] for s in samples],
        "key": [s["key"] for s in samples]}
    if "perturbed" in samples[0]:
        batch["perturbed"] = images("perturbed")
        batch["perturb_mask"] = masks("perturb_mask")
    if "synthetic" in samples[0]:
        batch["synthetic"] = images("synthetic")
        batch["synthetic_mask"] = masks("synthetic_mask")
    return batch


def _batches(samples: Iterator[dict[str, Any]], batch_size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    buf: list[dict[str, Any]] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield _collate(buf)
            buf = []
    if buf and not drop_last:
        yield _collate(buf)


# ----------------------------------------------------------------------------------------------------------------
# training stream


class _Reservoir:
    """The last few images of each class, kept encoded; perturbation sources are drawn from it."""

    def __init__(self, size: int, image_size: int) -> None:
        self.size, self.image_size = size, image_size
        self.entries: dict[str, list[list[Any]]] = {}  # cls -> [[raw sample, decoded image or None], ...]

    def add(self, cls: str, raw: dict[str, Any], image: np.ndarray | None) -> None:
        ring = self.entries.setdefault(cls, [])
        ring.append([raw, image])
        if len(ring) > self.size:
            ring.pop(0)

    def draw(self, cls: str, rng: np.random.Generator) -> np.ndarray | None:
        ring = self.entries.get(cls)
        if not ring:
            return None
        entry = ring[int(rng.integers(len(ring)))]
        if entry[1] is None:  # kept encoded while skipping; decode on first use
            entry[1] = _decode_raw(entry[0], self.image_size)[0]
        return entry[1]


class _TrainDataset(torch.utils.data.IterableDataset):
    """One rank's training stream; in DataLoader workers each worker yields its own bin's batches."""

    def __init__(self, shards: list[_Shard], cfg: StreamConfig, epoch_start: int, perturber: Perturber | None,
                 rank: int, world_size: int, skip_batches: int, synthesizer: Perturber | None = None) -> None:
        super().__init__()
        self.shards, self.cfg, self.epoch_start = shards, cfg, epoch_start
        self.perturber, self.rank, self.world_size, self.skip_batches = perturber, rank, world_size, skip_batches
        self.synthesizer = synthesizer
        self.workers = max(1, cfg.num_workers)
        self.bins = world_size * self.workers
        self.mode = "shard" if len(shards) >= self.bins else "sample"
        total = sum(s.count for s in shards)
        if total < self.bins:
            raise ShardError(f"the task has {total} training samples, fewer than ranks × workers = {self.bins}; "
                             "use fewer ranks or workers")

    def epoch_items(self, epoch: int, worker: int) -> list[tuple[int, int]]:
        """(shard index, position in shard) of this rank's and worker's samples of an epoch, in read order."""
        perm = _rng(self.cfg.seed, epoch, _TAG_SHARDS).permutation(len(self.shards))
        b = self.rank * self.workers + worker
        if self.mode == "shard":
            mine = _deal_shards([self.shards[j].count for j in perm], self.bins)[b]
            return [(int(perm[j]), p) for j in mine for p in range(self.shards[perm[j]].count)]
        every = [(int(s), p) for s in perm for p in range(self.shards[s].count)]
        return [it for i, it in enumerate(every)
                if i % self.world_size == self.rank and (i // self.world_size) % self.workers == worker]

    def _epoch_samples(self, epoch: int, worker: int, skip: int) -> Iterator[dict[str, Any]]:
        """The epoch's samples of this bin in shuffled order, the first `skip` of them not decoded."""
        cfg = self.cfg
        items = self.epoch_items(epoch, worker)
        order = _buffer_order(len(items), cfg.shuffle_buffer, _rng(cfg.seed, epoch, self.rank, worker, _TAG_BUFFER))
        keep = set(order[skip:].tolist())
        if self.perturber is not None or self.synthesizer is not None:
            # the reservoir at the resume point needs the last skipped images per class
            last: dict[str, list[int]] = {}
            for idx in order[:skip][::-1].tolist():
                ring = last.setdefault(self.shards[items[idx][0]].cls, [])
                if len(ring) < cfg.source_reservoir:
                    ring.append(idx)
            keep.update(i for ring in last.values() for i in ring)
        reader = _read_items(self.shards, items, sorted(keep))
        pending: dict[int, dict[str, Any]] = {}
        reservoir = _Reservoir(cfg.source_reservoir, cfg.image_size)
        try:
            for p, idx in enumerate(order.tolist()):
                if idx not in keep:
                    continue
                while idx not in pending:
                    got, raw = next(reader)
                    pending[got] = raw
                raw = pending.pop(idx)
                cls = self.shards[items[idx][0]].cls
                if p < skip:
                    reservoir.add(cls, raw, None)
                    continue
                yield self._sample(raw, cls, reservoir, _rng(cfg.seed, epoch, self.rank, worker, p, _TAG_PERTURB),
                                   _rng(cfg.seed, epoch, self.rank, worker, p, _TAG_SYNTH))
        finally:
            reader.close()

    def _sample(self, raw: dict[str, Any], cls: str, reservoir: _Reservoir, rng: np.random.Generator,
                synth_rng: np.random.Generator) -> dict[str, Any]:
        image, mask, meta = _decode_raw(raw, self.cfg.image_size)
        sample = {"image": image, "mask": mask, "label": int(meta["label"]), "defect": meta["defect"],
                  "cls": cls, "key": raw["__key__"]}
        if self.perturber is not None:
            source = reservoir.draw(cls, rng)
            # the very first image of a class in an epoch has no other image yet: it is its own source
            perturbed, pmask = self.perturber(image, image if source is None else source, rng)
            sample["perturbed"], sample["perturb_mask"] = perturbed, pmask
        if self.synthesizer is not None:  # its own generator: the head's anomalies never shift the NSA draws
            source = reservoir.draw(cls, synth_rng)
            sample["synthetic"], sample["synthetic_mask"] = self.synthesizer(
                image, image if source is None else source, synth_rng)
        if self.perturber is not None or self.synthesizer is not None:
            reservoir.add(cls, raw, image)
        return sample

    def worker_batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """Infinite batches of one worker; batch j of the rank is batch j // workers of worker j % workers."""
        skip = len(range(worker, self.skip_batches, self.workers)) * self.cfg.batch_size

        def samples() -> Iterator[dict[str, Any]]:
            nonlocal skip
            epoch = self.epoch_start
            while True:
                n = len(self.epoch_items(epoch, worker))
                if skip >= n:  # a whole skipped epoch costs no I/O
                    skip -= n
                else:
                    yield from self._epoch_samples(epoch, worker, skip)
                    skip = 0
                epoch += 1

        return _batches(samples(), self.cfg.batch_size, drop_last=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            if self.workers != 1:
                raise RuntimeError("a stream with num_workers > 0 must be read through its DataLoader")
            return self.worker_batches(0)
        cv2.setNumThreads(1)  # one decoding thread per worker process; the workers are the parallelism
        # The DataLoader takes batches round-robin starting at its worker 0, but after skipping n batches the next
        # one belongs to bin n % workers: so DataLoader worker i plays bin (i + n) % workers.
        return self.worker_batches((info.id + self.skip_batches) % self.workers)


class TrainStream:
    """Infinite iterable of training batches of one rank (see the module docstring for the splitting)."""

    def __init__(self, dataset: _TrainDataset) -> None:
        self.dataset = dataset

    @property
    def mode(self) -> str:
        """Either "shard" (disjoint shards per rank and worker) or "sample" (sample-level split of each shard)."""
        return self.dataset.mode

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        if ds.cfg.num_workers == 0:
            return iter(ds)
        # Spawned, not forked: a forked worker inherits OpenCV's (and OpenMP's) thread pools mid-state and can hang
        # on its first cv2 call once the parent has used cv2 (seen: cv2.setNumThreads blocking forever).
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=ds.cfg.num_workers,
                                             multiprocessing_context="spawn", persistent_workers=False)
        return iter(loader)


def train_stream(shard_dir: str | os.PathLike, classes: Sequence[str], *, cfg: StreamConfig, epoch_start: int = 0,
                 perturber: Perturber | None = None, rank: int | None = None, world_size: int | None = None,
                 skip_batches: int = 0, synthesizer: Perturber | None = None) -> TrainStream:
    """Infinite stream of training batches of the classes, for this rank.

    The order is a function of (cfg.seed, epoch_start, rank, world_size, cfg.num_workers) only. skip_batches=n
    starts at batch n of that sequence without decoding the skipped samples, so a resumed run sees the same data.
    rank/world_size default to torch.distributed's when it is initialised. synthesizer adds the segmentation
    head's synthetic anomaly of each image ("synthetic", "synthetic_mask"), from its own seeded generator.
    """
    classes = _check_classes(classes)
    if epoch_start < 0 or skip_batches < 0:
        raise ConfigError(f"epoch_start and skip_batches must be >= 0, got {epoch_start}, {skip_batches}")
    rank, world_size = _resolve_rank(rank, world_size)
    _, shards = _load_task(shard_dir, classes, "train")
    return TrainStream(_TrainDataset(shards, cfg, epoch_start, perturber, rank, world_size, skip_batches,
                                     synthesizer))


def split_batch_size(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Whole samples per source for one batch: proportional to ``weights`` (largest remainder, ties to the first
    source), and at least one for every source with a positive weight when the batch has room for each."""
    if batch_size < 1 or not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"cannot split a batch of {batch_size} by weights {list(weights)}")
    total = float(sum(weights))
    exact = [batch_size * w / total for w in weights]
    sizes = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: batch_size - sum(sizes)]:
        sizes[i] += 1
    positive = [i for i, w in enumerate(weights) if w > 0]
    if len(positive) <= batch_size:
        for i in positive:
            if sizes[i] == 0:  # take one from the largest source
                j = max(range(len(sizes)), key=lambda k: (sizes[k], -k))
                sizes[j] -= 1
                sizes[i] += 1
    return sizes


def concat_batches(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch from several (same keys): tensors concatenated along dim 0, lists joined, in source order."""
    keys = set(batches[0])
    for b in batches[1:]:
        if set(b) != keys:
            raise ConfigError(f"cannot mix batches with different fields: {sorted(keys)} vs {sorted(b)}")
    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation stream


class EvalStream:
    """Finite batches of this rank's share of the classes' samples: sample i of the task goes to rank i % world."""

    def __init__(self, shards: list[_Shard], items: list[tuple[int, int]], batch_size: int, image_size: int,
                 perturber: Perturber | None = None, seed: int = 0, synthesizer: Perturber | None = None) -> None:
        self.shards, self.items, self.batch_size, self.image_size = shards, items, batch_size, image_size
        self.perturber, self.seed, self.synthesizer = perturber, seed, synthesizer

    @property
    def num_samples(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def _samples(self) -> Iterator[dict[str, Any]]:
        for idx, raw in _read_items(self.shards, self.items, range(len(self.items))):
            image, mask, meta = _decode_raw(raw, self.image_size)
            sample = {"image": image, "mask": mask, "label": int(meta["label"]), "defect": meta["defect"],
                      "cls": self.shards[self.items[idx][0]].cls, "key": raw["__key__"]}
            if self.perturber is not None:
                # Seeded by the image's key, with the image as its own patch source: the same perturbation
                # whatever the rank split or batch order.
                rng = _rng(self.seed, zlib.crc32(raw["__key__"].encode()), _TAG_PERTURB)
                sample["perturbed"], sample["perturb_mask"] = self.perturber(image, image, rng)
            if self.synthesizer is not None:
                rng = _rng(self.seed, zlib.crc32(raw["__key__"].encode()), _TAG_SYNTH)
                sample["synthetic"], sample["synthetic_mask"] = self.synthesizer(image, image, rng)
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _batches(self._samples(), self.batch_size, drop_last=False)


def _subset(n: int, qc: str, limit: int | None, fraction: float | None, seed: int) -> list[int]:
    """Sorted positions of a seeded subset of a class's n samples (all of them without limit/fraction)."""
    k = n
    if fraction is not None:
        k = min(k, max(1, math.ceil(fraction * n)))
    if limit is not None:
        k = min(k, limit)
    if k >= n:
        return list(range(n))
    chosen = _rng(seed, zlib.crc32(qc.encode()), _TAG_SUBSET).choice(n, size=k, replace=False)
    return sorted(int(i) for i in chosen)


def eval_stream(shard_dir: str | os.PathLike, classes: Sequence[str], *, split: str = "test", batch_size: int,
                image_size: int, rank: int | None = None, world_size: int | None = None, limit: int | None = None,
                fraction: float | None = None, total: int | None = None, seed: int = 0,
                perturber: Perturber | None = None, synthesizer: Perturber | None = None) -> EvalStream:
    """Every sample of the classes' split exactly once across ranks, in a fixed order, without shuffling.

    limit / fraction keep a seeded subset of each class, and total a seeded subset of all of them, before the
    rank split (basis capture on split="train"): the chosen images do not depend on the number of ranks.
    perturber adds each image's seeded training perturbation ("perturbed"), for a capture of the inputs that
    training shows the network; synthesizer the segmentation head's synthetic anomaly ("synthetic").
    Ranks get ceil or floor of the chosen count / world samples; the last batch may be short.
    """
    classes = _check_classes(classes)
    if batch_size < 1 or image_size < 1:
        raise ConfigError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if total is not None and total < 1:
        raise ConfigError(f"total must be >= 1, got {total}")
    rank, world_size = _resolve_rank(rank, world_size)
    _, shards = _load_task(shard_dir, classes, split)
    items: list[tuple[int, int]] = []
    for qc in classes:
        own = [(s, p) for s, sh in enumerate(shards) if sh.cls == qc for p in range(sh.count)]
        items += [own[i] for i in _subset(len(own), qc, limit, fraction, seed)]
    if total is not None and total < len(items):
        chosen = _rng(seed, _TAG_TOTAL).choice(len(items), size=total, replace=False)
        items = [items[i] for i in sorted(int(i) for i in chosen)]
    return EvalStream(shards, items[rank::world_size], batch_size, image_size, perturber, seed, synthesizer)
