#!/usr/bin/env bash
# Everything issue 13 asks of a GPU, in one run (a lent GPU's time is short):
#   1. the GPU tests (pytest -m gpu);
#   2. training throughput of gpt-1.3b at sequence 2048 in bf16 on one GPU: tokens/s, model TFLOP/s,
#      MFU against the datasheet peak and against the matmul rate measured in the same run;
#   3. the planner's prediction for that same run (one GPU, micro-batch 4, 4 micro-batches, no recompute);
#   4. where the step's time goes (torch.profiler classes) for the 14M config on the GPU.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: runs/gpu-check; results also on stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(0); print('h200-141gb' if 'H200' in n else 'a100-80gb' if 'A100' in n else 'h100-80gb')") \
  || { echo "no CUDA device"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
status=0
echo "== 1. pytest -m gpu"
timeout 300 $PY -m pytest -q -m gpu 2>&1 | tail -15 | tee "$OUT/pytest-gpu.txt" || status=1
echo "== 2. gpt-1.3b, seq 2048, bf16, one GPU"
timeout 300 $PY benchmarks/train_throughput.py --device cuda --configs gpt-1.3b --precisions bf16 --steps 8 --repeats 1 \
  2>&1 | tee "$OUT/throughput.txt" || status=1
echo "== 3. planner prediction for the same run ($GPU)"
timeout 60 $PY -m mtnlg plan --config configs/gpt-1.3b.toml --gpu "$GPU" --gpus 1 --gpus-per-node 1 --tp 1 --pp 1 \
  --micro-batch 4 --global-batch 16 --recompute none --precision bf16 2>&1 | tee "$OUT/plan.txt" || status=1
echo "== 4. step breakdown, 14M config on the GPU"
timeout 120 $PY benchmarks/profile_step.py --config 14m --device cuda --steps 3 --trace "$OUT/trace-14m.json" \
  2>&1 | grep -v USDT | tee "$OUT/breakdown-14m.txt" || status=1
exit $status
