"""Tests of cdad_dist.data.stream: batch format, determinism, resume by skipping, rank/worker splitting."""
from __future__ import annotations

from collections import Counter
from itertools import islice

import cv2
import numpy as np
import pytest
import torch

import cdad_dist.data.stream as stream_mod
from cdad_dist.data.images import read_rgb
from cdad_dist.data.shards import build_shards, load_manifest
from cdad_dist.data.stream import StreamConfig, _buffer_order, eval_stream, steps_per_epoch, train_stream
from cdad_dist.errors import ConfigError, ShardError
from dist_utils import run_distributed
from test_shards import make_records

SPEC = {"demo/a": (12, 4), "demo/b": (12, 4), "other/c": (6, 3)}
AB = ["demo/a", "demo/b"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stream")
    records = make_records(root / "data", SPEC)  # 24x20 images; the stream resizes them to 16x16
    build_shards(records, root / "small", samples_per_shard=4)   # a, b: 3 shards each; c: 4 + 2
    build_shards(records, root / "big", samples_per_shard=100)   # one shard per class and split
    return {"small": root / "small", "big": root / "big", "records": records}


def band(img: np.ndarray) -> int:
    """Class of an image from its intensity band (see test_shards.CLASS_BANDS): a 0, b 1, c 2."""
    return int(img.mean()) // 80


class ToyPerturber:
    """With probability 1/2 pastes a random quarter of the source onto the target; records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, target, source, rng):
        self.calls.append((band(target), band(source), source is target))
        mask = np.zeros(target.shape[:2], np.uint8)
        if rng.random() < 0.5:
            return target.copy(), mask
        h, w = target.shape[0] // 2, target.shape[1] // 2
        y, x = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
        out = target.copy()
        out[y:y + h, x:x + w] = source[y:y + h, x:x + w]
        mask[y:y + h, x:x + w] = 1
        return out, mask


def take(stream, n: int) -> list[dict]:
    return list(islice(iter(stream), n))


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def assert_same_batches(xs: list[dict], ys: list[dict]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and x["key"] == y["key"]
        for name, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[name]), name
            else:
                assert v == y[name], name


def all_keys(records, classes, split) -> set[str]:
    counts = Counter()
    out = set()
    for r in sorted(records, key=lambda r: r.image_path):
        if r.qualified_class in classes and r.split == split:
            out.add(f"{r.dataset}__{r.cls}__{split}__{counts[r.qualified_class]:06d}")
            counts[r.qualified_class] += 1
    return out


# ----------------------------------------------------------------------------------------------------------------


def test_buffer_order_is_a_bounded_permutation():
    for n, buf in [(0, 4), (1, 4), (10, 1), (50, 7), (7, 50)]:
        order = _buffer_order(n, buf, np.random.default_rng(3))
        assert sorted(order.tolist()) == list(range(n))
        assert all(order[p] < p + buf for p in range(n))  # a reader never holds more than `buf` items
        np.testing.assert_array_equal(order, _buffer_order(n, buf, np.random.default_rng(3)))
    np.testing.assert_array_equal(_buffer_order(10, 1, np.random.default_rng(0)), np.arange(10))
    assert _buffer_order(50, 7, np.random.default_rng(0)).tolist() != list(range(50))


def test_batch_format_and_perturbation(data):
    pert = ToyPerturber()
    cfg = StreamConfig(batch_size=5, image_size=16, shuffle_buffer=4, seed=0)
    batches = take(train_stream(data["small"], ["demo/a", "other/c"], cfg=cfg, perturber=pert), 8)
    for b in batches:
        assert b["image"].shape == (5, 3, 16, 16) and b["image"].dtype == torch.float32
        assert b["mask"].shape == (5, 1, 16, 16) and b["label"].dtype == torch.long
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["perturbed"].shape == (5, 3, 16, 16) and b["perturb_mask"].shape == (5, 1, 16, 16)
        assert set(b["perturb_mask"].unique().tolist()) <= {0.0, 1.0}
        untouched = (b["perturb_mask"] == 0).expand_as(b["image"])
        assert torch.equal(b["perturbed"][untouched], b["image"][untouched])
        assert set(b["cls"]) <= {"demo/a", "other/c"} and b["defect"] == ["good"] * 5
        assert all(k.split("__")[0] + "/" + k.split("__")[1] == c for k, c in zip(b["key"], b["cls"]))
        for img, c in zip(b["image"], b["cls"]):
            assert band((img.permute(1, 2, 0).numpy() * 255)) == {"demo/a": 0, "other/c": 2}[c]
    assert any(b["perturb_mask"].sum() > 0 for b in batches)
    # sources are always of the target's class, and the target itself only before the class has another image
    assert all(t == s for t, s, _ in pert.calls)
    assert 0 < sum(same for _, _, same in pert.calls) <= 2 * 3  # at most once per class and epoch (3 epochs)


def test_one_epoch_covers_the_task_once(data):
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=5, seed=2)
    spe = steps_per_epoch(load_manifest(data["small"]), AB, 4, 1)
    assert spe == 6
    batches = take(train_stream(data["small"], AB, cfg=cfg), 2 * spe)
    first, second = keys(batches[:spe]), keys(batches[spe:])
    want = all_keys(data["records"], AB, "train")
    assert sorted(first) == sorted(want) and sorted(second) == sorted(want)
    assert first != second  # a new shard order and buffer shuffle every epoch


def test_same_seed_same_sequence_other_epoch_other_order(data):
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=5, seed=7)
    one = take(train_stream(data["small"], AB, cfg=cfg, perturber=ToyPerturber()), 9)
    two = take(train_stream(data["small"], AB, cfg=cfg, perturber=ToyPerturber()), 9)
    assert_same_batches(one, two)
    later = take(train_stream(data["small"], AB, cfg=cfg, epoch_start=1), 6)
    assert keys(later) != keys(one[:6]) and sorted(keys(later)) == sorted(keys(one[:6]))
    other_seed = take(train_stream(data["small"], AB, cfg=StreamConfig(batch_size=4, image_size=16,
                                                                       shuffle_buffer=5, seed=8)), 6)
    assert keys(other_seed) != keys(one[:6])


@pytest.mark.parametrize("skip", [1, 5, 7, 13])
def test_skip_batches_reproduces_the_tail(data, skip):
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=5, seed=3, source_reservoir=3)
    full = take(train_stream(data["small"], AB, cfg=cfg, perturber=ToyPerturber()), skip + 4)
    resumed = take(train_stream(data["small"], AB, cfg=cfg, perturber=ToyPerturber(), skip_batches=skip), 4)
    assert_same_batches(resumed, full[skip:])


def test_skipping_does_not_decode_skipped_samples(data, monkeypatch):
    decoded = []
    real = stream_mod._decode_raw
    monkeypatch.setattr(stream_mod, "_decode_raw", lambda raw, size: decoded.append(raw["__key__"]) or real(raw, size))
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=5, seed=3)
    take(train_stream(data["small"], AB, cfg=cfg, skip_batches=15), 1)  # 2.5 epochs skipped
    assert len(decoded) == 4


def test_workers_split_disjointly_and_reproducibly(data):
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=3, seed=4, num_workers=2)
    stream = train_stream(data["small"], AB, cfg=cfg)
    assert stream.mode == "shard"
    run = take(stream, 12)
    assert sorted(keys(run[:6])) == sorted(all_keys(data["records"], AB, "train"))
    assert_same_batches(take(stream, 12), run)
    assert_same_batches(take(train_stream(data["small"], AB, cfg=cfg, skip_batches=5), 7), run[5:])


def test_sample_level_fallback(data):
    cfg = StreamConfig(batch_size=3, image_size=16, shuffle_buffer=4, seed=0, num_workers=2)
    stream = train_stream(data["big"], ["demo/a"], cfg=cfg)  # 1 shard < 2 workers
    assert stream.mode == "sample"
    spe = steps_per_epoch(load_manifest(data["big"]), ["demo/a"], 3, 1)
    run = take(stream, 2 * spe)
    want = all_keys(data["records"], ["demo/a"], "train")
    assert sorted(keys(run[:spe])) == sorted(want) and sorted(keys(run[spe:])) == sorted(want)
    assert_same_batches(take(train_stream(data["big"], ["demo/a"], cfg=cfg, skip_batches=3), 2), run[3:5])


def test_missing_class_is_named(data):
    cfg = StreamConfig(batch_size=2, image_size=16)
    with pytest.raises(ShardError, match=f"'demo/nope'.*{data['small']}"):
        train_stream(data["small"], ["demo/a", "demo/nope"], cfg=cfg)
    with pytest.raises(ShardError, match="'visa/x'"):
        eval_stream(data["small"], ["visa/x"], batch_size=2, image_size=16)
    with pytest.raises(ShardError, match="manifest not found"):
        train_stream(data["small"] / "nowhere", ["demo/a"], cfg=cfg)


def test_eval_stream_order_and_subsets(data):
    ev = eval_stream(data["small"], ["other/c", "demo/a"], batch_size=3, image_size=16)
    batches = list(ev)
    assert len(ev) == len(batches) == 3 and ev.num_samples == 7
    assert keys(batches) == [f"other__c__test__{i:06d}" for i in range(3)] + [
        f"demo__a__test__{i:06d}" for i in range(4)]
    assert [b["label"].tolist() for b in batches] == [[0, 1, 0], [0, 1, 0], [1]]
    for b in batches:
        for m, lab in zip(b["mask"], b["label"]):
            assert (m.sum() > 0) == bool(lab)
    first = sorted(r.image_path for r in data["records"] if r.cls == "c" and r.split == "test")[0]
    want = cv2.resize(read_rgb(first), (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(batches[0]["image"][0].permute(1, 2, 0).numpy() * 255, want, atol=1e-3)

    sub = keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, limit=5, seed=1)))
    assert Counter(k.split("__")[1] for k in sub) == {"a": 5, "b": 5}
    again = keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, limit=5, seed=1)))
    other = keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, limit=5, seed=2)))
    assert sub == again and sub != other
    half = keys(list(eval_stream(data["small"], ["other/c"], split="train", batch_size=4, image_size=16,
                                 fraction=0.5)))
    assert len(half) == 3
    # total: a count over all the classes, chosen before the rank split, so 1 and 2 ranks take the same images
    whole = keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, total=7, seed=1)))
    split = [keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, total=7, seed=1,
                                   rank=r, world_size=2))) for r in range(2)]
    assert len(whole) == 7 and sorted(whole) == sorted(split[0] + split[1]) and [len(p) for p in split] == [4, 3]
    assert whole != keys(list(eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, total=7,
                                          seed=2)))
    with pytest.raises(ConfigError, match="total"):
        eval_stream(data["small"], AB, split="train", batch_size=4, image_size=16, total=0)


# ----------------------------------------------------------------------------------------------------------------
# two ranks on gloo


def _per_rank(small: str, big: str) -> dict:
    """Runs on each rank; rank and world come from the initialised process group."""
    import torch.distributed as dist

    world = dist.get_world_size()
    out: dict = {}
    cfg = StreamConfig(batch_size=4, image_size=16, shuffle_buffer=3, seed=5)
    spe = steps_per_epoch(load_manifest(small), AB, 4, world)
    stream = train_stream(small, AB, cfg=cfg)
    out["shard"] = (stream.mode, spe, [b["key"] for b in take(stream, spe)])
    cfg = StreamConfig(batch_size=3, image_size=16, shuffle_buffer=3, seed=5)
    spe = steps_per_epoch(load_manifest(big), ["demo/a"], 3, world)
    stream = train_stream(big, ["demo/a"], cfg=cfg)
    out["sample"] = (stream.mode, spe, [b["key"] for b in take(stream, spe)])
    # uneven shards (4,4,4,4,4,4,4,2 over 2 ranks): every rank still takes as many steps as asked
    steps = len(take(train_stream(small, [*AB, "other/c"], cfg=cfg), 3 * spe))
    counts = [None] * world
    dist.all_gather_object(counts, steps)
    out["uneven_steps"] = counts
    out["eval"] = keys(list(eval_stream(small, [*AB, "other/c"], batch_size=2, image_size=16)))
    out["capture"] = keys(list(eval_stream(big, AB, split="train", batch_size=4, image_size=16, limit=5, seed=3)))
    return out


@pytest.mark.distributed
def test_two_ranks_split_disjointly(data):
    r0, r1 = run_distributed(_per_rank, world_size=2, args=(str(data["small"]), str(data["big"])), timeout=90)
    for name, classes in (("shard", AB), ("sample", ["demo/a"])):
        (mode0, spe0, b0), (mode1, spe1, b1) = r0[name], r1[name]
        assert mode0 == mode1 == name and spe0 == spe1 == len(b0) == len(b1)
        k0, k1 = [k for b in b0 for k in b], [k for b in b1 for k in b]
        assert not set(k0) & set(k1)
        assert sorted(k0 + k1) == sorted(all_keys(data["records"], classes, "train"))
    assert r0["uneven_steps"] == r1["uneven_steps"] == [6, 6]
    every = all_keys(data["records"], list(SPEC), "test")
    assert sorted(r0["eval"] + r1["eval"]) == sorted(every) and abs(len(r0["eval"]) - len(r1["eval"])) <= 1
    single = keys(list(eval_stream(data["big"], AB, split="train", batch_size=4, image_size=16, limit=5, seed=3,
                                   rank=0, world_size=1)))
    assert sorted(r0["capture"] + r1["capture"]) == sorted(single) and not set(r0["capture"]) & set(r1["capture"])


def test_eval_stream_perturbation_is_seeded_per_image_not_per_rank(data):
    """Capture's perturbed inputs: the same image gets the same perturbation on 1 or 2 ranks."""
    from cdad_dist.data.perturb import NSAConfig, NSAPerturber

    perturber = NSAPerturber(NSAConfig(probability=1.0))

    def perturbed(rank, world):
        out = {}
        for b in eval_stream(data["small"], AB, split="train", batch_size=3, image_size=16, seed=4, rank=rank,
                             world_size=world, perturber=perturber):
            assert b["perturbed"].shape == b["image"].shape
            out.update({k: (p, m) for k, p, m in zip(b["key"], b["perturbed"], b["perturb_mask"])})
        return out

    one = perturbed(0, 1)
    two = {**perturbed(0, 2), **perturbed(1, 2)}
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k][0], two[k][0]) for k in one)
    assert all(one[k][1].sum() > 0 for k in one)  # probability 1: every image has a patch
