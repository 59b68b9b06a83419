"""The Ray job entry points: exit codes, and a real `ray start --head` cluster on
127.0.0.1 running `jobs/augment_round.py` through `ray job submit`."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from qpo_ray.data.io import read_dataset, write_dataset
from tests.deploy.ray_nodes import free_ports

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # RAY_AUTH_MODE=disabled for the head and the CLI alike: the private cluster listens
    # on 127.0.0.1 only, and Ray 2.60's `ray start` otherwise enables token auth that the
    # job CLI (default mode "disabled") does not send.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def test_job_exits_2_on_a_config_error():
    proc = subprocess.run([sys.executable, "jobs/qpo_loop.py", "--profile", "cpu-demo",
                           "--set", "loop.num_loops=0"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loop.num_loops" in proc.stderr


@pytest.mark.parametrize("command", [["jobs/augment_round.py"], ["-m", "qpo_ray.cli", "augment"]],
                         ids=["job", "qpo"])
def test_job_and_qpo_exit_2_on_a_missing_input(tmp_path, command):
    """The job and the `qpo` subcommand share arguments and exit-code policy."""
    proc = subprocess.run([sys.executable, *command, "--profile", "cpu-demo",
                           "--policy", str(tmp_path / "nope"),
                           "--dataset", str(tmp_path / "missing.parquet"), "--round", "1",
                           "--out", str(tmp_path / "out.parquet")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "missing.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with its own temp dir and ports, for the module's tests;
    stopped by killing the process group this fixture started (never `ray stop`: other
    clusters share the host)."""
    temp_dir = tempfile.mkdtemp(prefix="qrj", dir="/tmp")  # short: socket paths are capped
    (gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics,
     rtenv) = free_ports(9)
    # Worker ports below the kernel's ephemeral range, where the ports above come from.
    worker_lo = random.randrange(20000, 30000, 100)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--ray-client-server-port", str(client),
         "--node-manager-port", str(nm), "--object-manager-port", str(om),
         "--dashboard-agent-listen-port", str(agent_listen),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(rtenv), "--min-worker-port", str(worker_lo),
         "--max-worker-port", str(worker_lo + 40), "--num-cpus", "2", "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        env=_env(), stdout=open(Path(temp_dir) / "head.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                   env=_env(), capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray head did not start:\n" + (Path(temp_dir) / "head.log").read_text())
            time.sleep(2)
        yield address
    finally:
        _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of `proc` (started by this test), then SIGKILL to
    whatever of the group is still there (raylet, GCS, dashboard)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_augment_round_job_on_a_ray_head(ray_head, shared_data, tiny_model_dir, tmp_path):
    """One augmentation round of the paper's own Tweet Emotion dataset (few-shot, with its
    reward scale), submitted as a Ray job with the repository as working dir."""
    from qpo_ray.config import PolicyConfig
    from qpo_ray.data.importer import import_paper_json
    from qpo_ray.policy import QPOPolicy

    frame, scale = import_paper_json(
        str(shared_data / "qpo_offline" / "tweet_emotion_llama7b_few_shot_expert.json"))
    dataset = write_dataset(frame, tmp_path / "d1.parquet", scale)
    policy_cfg = PolicyConfig(backbone=str(tiny_model_dir), backbone_num_layers=1,
                              max_query_tokens=24, max_prompt_tokens=8)
    policy_dir = QPOPolicy.from_backbone(policy_cfg).save(tmp_path / "policy")
    profile = tmp_path / "job.yaml"
    profile.write_text(yaml.safe_dump({
        "seed": 1,
        "task": {"name": "tweet_emotion", "data_dir": str(shared_data / "tweet_emotion"),
                 "num_shots": 1, "num_demo_sets": 1},
        "target": {"backend": "transformers", "model": str(tiny_model_dir), "batch_size": 8},
        "evaluation": {"num_actors": 1, "batch_size_pairs": 8},
        "loop": {"augment_queries_per_round": 6},
    }))
    out = tmp_path / "d2.parquet"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
         "--", "python", "jobs/augment_round.py", "--profile", str(profile),
         "--policy", str(policy_dir), "--dataset", str(dataset), "--round", "1",
         "--out", str(out)],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]

    merged, merged_scale = read_dataset(out)
    rows, _ = read_dataset(tmp_path / "d2.rows.parquet")
    assert merged_scale == scale
    assert len(rows) == 6 and (rows["loop"] == 1).all()
    assert all(len(ids) == 1 and len(ids[0]) == 1 for ids in rows["demo_ids"])
    # Empty prompts are scored but never merged (the next training set refuses them).
    kept = rows[(rows["reward"] >= 66.7) & rows["prompt"].str.strip().ne("")]
    assert len(merged) == len(frame) + len(kept)
    assert merged["prompt"].iloc[len(frame):].str.strip().ne("").all()


def test_serve_deploy_of_the_repository_config(ray_head, tiny_model_dir, tmp_path):
    """`serve deploy` of serve/config.yaml itself (only the port, the policy and the
    target switched off for the tiny model): the app answers /v1/prompt over HTTP."""
    import httpx

    from qpo_ray.config import PolicyConfig
    from qpo_ray.policy import QPOPolicy

    policy_dir = QPOPolicy.from_backbone(PolicyConfig(
        backbone=str(tiny_model_dir), backbone_num_layers=1, max_query_tokens=16,
        max_prompt_tokens=6)).save(tmp_path / "policy")
    doc = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (port,) = free_ports(1)
    doc["http_options"]["port"] = port
    (app,) = doc["applications"]
    app["args"].update(policy_uri=str(policy_dir), with_target=False,
                       overrides=["serve.num_cpus_per_replica=0.5"])
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    serve_cli = [str(BIN / "serve")]
    # from another directory: the import path must resolve from the installed library
    deploy = subprocess.run(serve_cli + ["deploy", str(config), "--address", ray_head],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                reply = httpx.post(f"{url}/v1/prompt", json={"query": "a gripping film"},
                                   timeout=60)
                if reply.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                status = subprocess.run(serve_cli + ["status", "--address", ray_head],
                                        env=_env(), capture_output=True, text=True)
                pytest.fail(f"served app never answered:\n{status.stdout}{status.stderr}")
            time.sleep(2)
        body = reply.json()
        assert isinstance(body["prompt"], str)
        assert body["policy_version"] == httpx.get(f"{url}/v1/version").json()["policy_version"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.post(f"{url}/v1/prompt", json={"query": ""}).status_code == 422

        # The documented in-place swap: the same config plus a PolicyServer user_config.
        second = QPOPolicy.from_backbone(PolicyConfig(
            backbone=str(tiny_model_dir), backbone_num_layers=1, max_query_tokens=16,
            max_prompt_tokens=6)).save(tmp_path / "policy-2")
        doc["applications"][0]["deployments"] = [
            {"name": "PolicyServer", "user_config": {"policy_uri": str(second)}}]
        config.write_text(yaml.safe_dump(doc))
        deploy = subprocess.run(serve_cli + ["deploy", str(config), "--address", ray_head],
                                cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/v1/version").json()["policy_version"] != str(second):
            assert httpx.post(f"{url}/v1/prompt", json={"query": "a film"},
                              timeout=60).status_code == 200
            assert time.monotonic() < deadline, "the new policy_uri was never picked up"
            time.sleep(1)
    finally:
        subprocess.run(serve_cli + ["shutdown", "-y", "--address", ray_head], env=_env(),
                       capture_output=True, timeout=120)


def test_a_job_script_copied_alone_runs(tmp_path):
    """`ray submit CLUSTER jobs/qpo_loop.py` copies only the script (to ~): it used to
    fail on `import _common`; it runs where qpo_ray is installed (here: on PYTHONPATH)."""
    script = tmp_path / "qpo_loop.py"
    shutil.copy(REPO / "jobs" / "qpo_loop.py", script)
    proc = subprocess.run([sys.executable, str(script), "--profile", "cpu-demo",
                           "--set", "loop.num_loops=0"], cwd=tmp_path,
                          env={**_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loop.num_loops" in proc.stderr and "Traceback" not in proc.stderr
