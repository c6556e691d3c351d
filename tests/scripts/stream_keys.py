"""Launched by tests/test_stream_launch.py under `accelerate launch`: each rank writes the sample keys it streams."""
import json
import sys
from pathlib import Path

from cdad_dist.data.shards import load_manifest
from cdad_dist.data.stream import StreamConfig, steps_per_epoch, train_stream
from cdad_dist.engine.accel import make_accelerator


def main() -> None:
    shards, out, classes = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    acc = make_accelerator(mixed_precision="no", grad_accum=1, project_dir=str(out), log_with=None)
    batch = 4
    steps = steps_per_epoch(load_manifest(shards), classes, batch, acc.num_processes)
    stream = iter(train_stream(shards, classes, cfg=StreamConfig(batch_size=batch, image_size=32, seed=3),
                               rank=acc.process_index, world_size=acc.num_processes))
    keys = [key for _ in range(steps) for key in next(stream)["key"]]
    record = {"rank": acc.process_index, "world": acc.num_processes, "steps": steps, "keys": keys}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
