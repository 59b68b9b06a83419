"""Session-wide fixtures: one Ray cluster, one converted model, the shared real data.

Heavier shared fixtures (the vLLM engine, a trained tiny policy) live here too so that a
whole test session builds each of them once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tiny_run import REPO, TINY, qpo_cli, qpo_env

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
    # Too slow for CI's budget (tests/test_loop.py says why): only when asked for by name.
    if "crash_mid_stage" not in (config.option.markexpr or ""):
        skip_slow = pytest.mark.skip(reason="select with -m crash_mid_stage (minutes)")
        for item in items:
            if "crash_mid_stage" in item.keywords:
                item.add_marker(skip_slow)
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set QPO_SHARED_DATA, or fetch "
                    "it: python scripts/fetch_test_data.py)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct converted to an HF checkpoint (cached)."""
    from qpo_ray.common.models import provision_embedded

    return provision_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir) -> list[str]:
    """Overrides for a 1-layer policy on the embedded model with no query summary: the
    cpu-demo profile's summary reads 16 more layers, which tests of serving and run
    directories do not need."""
    return [f"policy.backbone={tiny_model_dir}", "policy.backbone_num_layers=1",
            "policy.query_summary.enable=false", "training.summary.epochs=0"]


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


@pytest.fixture(scope="session")
def vllm_actor(ray_cluster, tiny_model_dir):
    """The session's one vLLM CPU engine on the tiny model, inside a Ray actor (where the
    evaluation pipeline runs it too). num_cpus=0 so that it does not starve the Ray
    Data pools of the 2-CPU test cluster."""
    from qpo_ray.backends.vllm_backend import VLLMBackend
    from qpo_ray.config import TargetConfig

    cfg = TargetConfig(backend="vllm", model=str(tiny_model_dir), dtype="float32",
                       max_model_len_tokens=512, cpu_kvcache_space_gib=1)
    # On a GPU machine the engine asks Ray for a GPU share: a zero-GPU actor decides CPU
    # (qpo_ray.common.device reads Ray's assignment).
    actor = ray_cluster.remote(num_cpus=0, num_gpus=0.3 if has_gpu() else 0)(
        VLLMBackend).remote(cfg)
    yield actor
    ray_cluster.get(actor.close.remote())
    ray_cluster.kill(actor)


@pytest.fixture(scope="session")
def tweet_emotion_task(shared_data):
    """The real 4-label tweet_emotion task read from the shared data."""
    from qpo_ray.config import TaskConfig
    from qpo_ray.tasks import get_task

    return get_task(TaskConfig(name="tweet_emotion", data_dir=str(shared_data / "tweet_emotion")))


@pytest.fixture(scope="session")
def tweet_pairs(tweet_emotion_task):
    """24 zero-shot (query, prompt) pairs in PAIR_COLUMNS: 8 train queries x 3 prompts."""
    import pandas as pd

    prompts = ["Classify the emotion of the tweet.",
               "What emotion does this tweet express: anger, joy, optimism or sadness?",
               ""]
    queries = tweet_emotion_task.load_split("train")[:8]
    rows = [{"pair_id": f"p{qi}-{pi}", "query_id": q.id, "query": q.text,
             "prompt_id": f"m{pi}", "prompt": p, "source": "manual", "label": str(q.label),
             "group": 0, "loop": 0, "seed": 0, "demo_ids": []}
            for qi, q in enumerate(queries) for pi, p in enumerate(prompts)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: one per test module (a Serve instance binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process model tests on the 2 shared cores: spinning OpenMP threads cost up to
    10x when Ray actors run beside them. Restored afterwards for the rest of the session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tiny QPO run (tests/tiny_run.py), once per session: the run's own tests and the
# test phase's read it.
@pytest.fixture(scope="session")
def profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="session")
def finished_run(profile, tmp_path_factory) -> tuple[Path, str, str]:
    """One uninterrupted `qpo run` (the README's main command) on the tiny profile."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run(qpo_cli("run", "--profile", str(profile), "--workdir", str(workdir)),
                          env=qpo_env(), cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return workdir, proc.stdout, proc.stderr
