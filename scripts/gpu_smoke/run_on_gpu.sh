#!/usr/bin/env bash
# The GPU smoke kit's one command on a GPU machine that has no vLLM (the lent H200: Python 3.12, torch 2.11, Triton
# 3.6, no network), from the carry set scripts/gpu_smoke/build.py made on a CPU machine:
#   1. unpacks vLLM 0.32.0's Python sources (the kit's fixes made, the tiny vllm dist-info) into $WORK/src, installs
#      the dependency wheels with `pip install --no-index --no-deps --target $WORK/site` and this project the same
#      way (from a copy: nothing is written into the checkout) into $WORK/hr; nothing goes into the system;
#   2. runs scripts/gpu_smoke/smoke.py with those on PYTHONPATH: preflight, gpu_engine_check's engines (vanilla and
#      HeadRouter, tiny model, eager then FULL_DECODE_ONLY CUDA graphs, then per_head), and `headrouter-vllm bench`
#      on a dummy-weight real-width model, each stage in its own process, all under one deadline (7 min);
#   3. writes RESULTS/summary.json, RESULTS/smoke.log and RESULTS/gpu-smoke-results.tar.gz (every stage's JSON and
#      log, the bench tables): three files, as the device tool brings back at most eight.
# The stack is vLLM 0.32's Python on torch 2.11 without vLLM's compiled kernels: NOT the release stack (docs/gpu.md,
# "The GPU smoke kit"); never report its numbers as vLLM's or HeadRouter's performance.
#
# Usage (device tool: carry [".scratch/gpu_smoke/carry"], timeout_s 600):
#   bash scripts/gpu_smoke/run_on_gpu.sh [RESULTS]                  (default: $OUT, else $WORK/out)
#   PYTHON=<a Python 3.12 with torch> bash scripts/gpu_smoke/run_on_gpu.sh --cpu-rehearsal [RESULTS]
#       the same steps on a CPU machine, smoke.py --cpu-rehearsal instead of the GPU stages
# Environment: PYTHON (default python3), SMOKE_CARRY (default .scratch/gpu_smoke/carry), SMOKE_WORK (default
# /tmp/gpu_smoke), SMOKE_DEADLINE_S (default 420).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
CARRY=${SMOKE_CARRY:-.scratch/gpu_smoke/carry}
WORK=${SMOKE_WORK:-/tmp/gpu_smoke}
rehearsal=()
if [ "${1:-}" = "--cpu-rehearsal" ]; then rehearsal=(--cpu-rehearsal); shift; fi
RESULTS=${1:-${OUT:-$WORK/out}}
t0=$(date +%s)

for f in vllm-src.tar.gz manifest.json waves.npz; do
  [ -f "$CARRY/$f" ] || { echo "no carry set at $CARRY ($f missing): run scripts/gpu_smoke/build.py on a CPU machine" \
    "and pass carry [\".scratch/gpu_smoke/carry\"] to the device tool" >&2; exit 2; }
done
$PY -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else
  f"the carried wheels are cp312; {sys.executable} is Python {sys.version.split()[0]}")'
mkdir -p "$RESULTS"
rm -rf "$WORK/src" "$WORK/site" "$WORK/hr" "$WORK/hr-src" "$WORK/results"
mkdir -p "$WORK/src" "$WORK/site" "$WORK/hr" "$WORK/hr-src" "$WORK/results" "$WORK/cache"

echo "== unpack the carry set into $WORK"
tar -xzf "$CARRY/vllm-src.tar.gz" -C "$WORK/src"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" "$CARRY"/wheels/*.whl
cp -r setup.py README.md headrouter_vllm kernels benchmarks "$WORK/hr-src/"
rm -rf "$WORK/hr-src/benchmarks/results"  # not part of the package
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$WORK/hr" "$WORK/hr-src" >"$WORK/results/pip-headrouter.log" 2>&1 \
  || { cat "$WORK/results/pip-headrouter.log" >&2; exit 2; }
export PYTHONPATH="$WORK/hr:$WORK/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_CACHE_ROOT="$WORK/cache/vllm" TRITON_CACHE_DIR="$WORK/cache/triton" HF_HOME="$WORK/cache/hf" \
    TORCHINDUCTOR_CACHE_DIR="$WORK/cache/inductor" MPLCONFIGDIR="$WORK/cache/mpl" PYTHONUNBUFFERED=1
echo "   done in $(( $(date +%s) - t0 )) s; PYTHONPATH=$PYTHONPATH"

set +e
$PY scripts/gpu_smoke/smoke.py "${rehearsal[@]}" --out "$WORK/results" --waves "$CARRY/waves.npz" \
    --deadline-s "${SMOKE_DEADLINE_S:-420}" 2>&1 | tee "$WORK/results/smoke.log"
status=${PIPESTATUS[0]}
set -e
cp "$WORK/results/smoke.log" "$RESULTS/"
[ -f "$WORK/results/summary.json" ] && cp "$WORK/results/summary.json" "$RESULTS/"
cp "$CARRY/manifest.json" "$WORK/results/carry-manifest.json"
tar -czf "$RESULTS/gpu-smoke-results.tar.gz" -C "$WORK" results
echo "results in $RESULTS (exit $status, $(( $(date +%s) - t0 )) s in all)"
exit "$status"
