"""`cdad predict`: anomaly maps and scores for arbitrary images with a trained run.

    predict(run_dir, [images or folders], out_dir, task="latest", threshold=None)

1. ``load_run``: the run's ``config.yaml`` and the weights of a task-end checkpoint (``latest`` = the newest task
   end), built with ``build_model(cfg.model)``; the checkpoint's ``model.safetensors`` is checked against its
   manifest checksum first, so a damaged file is an error and not silent garbage.
2. Inputs: files as given, folders scanned recursively for png/jpg/jpeg/bmp/tif/tiff (any case), sorted.
   Images are read with ``read_rgb`` and resized (INTER_AREA, as the shards and the stream do) to the model's size.
   An unreadable image is reported on stderr and in the outputs (``error`` field) and skipped.
3. ``score_batch`` — what the evaluator does per batch (the reconstruction with ``cfg.eval.reconstruction``,
   the reference D(E(x)), ``anomaly_maps`` with ``cfg.eval.anomaly_map``) in one function, shared with
   ``cdad bench inference``. Noise comes from one CPU generator per image seeded by (reconstruction seed, the
   image's pixels): an image gets the same score in any batch, on any device, and the same as in the evaluator.
4. Outputs in ``out_dir``: ``scores.csv`` and ``scores.json`` (path, score, decision, map file, error) and one PNG
   per image under ``maps/`` (input | heat-map overlay, both at the image's own resolution and aspect ratio, the
   map upsampled from the model's size; the threshold as a contour, in the title and on the colour bar). Maps that
   an earlier call listed in ``scores.json`` and this one does not are removed, so a reused ``out_dir`` holds no
   stale maps.

Decision: ``anomalous = score > threshold``. The threshold is ``threshold`` when given; otherwise, when
``calibration_images`` (normal images, e.g. a validation folder of good parts) are given, it is
``calibrate_threshold``'s ``quantile`` of their scores (default 0.99: about 1 % of normal images flagged);
otherwise there is no decision (the ``anomalous`` field is empty/null).

Colour scale of the heat maps: shared by every image of one call, from the smallest to the largest map value
(the top raised to the threshold if that is higher), so a normal image does not look hot merely because its own
maximum fills the scale. The maps are therefore kept in memory (float32, model size) until the call ends, 16 KB
per image at 64 px and 256 KB at 256 px; the images are read again to draw them rather than kept.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import load_file

from cdad_dist.atomic import sha256_file, write_json_atomic
from cdad_dist.config import RunConfig, load_config
from cdad_dist.data.images import read_rgb
from cdad_dist.continual.protocol import ContinualStrategy, StrategyContext, build_strategy
from cdad_dist.eval.head_maps import MAP_KINDS
from cdad_dist.engine.checkpoint import MANIFEST, STRATEGY, CheckpointRef, select_task_end
from cdad_dist.errors import CdadError, CheckpointError
from cdad_dist.eval.anomaly_map import extractor_from_config
from cdad_dist.eval.scoring import ScoredBatch, score_with
from cdad_dist.models.presets import build_model, resolve_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained model ready to score images: its config, checkpoint, feature extractor and device."""

    run_dir: Path
    cfg: RunConfig
    checkpoint: CheckpointRef
    model: torch.nn.Module
    extractor: torch.nn.Module
    image_size: int
    device: torch.device
    # The run's strategy's own scorer when it detects by other means than the reconstruction (``knn``), else None
    scorer: Callable | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _verify_weights(ref: CheckpointRef, name: str = WEIGHTS) -> Path:
    """Check one file (default: the weights) against the manifest (hashing optimizer states would cost time for
    nothing)."""
    weights = ref.path / name
    try:
        expected = json.loads((ref.path / MANIFEST).read_text())["files"][name]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ref.path}: cannot read the checksum of {name} from {MANIFEST} ({err!r})") \
            from None
    if not weights.is_file():
        raise CheckpointError(f"{ref.path}: {name} is missing")
    if sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: does not match its checksum in {MANIFEST} (damaged file)")
    return weights


def _strategy_scorer(cfg: RunConfig, ref: CheckpointRef, extractor, image_size: int) -> Callable | None:
    """The strategy's ``score_batch`` when it overrides the reconstruction's (``knn``: its memory banks, loaded
    from the checkpoint), so that predict scores as the evaluator did; None for reconstruction strategies."""
    strategy = build_strategy(cfg.continual)
    if type(strategy).score_batch is ContinualStrategy.score_batch:
        return None
    state_file = _verify_weights(ref, STRATEGY)
    strategy.bind(StrategyContext(extractor=extractor, image_size=image_size))
    strategy.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=False))
    return strategy.score_batch


def load_run(run_dir: str | Path, task: str | int = "latest", device: str | torch.device | None = None) -> LoadedRun:
    """Config + task-end weights of a run, in eval mode on ``device`` (default: cuda when available)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir}: not a cdad-dist run directory (no config.yaml)")
    cfg = load_config(config_file)
    ref = select_task_end(run_dir, task)
    weights = _verify_weights(ref)
    device = torch.device(device) if device is not None else default_device()
    model = build_model(cfg.model)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: does not fit the model of {config_file}: {err}") from None
    model.to(device).eval()
    extractor = extractor_from_config(cfg.eval.anomaly_map, device=device)
    image_size = resolve_config(cfg.model).image_size
    scorer = _strategy_scorer(cfg, ref, extractor, image_size)
    return LoadedRun(run_dir, cfg, ref, model, extractor, image_size, device, scorer)


# ----------------------------------------------------------------------------------------------------------------
# scoring (shared with `cdad bench inference`)
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # output name of the heat map, relative to maps/ (unique within a call)


def collect_images(inputs: Iterable[str | Path]) -> list[InputImage]:
    """Files as given; folders scanned recursively for image suffixes (case-insensitive), sorted.

    Heat-map names keep a folder's inner layout under the folder's own name (``test/scratch/000.png``), so
    same-named files of different folders do not collide; remaining clashes get ``-2``, ``-3``, ...
    A path that does not exist is kept: reading it fails and it is reported like any unreadable image.
    """
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, (Path(item.resolve().name) / p.relative_to(item)).as_posix()) for p in files]
        else:
            found.append((item, item.name))
    taken: set[str] = set()
    images = []
    for path, rel in found:
        stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
        name, n = f"{stem}.png", 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        images.append(InputImage(path, name))
    return images


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """3×size×size float in [0, 1], resized with INTER_AREA like the shard writer and the stream do."""
    rgb = read_rgb(path)
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def _readable_batches(images: Sequence[InputImage], size: int, batch_size: int,
                      errors: dict[int, str]) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Batches of (index, image) of the readable images, read lazily (a big folder never sits in memory);
    an unreadable one gets an entry in ``errors`` and a line on stderr."""
    chunk: list[tuple[int, torch.Tensor]] = []
    for i, item in enumerate(images):
        try:
            chunk.append((i, load_image(item.path, size)))
        except (CdadError, cv2.error) as err:
            errors[i] = str(err)
            print(f"skipping unreadable image: {err}", file=sys.stderr)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _score_images(run: LoadedRun, images: Sequence[InputImage], errors: dict[int, str],
                  batch_size: int | None = None) -> Iterator[tuple[list[int], ScoredBatch]]:
    """(indices, ScoredBatch) per batch of readable images; the noise is seeded per image (score_batch)."""
    batches = _readable_batches(images, run.image_size, batch_size or run.cfg.eval.batch_size, errors)
    for chunk in batches:
        x = torch.stack([t for _, t in chunk]).to(run.device)
        scored = score_with(run.scorer, run.model, run.extractor, x, run.cfg.eval)  # as the evaluator scores
        yield [i for i, _ in chunk], scored


# ----------------------------------------------------------------------------------------------------------------
# threshold
# ----------------------------------------------------------------------------------------------------------------
def calibrate_threshold(run: LoadedRun | str | Path, normal_images: Iterable[str | Path], quantile: float = 0.99,
                        *, task: str | int = "latest", batch_size: int | None = None,
                        log: Callable[[str], None] | None = None) -> float:
    """The ``quantile`` of the image scores of normal images (files or folders): scores above it are anomalous.

    ``run`` is a loaded run or a run directory (then ``task`` picks the checkpoint). Unreadable images are
    reported and skipped; with no readable image at all it is an error. Fewer than ``1 / (1 - quantile)``
    images cannot resolve that quantile (the threshold is then interpolated between the top few scores): a
    warning says how many would.
    """
    if not 0.0 < quantile <= 1.0:
        raise CdadError(f"calibration quantile must be in (0, 1], got {quantile}")
    run = run if isinstance(run, LoadedRun) else load_run(run, task)
    images = collect_images(normal_images)
    scores = [float(v) for _, b in _score_images(run, images, {}, batch_size) for v in b.scores.float().cpu()]
    if not scores:
        raise CdadError(f"threshold calibration: none of the {len(images)} normal image(s) could be read "
                        f"(inputs: {[str(p) for p in normal_images]})")
    needed = math.ceil(1.0 / (1.0 - quantile) - 1e-9) if quantile < 1.0 else None
    if needed is not None and len(scores) < needed:
        message = (f"warning: calibration with {len(scores)} normal image(s) cannot resolve quantile {quantile} "
                   f"(a {100 * (1 - quantile):.3g} % false-alarm rate needs at least {needed}); the threshold lies "
                   f"among the highest normal scores")
        (log or (lambda m: print(m, file=sys.stderr)))(message)
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------
def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, title: str, scale: tuple[float, float],
                 threshold: float | None = None, map_size: int | None = None) -> Path:
    """Input | input with the map in `jet` over it, both at the image's own resolution and aspect ratio (the map
    is upsampled from the model's ``map_size``, which the panel title says); the colour bar is in score units
    with the threshold marked on it, and the threshold is a white contour where the map crosses it."""
    height, width = image.shape[:2]
    if amap.shape != (height, width):
        amap = cv2.resize(amap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    # A fixed layout (constrained layout would cost more than the rest of predict per image): two panels of the
    # image's aspect ratio, room on the right for the colour bar and its label.
    panel_w = 2.6
    panel_h = min(max(panel_w * height / width, 1.0), 6.0)
    fig = Figure(figsize=(2 * panel_w + 1.6, panel_h + 0.9), dpi=100)
    fig.subplots_adjust(left=0.02, right=0.78, bottom=0.04, top=1 - 0.8 / (panel_h + 0.9), wspace=0.05)
    ax_in, ax_map = fig.subplots(1, 2)
    ax_in.imshow(image)
    ax_in.set_title(f"input ({width}×{height})", fontsize=8)
    ax_map.imshow(image)
    lo, hi = scale
    im = ax_map.imshow(amap, cmap="jet", alpha=0.5, vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    note = f"anomaly map ({map_size}×{map_size}, upsampled)" if map_size and (map_size, map_size) != (height, width) \
        else "anomaly map"
    if threshold is not None:
        if float(amap.min()) < threshold < float(amap.max()):
            ax_map.contour(amap, levels=[threshold], colors="white", linewidths=1.0)
            note += f"\nwhite line: threshold {threshold:.4g}"
        else:
            side = "below" if float(amap.max()) <= threshold else "above"
            note += f"\nthe whole map is {side} the threshold {threshold:.4g}"
    ax_map.set_title(note, fontsize=8)
    for ax in (ax_in, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(im, cax=fig.add_axes((0.81, 0.1, 0.025, 0.7)))
    marked = threshold is not None and lo <= threshold <= hi
    bar.set_label("anomaly score" + (f" (line: threshold {threshold:.4g})" if marked else ""), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if marked:
        bar.ax.axhline(threshold, color="white", linewidth=2.5)
        bar.ax.axhline(threshold, color="black", linewidth=1.0)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _color_scale(maps: Iterable[np.ndarray], threshold: float | None) -> tuple[float, float]:
    """(min, max) over every map of the call; the top raised to the threshold when every map stays below it, so a
    batch of normal images is not painted red."""
    values = [v for m in maps for v in (float(m.min()), float(m.max()))]
    if not values:
        return (0.0, 1.0)
    lo, hi = min(values), max(values)
    return (lo, max(hi, threshold) if threshold is not None else hi)


def _decision(score: float | None, threshold: float | None) -> bool | None:
    return None if score is None or threshold is None else bool(score > threshold)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        extra = sorted({k for r in rows for k in r if k.startswith("score_")})  # per map kind, with a head
        writer.writerow(["path", "score", "anomalous", "map", "error", *extra])
        for r in rows:
            decision = "" if r["anomalous"] is None else str(r["anomalous"]).lower()
            score = "" if r["score"] is None else f"{r['score']:.6g}"
            kinds = ["" if r.get(k) is None else f"{r[k]:.6g}" for k in extra]
            writer.writerow([r["path"], score, decision, r["map"] or "", r["error"] or "", *kinds])


def _draw_maps(run: LoadedRun, images: Sequence[InputImage], scores: dict[int, float], maps: dict[int, np.ndarray],
               threshold: float | None, scale: tuple[float, float], out_dir: Path,
               errors: dict[int, str]) -> dict[int, str]:
    """One overlay PNG per scored image (each image read again, see the module doc); {index: relative path}."""
    files = {}
    for i, score in sorted(scores.items()):
        item = images[i]
        try:
            image = read_rgb(item.path)  # drawn at its own resolution and aspect ratio, not the model's square
        except (CdadError, cv2.error) as err:  # changed on disk since it was scored
            errors[i] = f"scored, but unreadable when drawing its heat map: {err}"
            print(f"no heat map: {err}", file=sys.stderr)
            continue
        decision = _decision(score, threshold)
        verdict = "" if decision is None else (" anomalous" if decision else " normal")
        where = f"{item.path.parent.name}/{item.path.name}" if item.path.parent.name else item.path.name
        title = f"{where}: score {score:.4g}{verdict}"
        save_overlay(out_dir / "maps" / item.name, image, maps[i], title, scale, threshold, run.image_size)
        files[i] = f"maps/{item.name}"
    return files


# ----------------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------------
def predict(run_dir: str | Path | LoadedRun, inputs: Sequence[str | Path], out_dir: str | Path, *,
            task: str | int = "latest", threshold: float | None = None,
            calibration_images: Sequence[str | Path] | None = None, quantile: float = 0.99,
            device: str | torch.device | None = None, batch_size: int | None = None,
            map_kind: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score images with a trained run; writes ``scores.csv``, ``scores.json`` and ``maps/*.png`` in ``out_dir``.

    ``run_dir`` may also be a ``LoadedRun`` (then ``task`` and ``device`` are ignored), to score several
    folders without loading the model again. ``map_kind`` (features / head / fused) overrides the run's
    ``eval.map``; with a segmentation head every row also gets the image score of each map kind. Returns the
    content of ``scores.json``. Raises CdadError when no input image is found or none can be read (after writing
    the outputs that say why).
    """
    images = collect_images(inputs)
    if not images:
        raise CdadError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in {[str(p) for p in inputs]}")
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, task, device)
    if map_kind is not None and map_kind != run.cfg.eval.map:
        if map_kind not in MAP_KINDS:
            raise CdadError(f"--map {map_kind!r}: choose one of {', '.join(MAP_KINDS)}")
        if map_kind != "features" and getattr(run.model, "seg_head", None) is None:
            raise CdadError(f"--map {map_kind}: the run {run.run_dir} has no segmentation head (model.seg_head)")
        run = replace(run, cfg=replace(run.cfg, eval=replace(run.cfg.eval, map=map_kind)))
    source = "given" if threshold is not None else None
    if threshold is None and calibration_images:
        threshold = calibrate_threshold(run, calibration_images, quantile, batch_size=batch_size, log=log)
        source = f"calibrated: quantile {quantile} of normal image scores"
        log(f"calibrated threshold {threshold:.6g} ({source})")
    errors: dict[int, str] = {}
    scores: dict[int, float] = {}
    maps: dict[int, np.ndarray] = {}
    by_kind: dict[int, dict[str, float]] = {}
    for indices, scored in _score_images(run, images, errors, batch_size):
        for j, i in enumerate(indices):
            scores[i] = float(scored.scores[j])
            maps[i] = scored.maps[j, 0].float().cpu().numpy()
            if scored.scores_by_kind and len(scored.scores_by_kind) > 1:
                by_kind[i] = {f"score_{k}": float(v[j]) for k, v in scored.scores_by_kind.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = _color_scale(maps.values(), threshold)
    map_files = _draw_maps(run, images, scores, maps, threshold, scale, out_dir, errors)
    _remove_stale_maps(out_dir, set(map_files.values()))
    rows = [{"path": str(item.path), "score": scores.get(i), "anomalous": _decision(scores.get(i), threshold),
             "map": map_files.get(i), "error": errors.get(i), **by_kind.get(i, {})} for i, item in enumerate(images)]
    result = {
        "run": str(run.run_dir), "checkpoint": run.checkpoint.path.name, "task": run.checkpoint.task,
        "image_size": run.image_size, "strategy": run.cfg.continual.strategy,
        "scored_by": "strategy" if run.scorer is not None else "reconstruction",
        "reconstruction": asdict(run.cfg.eval.reconstruction), "map_kind": run.cfg.eval.map,
        "threshold": threshold, "threshold_source": source, "map_color_scale": list(scale),
        "n_images": len(images), "n_scored": len(scores), "n_errors": len(errors), "results": rows,
    }
    _write_csv(out_dir / "scores.csv", rows)
    write_json_atomic(out_dir / "scores.json", _json_safe(result), sort_keys=False)
    n_bad = sum(bool(r["anomalous"]) for r in rows)
    log(f"{len(scores)} image(s) scored with {run.checkpoint.path.name}"
        + (f", {n_bad} anomalous at threshold {threshold:.6g}" if threshold is not None else "")
        + (f", {len(errors)} unreadable (skipped)" if errors else "") + f" -> {out_dir}")
    if not scores:
        raise CdadError(f"none of the {len(images)} input image(s) could be read; see {out_dir / 'scores.json'}")
    return result


def _remove_stale_maps(out_dir: Path, current: set[str]) -> None:
    """Delete the heat maps that an earlier call listed in ``out_dir/scores.json`` and this call did not write, so
    a reused ``--out`` holds only maps of the scores it lists (files that no call of ours wrote are left alone)."""
    try:
        previous = json.loads((out_dir / "scores.json").read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for row in previous:
        rel = row.get("map") if isinstance(row, dict) else None
        if isinstance(rel, str) and rel.startswith("maps/") and rel not in current and ".." not in Path(rel).parts:
            (out_dir / rel).unlink(missing_ok=True)
            for parent in (out_dir / rel).parents:  # and the folders that held only such maps
                if parent == out_dir / "maps" or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: written as null (a NaN score would come from a broken model, not from the input)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
