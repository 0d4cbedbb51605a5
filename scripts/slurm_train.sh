#!/bin/bash
# Multi-node mtnlg training under SLURM: one torchrun per node, 8 GPUs each,
# rendezvous on the first node.  MT-NLG's layout: tensor parallelism inside a
# node (tp=8, NVLink), pipeline across nodes, data parallelism outermost.
#
#   sbatch --nodes 35 scripts/slurm_train.sh configs/mtnlg-530b.toml runs/530b parallel.tp=8 parallel.pp=35
#
#SBATCH --job-name=mtnlg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it starts the 8 workers
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: slurm_train.sh CONFIG RUN_DIR [section.key=value ...]}
RUN=${2:?usage: slurm_train.sh CONFIG RUN_DIR [section.key=value ...]}
shift 2
OVERRIDES=()
for kv in "$@"; do OVERRIDES+=(--set "$kv"); done

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# torchrun numbers ranks node by node (RANK = node * 8 + local_rank), so the
# (dp, pp, tp) mesh with tp innermost keeps each tensor-parallel group on one node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    -m mtnlg train --config "$CONFIG" --run-dir "$RUN" "${OVERRIDES[@]}"
