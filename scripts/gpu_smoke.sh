#!/usr/bin/env bash
# GPU smoke checks, printing each check as it passes (scripts/gpu_smoke.py says which).
#   scripts/gpu_smoke.sh            full install: vLLM in a Ray actor, Ray Train DDP and
#                                   ZeRO-2 steps, the policy on a GPU Serve replica
#   scripts/gpu_smoke.sh --minimal  only torch (CUDA) + transformers, no network: target
#                                   fp16/bf16 vs CPU float32, policy steps and generation
# Bounded to 8 minutes; without CUDA it says what it skipped and runs the CPU half.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | sed 's/^/[smoke] INFO nvidia-smi: /' || true
exec timeout 480 "$PY" scripts/gpu_smoke.py "$@"
