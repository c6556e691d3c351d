#!/usr/bin/env bash
# Plain-PyTorch alternative to `accelerate launch`: torchrun starts the ranks, Accelerate picks them up from the
# environment. `--max-restarts` restarts all ranks after a failure; `--resume` makes the restarted run continue from
# its newest complete checkpoint (it starts fresh when the run directory does not exist yet).
#   NPROC=8 launch/torchrun.sh --config configs/demo.yaml            # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 launch/torchrun.sh ...   # on every node
# On a CPU-only machine this runs gloo ranks (NPROC=2 works on the 2-core CI machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  train.py --resume "$@"
