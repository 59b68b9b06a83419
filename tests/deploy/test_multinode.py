"""A two-node Ray cluster on this machine (tests/deploy/ray_nodes.py): the head holds no
CPU, like a real head node; the second node declares a custom resource that the run's
scoring actors and training worker ask for. The tiny `qpo run` goes in with `ray job
submit --working-dir .`, tracks to a real `mlflow server`, and ends with the same
datasets and report predictions as the single-node run of the same seed. A third node
that sees another filesystem where the run directory is makes the next run refuse
before any work."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from qpo_ray.data.io import read_dataset
from qpo_ray.run.rundir import RunDir
from tests.deploy.ray_nodes import RayCluster, tmpfs_over
from tests.mlflow_server import MlflowServer
from tests.tiny_run import TINY

REPO = Path(__file__).resolve().parents[2]
RESOURCE = "qpo_worker"

# test_loop's tiny run (two loops: the second node loads loop 1's checkpoint in loop 2),
# compared with conftest's `finished_run` of the same profile on one node.
ON_WORKER = {"evaluation": {"resources": {RESOURCE: 1}},
             "training": {"resources": {RESOURCE: 1}}}


def _profile(path: Path, extra: dict) -> Path:
    doc = copy.deepcopy(TINY)
    for section, values in extra.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def cluster():
    cluster = RayCluster()
    try:
        cluster.worker_id = cluster.add_node(num_cpus=2, resources={RESOURCE: 4})
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.url
    finally:
        server.stop()


def _qpo_run(profile: Path, workdir: Path, tracking_uri: str) -> list[str]:
    return ["python", "-m", "qpo_ray.cli", "run", "--profile", str(profile),
            "--workdir", str(workdir), "--tracking-uri", tracking_uri]


@pytest.mark.timeout(2400)
def test_two_node_run_places_work_by_resource_and_matches_the_single_node_run(
        finished_run, cluster, mlflow_url, tmp_path):
    head = [n for n in cluster.alive_nodes() if n["node_id"] != cluster.worker_id]
    assert len(head) == 1 and head[0]["resources_total"].get("CPU", 0) == 0
    workdir = tmp_path / "run"
    proc = cluster.submit(_qpo_run(_profile(tmp_path / "tiny.yaml", ON_WORKER), workdir,
                                   mlflow_url), REPO)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, \
        proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "[qpo] all 2 Ray nodes see the run directory" in proc.stdout

    # The engines and the training worker ran on the node with the resource.
    placed = {}
    for actor in cluster.actors():
        for kind in ("_ScoringActor", "TrainWorker"):
            if kind in actor["class_name"]:
                placed.setdefault(kind, set()).add(actor["node_id"])
    assert placed == {"_ScoringActor": {cluster.worker_id}, "TrainWorker": {cluster.worker_id}}

    # The same data and the same report as one node with the same seed.
    single_dir = finished_run[0]
    single, multi = RunDir(single_dir), RunDir(workdir)
    assert list(multi.stages()) == list(single.stages())
    for path in (single.step0_path(), single.dataset_path(1), single.dataset_path(2)):
        expected, expected_scale = read_dataset(path)
        got, got_scale = read_dataset(workdir / path.relative_to(single_dir))
        assert got_scale == expected_scale
        pd.testing.assert_frame_equal(got, expected)
    for name, read in (("predictions.parquet", pd.read_parquet), ("results.csv", pd.read_csv)):
        got = read(workdir / "report" / name)
        assert {"qpo", "qpo_greedy", "manual", "router"} <= set(got["method"])
        pd.testing.assert_frame_equal(_same_order(got), _same_order(
            read(single_dir / "report" / name), methods=set(got["method"])))

    # MLflow: the server holds the run and both loops' policies (its artifact store).
    api = f"{mlflow_url}/api/2.0/mlflow"
    versions = httpx.get(f"{api}/model-versions/search", timeout=30,
                          params={"filter": "name='qpo-policy'"}).json()["model_versions"]
    assert sorted(int(v["version"]) for v in versions) == [1, 2]


def _same_order(frame: pd.DataFrame, methods: set[str] | None = None) -> pd.DataFrame:
    """A report's rows of `methods` in one order: other tests add methods to the
    single-node run's report (`qpo evaluate --add`), which keeps each method's rows."""
    if methods is not None:
        frame = frame[frame["method"].isin(methods)]
    keys = [c for c in ("method", "split", "query_id") if c in frame.columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def test_a_node_that_sees_another_filesystem_makes_the_run_refuse_before_work(
        cluster, mlflow_url, tmp_path):
    shared = tmp_path / "shared"
    wrap = tmpfs_over(shared)
    if wrap is None:
        pytest.skip("no mount namespaces here (unshare -m)")
    blind = cluster.add_node(num_cpus=1, resources={"blind": 1}, wrap=wrap)
    workdir = shared / "run"
    proc = cluster.submit(_qpo_run(_profile(tmp_path / "tiny.yaml", ON_WORKER), workdir,
                                   mlflow_url), REPO, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert f"error: workdir {workdir}: not every Ray node sees the run directory" in out
    assert f"(id {blind[:12]})" in out and "Mount shared storage" in out
    assert "[qpo] stage step0" not in out  # refused before any work
    assert not (workdir / "dataset_loop0.parquet").exists()
