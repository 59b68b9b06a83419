"""Session-wide fixtures: one Ray cluster, one converted model, the shared real data.

Heavier shared fixtures (the vLLM engine, a trained tiny policy) live here too so that a
whole test session builds each of them once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# CI and every checkout have shared/ beside the project root.
SHARED_DATA = Path(os.environ.get("QPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Two cores here: keep torch from spawning a thread per core in every process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always importable here
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set QPO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct converted to an HF checkpoint (cached)."""
    from qpo_ray.models import provision_embedded

    return provision_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()
