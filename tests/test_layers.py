"""The package's layering: importing it is light, heavy engines and Ray/MLflow only in their adapters."""

from __future__ import annotations
import json
import subprocess
import sys
import pytest


HEAVY = ["vllm", "deepspeed"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_qpo_ray_pulls_in_neither_vllm_nor_deepspeed():
    loaded = _modules_after("import qpo_ray")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize(
    "module",
    ["qpo_ray.config", "qpo_ray.cli", "qpo_ray.backends", "qpo_ray.tasks", "qpo_ray.data.schema"],
)
def test_core_modules_stay_light(module):
    loaded = _modules_after(f"import {module}")
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not heavy, f"{module} imported {heavy[:3]}"


def test_core_never_imports_ray_or_mlflow():
    loaded = _modules_after("import qpo_ray.tasks, qpo_ray.data.schema, qpo_ray.config")
    assert not [m for m in loaded if m.split(".")[0] in ("ray", "mlflow", *HEAVY)]
