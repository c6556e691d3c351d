"""Make sure the run's shards exist: generate the demo dataset and pack shards on the main process only."""
from __future__ import annotations

from pathlib import Path

from cdad_dist.config import DataConfig
from cdad_dist.data.formats import ScanOptions, scan_format
from cdad_dist.data.shards import build_shards, load_manifest


def scan_configured_dataset(data: DataConfig):
    """The run's dataset through its format (data/formats.py); generated datasets are written when missing."""
    options = ScanOptions(name=data.folder_name, skip_bad=data.skip_bad)
    return scan_format(data.dataset, Path(data.root), options, generate=True)


def ensure_shards(data: DataConfig, accelerator, log=print) -> dict:
    """Build the shards once (main process; resumable), then every rank reads the manifest."""
    shard_dir = Path(data.shards)
    if accelerator.is_main_process and not (shard_dir / "manifest.json").exists():
        log(f"building shards in {shard_dir} from {data.dataset} data at {data.root}")
        catalog = scan_configured_dataset(data)
        if catalog.skipped:
            log(f"skipped {len(catalog.skipped)} bad sample(s) (--skip-bad); first: {catalog.skipped[0]}")
        build_shards(
            catalog.records,
            shard_dir,
            image_size=data.shard_image_size,
            samples_per_shard=data.samples_per_shard,
            skip_bad=data.skip_bad,
        )
    accelerator.wait_for_everyone()
    return load_manifest(shard_dir)
