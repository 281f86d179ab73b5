#!/usr/bin/env bash
# Everything a CUDA machine can show that a CPU machine cannot, in one command (see docs/gpu.md):
#   1. the kernel tests, natively (tests/kernels picks CUDA when torch sees a GPU), incl. the compile checks;
#   2. the kernel benchmark vs dense baselines (SDPA on gathered K/V; vLLM's Triton unified_attention);
#   3. a served smoke run: HeadRouter's GPU worker and backend on a dummy-weight real-width model, the same
#      requests against vanilla vLLM (tokens and usage into the results folder).
# Usage: bash scripts/gpu_check.sh [results folder]      (default: benchmarks/results/<gpu name>/gpu-check)
# Needs: a CUDA GPU, and an environment with vllm==0.32.0 (GPU build) and this package installed:
#   pip install -e '.[gpu]'
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out=${1:-benchmarks/results/$gpu/gpu-check}
mkdir -p "$out"
export VLLM_USE_V2_MODEL_RUNNER=0
{
  echo "# $(date -u +%FT%TZ) $gpu"
  python -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$out/machine.txt"

echo "== 1. kernel tests (native)"
python -m pytest -q tests/kernels --durations=10 -p no:cacheprovider 2>&1 | tee "$out/kernel-tests.txt"

echo "== 2. kernel benchmark"
python benchmarks/kernels/bench_head_sparse.py --out "$out/bench_head_sparse_bf16_bs16.csv"
python benchmarks/kernels/bench_head_sparse.py --dtype float16 --block-size 32 --out "$out/bench_head_sparse_fp16_bs32.csv"

echo "== 3. engine smoke: vanilla vs HeadRouter (GPU worker, HeadRouter backend), same requests"
model=$(headrouter-vllm make-model qwen2-audio-7b-width-2l "$out/model" | tail -1)
headrouter-vllm bench --model "$model" --load-format dummy --dtype bfloat16 --num-requests 64 --clip-seconds 30 \
    --output-tokens 32 --kv-blocks 2000 --block-size 16 --max-model-len 2048 --out "$out" --name serve-smoke \
    2>&1 | tee "$out/serve-smoke.txt"
echo "results in $out"
