#!/usr/bin/env bash
# Data-parallel training of one run config on several nodes with torchrun (training/train.py:
# DDP, each rank a slice of the global batch, rank 0 writes). Start the same command on every
# node; the c10d rendezvous at MASTER_ADDR (any one of the nodes) assigns the ranks. RUN_JSON is
# a run config as the checkpoint asset writes it (assets/training.py run_config), its out_dir
# and mixture_dir on storage every node sees, and training.batch_size the per-rank batch (the
# recipe's batch_size / (NNODES * GPUS_PER_NODE)): each rank trains on that many sequences.
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0 RUN_JSON=/srv/foundry/run.json profiles/torchrun_multinode.sh
# Under Slurm: srun --nodes=2 --ntasks-per-node=1 env MASTER_ADDR=<first node> ... this script.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?}" "${GPUS_PER_NODE:?}" "${MASTER_ADDR:?}" "${RUN_JSON:?}"
MASTER_PORT="${MASTER_PORT:-29500}"
JOB_ID="${JOB_ID:-foundry-train}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec .venv/bin/torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB_ID" \
  --max_restarts=0 -m training.train --config "$RUN_JSON"
