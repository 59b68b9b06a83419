"""cluster/ and serve/config.yaml: every YAML parses, has the shape its tool expects, and
names only things that exist here (repository files, profiles, import paths, job flags)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from qpo_ray.config import load_config, profile_path
from qpo_ray.run.commands import command_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = sorted((REPO / "cluster").rglob("*.yaml"))
ALL_YAMLS = CLUSTER_YAMLS + [REPO / "serve" / "config.yaml"]
# Inside the image (cluster/docker/Dockerfile) the repository lives at /app.
REPO_PATH = re.compile(r"(?:/app/)?\b((?:jobs|serve|cluster|qpo_ray|scripts|benchmarks)/[\w./-]*\w)")


def load(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path}: one mapping expected"
    return docs[0]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def by_kind(kind: str) -> list[Path]:
    return [p for p in CLUSTER_YAMLS if load(p).get("kind") == kind]


def launcher_yamls() -> list[Path]:
    return [p for p in CLUSTER_YAMLS if "provider" in load(p)]


def test_the_expected_configs_exist():
    assert len(launcher_yamls()) >= 2  # one V100 node, one multi-node GPU cluster
    assert by_kind("RayJob") and by_kind("RayService")
    assert (REPO / "cluster" / "README.md").exists()


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_named_exists(path):
    named = {m.group(1) for s in strings(load(path)) for m in REPO_PATH.finditer(s)}
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{path.name} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("path", launcher_yamls(), ids=lambda p: p.name)
def test_cluster_launcher_shape(path):
    cfg = load(path)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands"):
        assert key in cfg, f"{path.name}: missing {key}"
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    for name, node in nodes.items():
        assert node["min_workers"] <= node["max_workers"] <= cfg["max_workers"] or (
            name == cfg["head_node_type"]), f"{path.name}: {name} worker bounds"
        assert "InstanceType" in node["node_config"]
    for remote, local in cfg.get("file_mounts", {}).items():
        assert (REPO / local).exists(), f"{path.name}: file_mounts source {local} missing"
    # Ray binds its dashboard to loopback; the cluster is reached through `ray attach`.
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts


def test_single_v100_node_uses_a_v100_instance():
    (path,) = [p for p in launcher_yamls() if load(p)["max_workers"] == 0]
    head = load(path)["available_node_types"][load(path)["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "p3.2xlarge"  # 1x V100 (see README)


@pytest.mark.parametrize("path", by_kind("RayJob"), ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_a_job_script_with_a_valid_config(path):
    spec = load(path)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    script = REPO / REPO_PATH.match(argv[1]).group(1)
    assert script.parent.name == "jobs" and script.exists()
    # The flags go through the jobs' own parser and into a real Config.
    args = command_parser("run", argparse.ArgumentParser()).parse_args(argv[2:])
    cfg = config_from_args(args)
    assert profile_path(args.profile).exists() and cfg.workdir == args.workdir
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    # An MLflow server, not a SQLite file written by the job and the service at once
    # (and, with no artifact store, artifacts in the head pod's ./mlruns).
    assert cfg.tracking_uri().startswith("http://"), cfg.tracking_uri()


def test_serve_config_and_rayservice_are_valid_serve_configs():
    from ray.serve.schema import ServeDeploySchema

    local = load(REPO / "serve" / "config.yaml")
    ServeDeploySchema.model_validate(local)
    for path in by_kind("RayService"):
        spec = load(path)["spec"]
        service = yaml.safe_load(spec["serveConfigV2"])
        ServeDeploySchema.model_validate(service)
        assert spec["rayClusterConfig"]["rayVersion"] == "2.60.0"
        assert [a["import_path"] for a in service["applications"]] == \
               [a["import_path"] for a in local["applications"]]


@pytest.mark.parametrize("path", [REPO / "serve" / "config.yaml"] + by_kind("RayService"),
                         ids=lambda p: p.name)
def test_serve_applications_build_from_their_args(path, monkeypatch):
    """The import path resolves and the builder accepts the args (profile, overrides)."""
    from ray.serve import Application

    doc = load(path)
    apps = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"] if "spec" in doc \
        else doc["applications"]
    monkeypatch.syspath_prepend(str(REPO))
    # As the pods have it (from the secret): an app on a non-loopback host needs it.
    monkeypatch.setenv("QPO_SERVE_TOKEN", "token-from-the-secret")
    for app in apps:
        module_name, attr = app["import_path"].split(":")
        module = importlib.import_module(module_name)
        built = getattr(module, attr)(app.get("args", {}))
        assert isinstance(built, Application)
        load_config(app["args"]["profile"], app["args"].get("overrides", []))


def test_rayservice_refuses_to_deploy_without_its_token(monkeypatch):
    """The RayService proxy listens on the pod network: without the token in the pods'
    environment the app builder fails closed instead of serving everyone."""
    from qpo_ray.config import ConfigError
    from qpo_ray.serving import app_from_args

    doc = load(REPO / "cluster" / "kuberay" / "rayservice-qpo.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert "serve.host=0.0.0.0" in app["args"]["overrides"]
    monkeypatch.delenv("QPO_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="insecure"):
        app_from_args(app["args"])
    for container in [c for spec in _pod_specs(doc) for c in spec["containers"]]:
        names = {e["name"] for e in container.get("env", [])}
        assert "QPO_SERVE_TOKEN" in names, container["name"]


def _pod_specs(doc) -> list[dict]:
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    return [g["template"]["spec"] for g in groups]


def test_mlflow_servers_in_cluster_configs_are_not_open():
    """No tracking server on 0.0.0.0, and each one with MLflow's basic auth: whoever
    can register a version decides what Serve loads."""
    commands = [s for path in launcher_yamls() for s in strings(load(path))
                if "mlflow server" in s]
    assert commands, "the multi-node launcher starts an MLflow server"
    for command in commands:
        assert "0.0.0.0" not in command
        assert "--app-name basic-auth" in command


def test_app_builder_rejects_unknown_args():
    from qpo_ray.serving import app_from_args

    with pytest.raises(ValueError, match="policy_url"):
        app_from_args({"profile": "cpu-demo", "policy_url": "x"})


def test_dockerfile_copies_only_existing_paths():
    dockerfile = (REPO / "cluster" / "docker" / "Dockerfile").read_text()
    sources = [arg for line in dockerfile.splitlines() if line.startswith("COPY")
               for arg in [a for a in line.split()[1:] if not a.startswith("--")][:-1]]
    assert "qpo_ray" in sources and "serve" in sources and "jobs" in sources
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "FROM rayproject/ray:2.60.0" in dockerfile


def _items(path: Path) -> list[dict]:
    doc = load(path)
    return doc["items"] if doc.get("kind") == "List" else [doc]


def _all_items() -> list[dict]:
    return [item for path in CLUSTER_YAMLS for item in _items(path)]


def _rule_ports(rule: dict) -> set:
    return {p["port"] for p in rule.get("ports", [])}


def test_open_dashboards_have_a_network_policy():
    """dashboard-host 0.0.0.0 (the KubeRay head): a NetworkPolicy selects the head pods and
    admits the job API (8265) and the Ray ports only from named pods, never from all."""
    open_heads = [path for path in by_kind("RayJob") + by_kind("RayService")
                  if str(_head_params(load(path)).get("dashboard-host")) == "0.0.0.0"]
    assert open_heads
    policies = [i for i in _all_items() if i.get("kind") == "NetworkPolicy"
                and i["spec"]["podSelector"].get("matchLabels") == {"ray.io/node-type": "head"}]
    assert len(policies) == 1, "a NetworkPolicy for the Ray head pods"
    (policy,) = policies
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        ports = _rule_ports(rule)
        if not rule.get("from"):  # open to all: only the Serve port (token-protected)
            assert ports == {8000}, rule
        else:
            assert all(peer.get("podSelector") for peer in rule["from"]), rule
    # The RayJob's submitter reaches the job API.
    (job,) = by_kind("RayJob")
    submitter = {"batch.kubernetes.io/job-name": load(job)["metadata"]["name"]}
    assert any(peer["podSelector"].get("matchLabels") == submitter and 8265 in _rule_ports(rule)
               for rule in policy["spec"]["ingress"] for peer in rule.get("from", []))


def _head_params(doc: dict) -> dict:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    return cluster["headGroupSpec"]["rayStartParams"]


def test_kubernetes_tracking_goes_to_the_mlflow_server_manifest():
    """The RayJob and the RayService track to the MLflow server's Service (it serves the
    artifacts the replicas load), which has basic auth and a policy of its own."""
    items = _all_items()
    (service,) = [i for i in items if i.get("kind") == "Service" and i["metadata"]["name"] ==
                  "qpo-mlflow"]
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    (deployment,) = [i for i in items if i.get("kind") == "Deployment"]
    command = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--serve-artifacts" in command and "--app-name basic-auth" in command
    assert deployment["spec"]["replicas"] == 1  # the one writer of its SQLite store
    assert any(i.get("kind") == "NetworkPolicy" and i["spec"]["podSelector"]["matchLabels"] ==
               deployment["spec"]["selector"]["matchLabels"] for i in items)
    assert load_config("cluster").tracking.uri == url
    (job,) = by_kind("RayJob")
    assert f"--tracking-uri {url}" in load(job)["spec"]["entrypoint"]
    for path in by_kind("RayService"):
        (app,) = yaml.safe_load(load(path)["spec"]["serveConfigV2"])["applications"]
        assert f"tracking.uri={url}" in app["args"]["overrides"]
    for path in by_kind("RayJob") + by_kind("RayService"):
        for spec in _pod_specs(load(path)) if "rayClusterConfig" in load(path)["spec"] \
                else _job_pod_specs(load(path)):
            for container in spec["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names


def _job_pod_specs(doc) -> list[dict]:
    cluster = doc["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    return [g["template"]["spec"] for g in groups]


def test_rayservice_rolls_whole_gpu_deployments_without_surge():
    """With no autoscaler, a surge replica of a deployment holding a whole GPU waits for a
    GPU that never frees, and the rolling update never finishes."""
    for path in by_kind("RayService"):
        doc = load(path)
        cluster = doc["spec"]["rayClusterConfig"]
        if cluster.get("enableInTreeAutoscaling"):
            continue
        (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        surge = {d["name"]: d.get("max_surge_percent") for d in app.get("deployments", [])}
        cfg = load_config(app["args"]["profile"], app["args"]["overrides"])
        gpus = {"TargetServer": cfg.evaluation.num_gpus_per_actor,
                "PolicyServer": cfg.serve.num_gpus_per_replica}
        assert gpus["TargetServer"] >= 1  # what makes the check matter here
        for name, per_replica in gpus.items():
            if per_replica >= 1:
                assert surge.get(name) == 0, f"{path.name}: {name} needs max_surge_percent: 0"


def test_serve_deployment_names_in_configs_are_the_apps():
    from qpo_ray.serving.deployments import PolicyServer
    from qpo_ray.serving.target_server import TargetServer

    names = {PolicyServer.name, TargetServer.name}
    for path in by_kind("RayService"):
        (app,) = yaml.safe_load(load(path)["spec"]["serveConfigV2"])["applications"]
        assert {d["name"] for d in app.get("deployments", [])} <= names


def test_cluster_readme_and_launchers_run_jobs_from_the_repository():
    """`ray submit CLUSTER jobs/x.py` copies the script alone, to the home directory:
    the docs run jobs from the repository (ray job submit --working-dir . / ray exec)."""
    texts = [(REPO / "cluster" / "README.md").read_text()]
    texts += [(p.read_text()) for p in launcher_yamls()]
    for text in texts:
        assert not re.search(r"^[\s#]*ray submit \S+ jobs/", text, re.M)
    readme = texts[0]
    assert "ray rsync-down cluster/aws/v100-single.yaml '~/qpo-ray/runs/v100'" in readme
    assert "cd ~/qpo-ray && python jobs/qpo_loop.py --profile v100" in readme


def test_v100_launcher_takes_the_volta_install_path():
    (path,) = [p for p in launcher_yamls() if load(p)["max_workers"] == 0]
    setup = " ".join(load(path)["setup_commands"])
    assert "download.pytorch.org/whl/cu126" in setup and "vllm" not in setup
    assert "QPO_GPU=volta" in (REPO / "scripts" / "setup.sh").read_text()
    cfg = load_config("v100")
    assert cfg.target.backend == "transformers" and cfg.target.dtype == "float16"
