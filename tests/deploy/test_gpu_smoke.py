"""scripts/gpu_smoke.sh --minimal on a machine without CUDA, with a Python that cannot
import Ray, vLLM or MLflow (as on a GPU box with only torch + transformers): it says
what it skipped and runs the CPU half (the random-weights embedded architecture, the
transformers target in float32, the policy's training steps and generation, the
device helper's decisions). The GPU half runs where CUDA is (tests marked gpu)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = '''import sys
for name in ("ray", "vllm", "mlflow"):
    sys.modules[name] = None  # `import name` fails, importlib.util.find_spec(name) is None
'''


def _smoke(tmp_path: Path, *args: str, cuda_hidden: bool = True) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="2")
    if cuda_hidden:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([str(REPO / "scripts" / "gpu_smoke.sh"), *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_minimal_smoke_runs_its_cpu_half_without_ray_vllm_mlflow(tmp_path):
    proc = _smoke(tmp_path, "--minimal")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for line in ["[smoke] OK   device decision: no CUDA: cpu",
                 "[smoke] SKIP compute capability / arch list: no CUDA device",
                 "[smoke] OK   embedded architecture with random weights",
                 "[smoke] OK   transformers target, CPU float32: label log-probs",
                 "[smoke] SKIP transformers target on the GPU (fp16, bf16): no CUDA device",
                 "[smoke] OK   policy training step, CPU, mixed_precision=no",
                 "[smoke] SKIP policy training step on the GPU (fp16, bf16): no CUDA device",
                 "[smoke] OK   policy generation, CPU",
                 "[smoke] DONE all checks"]:
        assert line in out, out[-5000:]
    assert "DeepSpeed ZeRO-2 step" in out  # run on the CPU, or skipped saying why


def test_full_smoke_without_ray_fails_saying_so(tmp_path):
    """The full mode needs Ray: without it, an ImportError names it (no silent pass)."""
    proc = _smoke(tmp_path)
    assert proc.returncode != 0
    assert "ray" in proc.stderr


@pytest.mark.gpu
def test_full_smoke_on_a_gpu(tmp_path):
    proc = subprocess.run([str(REPO / "scripts" / "gpu_smoke.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0 and "[smoke] DONE all checks" in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.gpu
def test_minimal_smoke_on_a_gpu(tmp_path):
    proc = _smoke(tmp_path, "--minimal", cuda_hidden=False)
    print(proc.stdout)
    assert proc.returncode == 0 and "[smoke] OK   transformers target, GPU float16" in \
        proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
