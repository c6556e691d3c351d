"""Entry point for `accelerate launch train.py [--config X] [--set key=value ...] [--resume] [--tasks A:B]`.

With no arguments it runs the embedded demo (configs/demo.yaml): generated demo data -> shards -> a 3-task
continual sequence -> results in runs/demo/report/.
"""
from cdad_dist.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
