#!/usr/bin/env bash
# Everything a CUDA machine can show that a CPU machine cannot, in one command (see docs/gpu.md):
#   1. the kernel tests, natively (tests/kernels picks CUDA when torch sees a GPU), incl. the compile checks;
#   2. the kernel benchmarks: attention vs dense baselines (SDPA on gathered K/V; vLLM's Triton unified_attention),
#      eager and in a CUDA graph; the probe and compaction per request;
#   3. the engine check (scripts/gpu_engine_check.py): vanilla vs HeadRouter on vLLM's own backend (FLASH_ATTN)
#      with its CUDA graphs, with and without graph replay, and per_head on HeadRouter's backend, on the tiny model;
#   4. a served smoke run: vanilla vs HeadRouter on a dummy-weight real-width model, the same requests (throughput,
#      tokens and usage into the results folder). Steps 3 and 4 need vLLM: skipped, saying so, where vLLM is not
#      installed (steps 1 and 2 need only torch and triton).
# Usage: bash scripts/gpu_check.sh [results folder]      (default: benchmarks/results/<gpu name>/gpu-check)
# Needs: a CUDA GPU, and an environment with vllm==0.32.0 (GPU build) and this package installed:
#   pip install -e '.[gpu]'          ($PYTHON picks the interpreter; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out=${1:-benchmarks/results/$gpu/gpu-check}
mkdir -p "$out"
export VLLM_USE_V2_MODEL_RUNNER=0
has_vllm=$($PY -c "import importlib.util as u; print('yes' if u.find_spec('vllm') else 'no')")
{
  echo "# $(date -u +%FT%TZ) $gpu"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  [ "$has_vllm" = yes ] && $PY -c "import vllm; print('vllm', vllm.__version__)" || echo "vllm: not installed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  # the bandwidth ceiling the kernel benchmark's GB/s are compared with: a device-to-device copy, read + write
  $PY -c "import torch, triton.testing as t; x = torch.empty(2**30, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
ms = t.do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode='median'); print(f'copy bandwidth {2 * x.numel() / ms / 1e6:.0f} GB/s (read + write, 1 GiB)')"
} | tee "$out/machine.txt"

# xdist spreads the kernels' first compilations over the cores where it is installed
xdist=$($PY -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
echo "== 1. kernel tests (native)"
$PY -m pytest -q tests/kernels $xdist --durations=10 -p no:cacheprovider 2>&1 | tee "$out/kernel-tests.txt"

echo "== 2. kernel benchmark"
# bf16, 16-slot blocks: the default kernel and variants (key slots per iteration x programs the decode split aims at)
$PY benchmarks/kernels/bench_head_sparse.py --out "$out/bench_head_sparse_bf16_bs16.csv" --tile-slots 0 16 32 128 \
    --target-programs 0 2048 | tee "$out/bench.txt"
$PY benchmarks/kernels/bench_head_sparse.py --dtype float16 --block-size 32 --out "$out/bench_head_sparse_fp16_bs32.csv" \
    | tee -a "$out/bench.txt"
# prefill (the whole prompt in one step, dense): the kernel's tile sizes vs causal SDPA (flash) on gathered K/V
$PY benchmarks/kernels/bench_head_sparse.py --prefill-lengths 512 2048 --batches 1 8 --tile-slots 0 16 32 128 \
    --out "$out/bench_head_sparse_prefill_bf16_bs16.csv" | tee -a "$out/bench.txt"

# what routing adds to a request: the probe and the compaction, per clip length, vs the prompt's prefill attention
$PY benchmarks/kernels/bench_route_ops.py --out "$out/bench_route_ops.csv" | tee -a "$out/bench.txt"
# decode attention eager vs replayed from a CUDA graph (launch cost) at small batches
$PY benchmarks/kernels/bench_head_sparse.py --cuda-graph --batches 1 8 32 --contexts 1024 4096 --kept-fractions 1.0 0.3 \
    --out "$out/bench_cuda_graph.csv" | tee -a "$out/bench.txt"

if [ "$has_vllm" != yes ]; then
  echo "== 3-4. skipped: vLLM is not installed in this environment (pip install -e '.[gpu]')" | tee "$out/serve-smoke.txt"
  echo "results in $out"
  exit 0
fi
echo "== 3. engine check: vanilla vs HeadRouter on one device, with and without CUDA graph replay"
status=0
$PY scripts/gpu_engine_check.py --out "$out" 2>&1 | tee "$out/engine-check.txt" || status=1
echo "== 4. serving smoke: vanilla vs HeadRouter (shared mode on vLLM's backend), same requests"
model=$(headrouter-vllm make-model qwen2-audio-7b-width-2l "$out/model" | tail -1)
headrouter-vllm bench --model "$model" --load-format dummy --dtype bfloat16 --num-requests 64 --clip-seconds 30 \
    --output-tokens 32 --kv-blocks 2000 --block-size 16 --max-model-len 2048 --out "$out" --name serve-smoke \
    2>&1 | tee "$out/serve-smoke.txt"
echo "results in $out"
exit "$status"
