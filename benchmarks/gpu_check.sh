#!/usr/bin/env bash
# Everything issue 13 asks of a GPU, in one run (a lent GPU's time is short):
#   1. the GPU tests (pytest -m gpu, over the files that hold them);
#   2. training throughput of gpt-1.3b at sequence 2048 in bf16 on one GPU, eager and torch.compile'd:
#      tokens/s, model TFLOP/s, MFU against the datasheet peak and against the matmul rate measured in
#      the same run, max_memory_allocated;
#   3. the planner's prediction for that same run (one GPU, micro-batch 4, 4 micro-batches, no
#      recompute): from the datasheet profile, then from a profile calibrated on this GPU;
#   4. where the step's time goes (torch.profiler classes): gpt-1.3b, and 14M with a trace.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: runs/gpu-check; results also on stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(0); print('h200-141gb' if 'H200' in n else 'a100-80gb' if 'A100' in n else 'h100-80gb')") \
  || { echo "no CUDA device"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
status=0
RUN1_3B=(--gpus 1 --gpus-per-node 1 --tp 1 --pp 1 --micro-batch 4 --global-batch 16 --recompute none --precision bf16)
echo "== 1. pytest -m gpu"
# only the files with GPU tests: collecting the others needs every optional extra (lm-eval, fastapi...)
timeout 300 $PY -m pytest -q -p no:cacheprovider -p no:logging --tb=short -m gpu $(grep -rl "pytest.mark.gpu" tests) 2>&1 | tail -40 \
  | tee "$OUT/pytest-gpu.txt" || status=1
echo "== 2. gpt-1.3b, seq 2048, bf16, one GPU: eager"
timeout 300 $PY benchmarks/train_throughput.py --device cuda --configs gpt-1.3b --precisions bf16 --steps 8 --repeats 1 \
  2>&1 | tee "$OUT/throughput.txt" || status=1
echo "== 3. planner prediction for the same run ($GPU datasheet profile)"
timeout 60 $PY -m mtnlg plan --config configs/gpt-1.3b.toml --gpu "$GPU" "${RUN1_3B[@]}" 2>&1 | tee "$OUT/plan.txt" || status=1
echo "== 3b. calibrate this GPU at gpt-1.3b's shapes, then the same prediction from that profile"
timeout 240 $PY -m mtnlg plan --calibrate --config configs/gpt-1.3b.toml --set train.micro_batch=4 \
  --out "$OUT/profile-$GPU-calibrated.json" 2>&1 | tail -5 \
  && timeout 60 $PY -m mtnlg plan --config configs/gpt-1.3b.toml --gpu "$GPU" \
       --device-profile "$OUT/profile-$GPU-calibrated.json" "${RUN1_3B[@]}" 2>&1 | tee "$OUT/plan-calibrated.txt" \
  || status=1
echo "== 4. step breakdown, gpt-1.3b and 14M on the GPU"
timeout 150 $PY benchmarks/profile_step.py --config gpt-1.3b --device cuda --steps 2 \
  2>&1 | grep -v USDT | tee "$OUT/breakdown-1.3b.txt" || status=1
timeout 120 $PY benchmarks/profile_step.py --config 14m --device cuda --steps 3 --trace "$OUT/trace-14m.json" \
  2>&1 | grep -v USDT | tee "$OUT/breakdown-14m.txt" || status=1
echo "== 2b. gpt-1.3b, seq 2048, bf16, one GPU: torch.compile (train.compile=true; the warm-up steps compile)"
timeout 420 $PY benchmarks/train_throughput.py --device cuda --configs gpt-1.3b --precisions bf16 --steps 8 --repeats 1 \
  --compile 2>&1 | grep -v "^W[0-9]" | tee "$OUT/throughput-compile.txt" || status=1
exit $status
