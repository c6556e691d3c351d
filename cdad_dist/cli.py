"""The `cdad` command: demo-data, real-data, shards build/verify, train, predict, report, plan, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cdad_dist.errors import CdadError, ConfigError


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="experiment YAML (default: configs/demo.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue runs/NAME from its newest checkpoint")
    parser.add_argument("--tasks", default=None, help="run only tasks START:STOP of the sequence (e.g. 1:3)")


def _load_train_config(args):
    from cdad_dist.config import load_config

    overrides = list(args.overrides)
    if args.tasks is not None:
        overrides.append(f"tasks={args.tasks}")
    return load_config(args.config, overrides)


def _run_training(args) -> int:
    from cdad_dist.engine.trainer import train

    cfg = _load_train_config(args)
    train(cfg, resume=args.resume)
    return 0


TRAIN_DESCRIPTION = """Train a continual anomaly detector: every task of the configured sequence in turn (train, protect
the task's layer inputs, evaluate every class seen so far, checkpoint, report). Launch it with `accelerate launch
train.py ...` for several GPUs or processes. With no arguments it runs the embedded demo (configs/demo.yaml):
generated demo data -> shards -> a 3-task sequence -> runs/demo/report/."""


def _train_epilog() -> str:
    import dataclasses
    import textwrap

    from cdad_dist.config import RunConfig

    lines = ["config sections and keys (set any with --set SECTION.KEY=VALUE; YAML values, e.g. [1, 2] or null):"]
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys = ", ".join(g.name for g in dataclasses.fields(default))
            lines.append(textwrap.fill(f"{f.name}: {keys}", 110, initial_indent="  ", subsequent_indent="    "))
        else:
            lines.append(f"  {f.name} (top level, default {default!r})")
    lines.append("--resume may change only paths, logging/checkpoint frequency and memory-only switches "
                 "(RESUMABLE_KEYS in cdad_dist/engine/run_dir.py); see docs/reliability.md.")
    return "\n".join(lines)


def train_main(argv: list[str] | None = None) -> int:
    """`train.py`: the accelerate-launch entry."""
    parser = argparse.ArgumentParser(prog="train.py", description=TRAIN_DESCRIPTION, epilog=_train_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(parser)
    args = parser.parse_args(argv)
    return _guard(_run_training, args)


def _guard(fn, args) -> int:
    try:
        return fn(args)
    except CdadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the command had to read or write (training wraps its own: RunWriteError)
        where = f"{err.filename}: {err.strerror}" if err.filename else str(err)
        print(f"error: {where}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------- commands
def _cmd_demo_data(args) -> int:
    from cdad_dist.data.demo import make_demo_dataset

    out = make_demo_dataset(Path(args.out), size=args.size, seed=args.seed)
    print(f"demo dataset written to {out}")
    return 0


def _cmd_real_data(args) -> int:
    from cdad_dist.data.real_photos import make_real_dataset

    out = make_real_dataset(Path(args.out), size=args.size, seed=args.seed, n_train=args.n_train,
                            n_test_good=args.n_test_good, n_test_bad=args.n_test_bad)
    print(f"real-photo dataset written to {out}")
    return 0


def _cmd_shards_build(args) -> int:
    from cdad_dist.data.catalog import scan_dataset
    from cdad_dist.data.shards import build_shards

    catalog = scan_dataset(args.dataset, Path(args.root), name=args.name, split_csv=args.split_csv,
                           skip_bad=args.skip_bad)
    if catalog.skipped:
        print(f"skipped {len(catalog.skipped)} bad sample(s):")
        for path, reason in catalog.skipped:
            print(f"  {path}: {reason}")
    manifest = build_shards(
        catalog.records, Path(args.out), image_size=args.size, samples_per_shard=args.samples_per_shard,
        num_workers=args.workers, skip_bad=args.skip_bad,
    )
    n_shards = sum(len(g["shards"]) for g in manifest["groups"].values())
    n_samples = sum(g["count"] for g in manifest["groups"].values())
    print(f"{n_samples} samples in {n_shards} shards, {len(manifest['groups'])} groups -> {args.out}")
    return 0


def _cmd_shards_verify(args) -> int:
    from cdad_dist.data.shards import verify_shards

    report = verify_shards(Path(args.dir), strict=False)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_train(args) -> int:
    return _run_training(args)


def _cmd_report(args) -> int:
    from cdad_dist.eval.report import compare_runs

    print(compare_runs([Path(d) for d in args.runs]))
    return 0


def _cmd_predict(args) -> int:
    from cdad_dist.eval.predict import predict

    predict(
        Path(args.run), [Path(p) for p in args.inputs], Path(args.out), task=args.task, threshold=args.threshold,
        calibration_images=[Path(p) for p in args.calibrate] if args.calibrate else None, quantile=args.quantile,
        device=args.device, batch_size=args.batch_size, map_kind=args.map,
    )
    return 0


def _cmd_plan(args) -> int:
    from cdad_dist.config import load_config
    from cdad_dist.plan.planner import PlanOptions, make_plan, plan_markdown

    cfg = load_config(args.config, list(args.overrides))
    plan = make_plan(cfg, PlanOptions(world=args.world, gpu_mem_gib=args.gpu_mem, precision=args.precision,
                                      train_images=args.train_images))
    text = plan_markdown(plan)
    print(text, end="")
    if args.out:
        from cdad_dist.atomic import write_json_atomic, write_text_atomic

        out = Path(args.out)
        write_json_atomic(out / "plan.json", plan, default=str)
        write_text_atomic(out / "plan.md", text)
        print(f"plan written to {out}/plan.json and plan.md")
    return 0 if plan["verdict"] is None or plan["verdict"]["fits"] else 1


def _cmd_bench(args) -> int:
    from cdad_dist.bench import run_benchmarks

    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None
    try:
        samples = [int(k) for k in args.samples.split(",") if k] if args.samples else None
    except ValueError:
        raise ConfigError(f"bench: --samples takes comma-separated whole numbers, got {args.samples!r}") from None
    results = run_benchmarks(args.name, quick=args.quick, out_dir=Path(args.out), config=args.config,
                             strategies=strategies, seeds=args.seeds, sequence=args.sequence,
                             compare_maps=args.maps, run_dir=args.run, samples=samples,
                             test_shards=args.test_shards)
    print(json.dumps({k: v.get("summary", "") for k, v in results.items()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdad", description="cdad-dist: continual anomaly detection with diffusion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the generated demo dataset (MVTec layout)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo_data)

    real = sub.add_parser("real-data", help="write the real-photo check dataset (crops of scikit-image's "
                          "photographs, painted defects, MVTec layout; needs scikit-image)")
    real.add_argument("--out", required=True, help="output folder (one sub-folder per photo)")
    real.add_argument("--size", type=int, default=128, help="image side in pixels")
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--n-train", type=int, default=80, help="normal training crops per class")
    real.add_argument("--n-test-good", type=int, default=15, help="normal test crops per class")
    real.add_argument("--n-test-bad", type=int, default=20, help="defective test crops per class")
    real.set_defaults(func=_cmd_real_data)

    shards = sub.add_parser("shards", help="build or verify WebDataset shards").add_subparsers(dest="action", required=True)
    build = shards.add_parser("build")
    from cdad_dist.data.formats import DATASET_REGISTRY

    build.add_argument("--dataset", choices=sorted(DATASET_REGISTRY), required=True,
                       help="the dataset format (data/formats.py)")
    build.add_argument("--root", required=True)
    build.add_argument("--out", required=True)
    build.add_argument("--size", type=int, default=None, help="pre-resize images to SIZE×SIZE")
    build.add_argument("--name", default="folder", help="dataset name for --dataset folder (e.g. demo)")
    build.add_argument("--split-csv", default=None, help="VisA split file (default ROOT/split_csv/1cls.csv)")
    build.add_argument("--samples-per-shard", type=int, default=None)
    build.add_argument("--workers", type=int, default=1)
    build.add_argument("--skip-bad", action="store_true", help="skip and count bad samples instead of failing")
    build.set_defaults(func=_cmd_shards_build)
    verify = shards.add_parser("verify")
    verify.add_argument("dir")
    verify.set_defaults(func=_cmd_shards_verify)

    train_p = sub.add_parser("train", help="train in this process (use `accelerate launch train.py` for several)")
    _add_train_args(train_p)
    train_p.set_defaults(func=_cmd_train)

    predict = sub.add_parser(
        "predict", help="anomaly maps and scores for images with a trained run",
        description="Score images with a trained run: writes OUT/scores.csv, OUT/scores.json and one heat map "
                    "per image (OUT/maps/*.png, at the image's own resolution). An image's score does not depend "
                    "on the other images of the call.")
    predict.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory (runs/NAME)")
    predict.add_argument("--task", default="latest",
                         help="which task-end checkpoint: 'latest' (default) or a task index, e.g. 0")
    predict.add_argument("--threshold", type=float, default=None,
                         help="score above which an image is anomalous (default: none, or --calibrate)")
    predict.add_argument("--calibrate", nargs="+", default=None, metavar="NORMAL_IMAGES",
                         help="set the threshold from normal images or folders: their --quantile of scores")
    predict.add_argument("--quantile", type=float, default=0.99,
                         help="quantile of the normal scores used by --calibrate (default 0.99: ~1%% flagged)")
    predict.add_argument("--map", default=None, choices=["features", "head", "fused"],
                         help="the scored map (default: the run's eval.map; head/fused need model.seg_head)")
    predict.add_argument("--out", required=True, help="output folder (reused: maps no longer listed are removed)")
    predict.add_argument("--device", default=None, help="torch device, e.g. cuda:1 or cpu (default: cuda if any)")
    predict.add_argument("--batch-size", type=int, default=None, dest="batch_size",
                         help="images per batch (default: the run's eval.batch_size); does not change scores")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                         help="image files, or folders scanned recursively for png/jpg/bmp/tif")
    predict.set_defaults(func=_cmd_predict)

    report = sub.add_parser("report", help="compare several runs in one table")
    report.add_argument("runs", nargs="+")
    report.set_defaults(func=_cmd_report)

    plan = sub.add_parser("plan", help="predicted memory per rank and compute of each phase, without training "
                                       "(the model is built on the meta device)")
    plan.add_argument("--config", default=None, help="experiment YAML (default: configs/demo.yaml)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--world", type=int, default=1, help="number of ranks (GPUs)")
    plan.add_argument("--gpu-mem", type=float, default=None, metavar="GIB", help="memory per GPU: adds a verdict")
    plan.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                      help="mixed precision of the launch config (activations)")
    plan.add_argument("--train-images", type=int, default=None,
                      help="training images of a task, for a fractional capture (default 264: MVTec setting 2)")
    plan.add_argument("--out", default=None, help="also write plan.json and plan.md here")
    plan.set_defaults(func=_cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks; each prints ratios measured in one run")
    bench.add_argument("name", help="isvd | projection | inference | continual | throughput | basis | storage | plan | replaycad | all")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--out", default="runs/bench")
    bench.add_argument("--config", default=None,
                       help="run config for `inference` and `continual` (dataset, model, evaluation), e.g. "
                            "configs/real.yaml; default configs/demo.yaml")
    bench.add_argument("--strategies", default=None,
                       help="`continual` only: comma-separated rows, e.g. naive,cdad,joint,knn (default: all but the "
                            "ablation rows, e.g. cdad-synthetic, which run when named)")
    bench.add_argument("--sequence", default=None,
                       help="`continual` only: another task sequence of the dataset, e.g. demo-1x6 (one class per "
                            "task, 6 tasks: where projection saturates)")
    bench.add_argument("--seeds", type=int, default=1,
                       help="`continual` only: repeat the study with N seeds; mean ± std and error bars")
    bench.add_argument("--maps", action="store_true",
                       help="`continual` only: train with the segmentation head and compare the features, head "
                            "and fused maps (pixel AUROC / AP / AUPRO per task, the head's training cost)")
    bench.add_argument("--run", default=None,
                       help="`inference` only: measure this run directory (its latest task end) instead of "
                            "training a model; its test images of every class learned so far")
    bench.add_argument("--samples", default=None,
                       help="`inference` only: comma-separated K >= 2, extra rows with the run's mode averaging "
                            "the maps of K noise draws (eval.reconstruction.samples), e.g. 4,8")
    bench.add_argument("--test-shards", default=None,
                       help="`inference` only: score the test images of these shards (`cdad shards build`) instead "
                            "of the run's own, e.g. a held-out draw of the same classes")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _guard(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
