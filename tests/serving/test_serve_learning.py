"""Serving that learns, on a real Serve on 127.0.0.1 deployed from a Serve config the way
`serve deploy serve/config.yaml` does it (so a user_config change applies in place):
the prompt cache, an A/B split between two policy versions, feedback that survives a
replica being killed, and its turn into dataset rows that training reads.

One Serve instance and one fitted 1-layer policy (three directories = three versions).
"""

from __future__ import annotations

import math
import shutil
import time

import httpx
import pytest
import yaml

from qpo_ray.config import load_config
from tests.serving.test_serve import QUERIES, fit_policy

MAX_QUERY_CHARS = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_policy, free_port):
    root = tmp_path_factory.mktemp("serve-learning")
    cfg = load_config("cpu-demo", [
        f"workdir={root / 'run'}",
        *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=12",
        f"serve.port={free_port}", f"serve.max_query_chars={MAX_QUERY_CHARS}",
        "serve.num_cpus_per_replica=0.25", "serve.prompt_cache_entries=64",
    ])
    policy = fit_policy(cfg, {100.0: "Classify the sentiment of this movie review."},
                        root / "a")
    for arm in ("b", "c"):  # the same weights under other versions (their paths)
        shutil.copytree(root / "a", root / arm)
    cfg.serve.ab_policy_uri, cfg.serve.ab_traffic_percent = str(root / "b"), 50.0
    profile = root / "profile.yaml"
    profile.write_text(yaml.safe_dump(cfg.to_dict()))
    return cfg, policy, root, profile


def deploy(cfg, profile, policy_uri, user_config=None) -> None:
    """What `serve deploy` sends the controller (a Serve config); `user_config`, under
    the application's `deployments`, is the no-restart switch."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from qpo_ray.serving import APP_NAME

    app = {"name": APP_NAME, "route_prefix": "/", "import_path": "qpo_ray.serving:app_from_args",
           "args": {"profile": str(profile), "policy_uri": str(policy_uri), "with_target": False}}
    if user_config:
        app["deployments"] = [{"name": "PolicyServer", "user_config": user_config}]
    schema = ServeDeploySchema(http_options={"host": cfg.serve.host, "port": cfg.serve.port},
                               applications=[app])
    # Not deploy_apps(_blocking=True): its fixed 60 s is too short on a busy 2-core machine.
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + 600
    while (status := serve.status().applications.get(APP_NAME)) is None or \
            status.status != "RUNNING":
        assert status is None or status.status != "DEPLOY_FAILED", status.message
        assert time.monotonic() < deadline, f"{APP_NAME} not running: {status}"
        time.sleep(1)


@pytest.fixture(scope="module")
def server(ray_cluster, setup):
    from ray import serve

    cfg, _policy, root, profile = setup
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    deploy(cfg, profile, root / "a")
    with httpx.Client(base_url=f"http://{cfg.serve.host}:{cfg.serve.port}", timeout=120) as client:
        yield client
    serve.shutdown()


def ask(server, query: str, **extra) -> dict:
    response = server.post("/v1/prompt", json={"query": query, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def give(server, served: dict, **outcome) -> httpx.Response:
    """Feedback on a served request, with the receipt its response carried."""
    return server.post("/v1/feedback", json={"request_id": served["request_id"],
                                             "receipt": served["receipt"], **outcome})


def key_in(server, arm: str) -> str:
    """A client key the split sends to `arm`."""
    return next(f"user-{i}" for i in range(100)
                if ask(server, QUERIES[1], client_key=f"user-{i}")["arm"] == arm)


def test_cache_hit_returns_the_cached_prompt_without_a_policy_call(server, setup):
    from qpo_ray.policy import generate_prompts

    _cfg, policy, root, _profile = setup
    first = ask(server, QUERIES[0], client_key="cache-user")
    before = server.get("/v1/version").json()["cache"]
    # Whitespace and Unicode form are normalised for the key and for the policy alike.
    again = ask(server, "  " + QUERIES[0].replace(" ", "\n  ") + " ", client_key="cache-user")
    after = server.get("/v1/version").json()["cache"]
    assert first["cached"] is False and again["cached"] is True
    assert again["prompt"] == first["prompt"] == generate_prompts(policy, [QUERIES[0]])[0]
    assert again["prompt"]  # the fitted policy writes a real prompt, not just EOS
    assert again["policy_version"] == first["policy_version"]
    assert again["request_id"] != first["request_id"]
    assert after["hits"] == before["hits"] + 1
    assert after["policy_prompts"] == before["policy_prompts"]  # the policy was skipped
    # Another target reward is another key: a miss that reaches the policy.
    ask(server, QUERIES[0], client_key="cache-user", target_reward=50)
    assert server.get("/v1/version").json()["cache"]["policy_prompts"] == \
        after["policy_prompts"] + 1


def test_a_50_50_split_serves_both_versions_and_a_key_sticks_to_one(server, setup):
    _cfg, _policy, root, _profile = setup
    version = {"a": str(root / "a"), "b": str(root / "b")}
    keyed = [ask(server, QUERIES[1], client_key=f"user-{i}") for i in range(60)]
    for body in keyed:
        assert body["policy_version"] == version[body["arm"]]
    share_b = sum(body["arm"] == "b" for body in keyed)
    assert 15 <= share_b <= 45, share_b  # Binomial(60, 0.5): 4 standard deviations
    unkeyed = {ask(server, QUERIES[1])["arm"] for _ in range(30)}
    assert unkeyed == {"a", "b"}
    sticky = {ask(server, f"review number {i}", client_key="sticky-user")["policy_version"]
              for i in range(8)}
    assert len(sticky) == 1


BAD_FEEDBACK = [
    # (case, body, status, field)
    ("no outcome", {}, 422, "correct"),
    ("correct a string", {"correct": "yes"}, 422, "correct"),
    ("reward above 100", {"reward": 101}, 422, "reward"),
    ("reward NaN", {"reward": float("nan")}, 422, "reward"),
    ("label not a label word", {"correct": True, "label": "meh"}, 422, "label"),
    ("unknown field", {"correct": True, "score": 1}, 422, "score"),
]


def test_feedback_is_recorded_and_bad_feedback_is_a_4xx(server):
    # Keyed to arm a: an unkeyed request lands on a random arm, and the report test
    # below counts the queries with feedback under both arms.
    served = ask(server, QUERIES[0], client_key=key_in(server, "a"))
    rid = served["request_id"]
    for case, extra, status, field in BAD_FEEDBACK:
        response = server.post("/v1/feedback", content=_json({"request_id": rid,
                                                              "receipt": served["receipt"],
                                                              **extra}),
                               headers={"content-type": "application/json"})
        assert response.status_code == status, (case, response.text)
        assert [e["field"] for e in response.json()["errors"]] == [field], case
    # An id without the receipt the server issued for it is refused (forged feedback).
    for forged in ({"request_id": "0" * 32, "correct": True},
                   {"request_id": rid, "correct": True},
                   {"request_id": rid, "receipt": "0" * 64, "correct": True}):
        refused = server.post("/v1/feedback", json=forged)
        assert refused.status_code == 403 and refused.json()["errors"][0]["field"] == "receipt"
    ok = give(server, served, correct=True, label="positive")
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"request_id": rid, "policy_version": served["policy_version"],
                         "arm": served["arm"], "recorded": True}
    assert give(server, served, reward=10).status_code == 409


def _json(body: dict) -> str:
    import json

    return json.dumps(body, allow_nan=True)


def test_feedback_survives_a_killed_replica(server, setup):
    import ray

    from qpo_ray.serving.feedback import feedback_root, read_feedback

    cfg, _policy, _root, _profile = setup
    given = ask(server, QUERIES[0], client_key=key_in(server, "a"))
    pending = ask(server, "dull, dull, dull", client_key=key_in(server, "b"))
    assert give(server, given, correct=False).status_code == 200
    old_replica = server.get("/v1/version").json()["replica_id"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "PolicyServer" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
             no_restart=True)
    deadline = time.monotonic() + 180
    while True:  # Serve notices the dead replica and starts another one
        try:
            response = server.get("/v1/version")
            if response.status_code == 200 and response.json()["replica_id"] != old_replica:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Serve never replaced the killed replica"
        time.sleep(1)
    # The new replica knows both requests (journal) and the feedback already given (parts).
    late = give(server, pending, reward=80)
    assert late.status_code == 200, late.text
    assert give(server, given, correct=True).status_code == 409
    stored = read_feedback(feedback_root(cfg)).set_index("request_id")
    assert stored.loc[given["request_id"], "correct"] == False  # noqa: E712
    assert stored.loc[pending["request_id"], "reward"] == 80
    assert stored.loc[pending["request_id"], "prompt"] == pending["prompt"]


def test_feedback_becomes_dataset_rows_that_training_reads(server, setup, tmp_path):
    from qpo_ray.cli import main
    from qpo_ray.data.io import read_dataset, write_dataset
    from qpo_ray.data.rewards import RewardScale
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.serving.feedback import feedback_root, read_feedback
    from qpo_ray.training.trainer import TorchEngine, build_loader, read_training_rows, run_epoch
    from qpo_ray.config import TrainingConfig

    cfg, _policy, root, profile = setup
    feedback = read_feedback(feedback_root(cfg))
    assert len(feedback) >= 3  # from the tests above
    out = tmp_path / "feedback.parquet"
    # By default client-supplied outcomes train nothing (anyone can post reward 100).
    assert main(["serve", "feedback-dataset", "--profile", str(profile), "--keep-all",
                 "--out", str(out)]) == 0
    assert len(read_dataset(out)[0]) == 0
    trust = ["--set", "serve.train_on_client_feedback=true"]
    assert main(["serve", "feedback-dataset", "--profile", str(profile), "--keep-all",
                 "--out", str(out), *trust]) == 0
    rows, scale = read_dataset(out)  # the schema's required columns are all there
    assert scale is None and len(rows) == len(feedback)
    by_id = rows.set_index("query_id")
    right = feedback[feedback["correct"] == True].iloc[0]  # noqa: E712
    assert by_id.loc[right["request_id"], "reward"] == 100.0
    assert by_id.loc[right["request_id"], "label"] == "1"  # "positive" -> its index
    assert by_id.loc[right["request_id"], "source"] == f"served:{right['policy_version']}"
    # Appended to a run's dataset, the run's reward scale is kept and wrong rows are
    # dropped by the expert filter; the library's training step learns from the result.
    base = rows.head(1).assign(pair_id="base-0", loop=2)
    write_dataset(base, tmp_path / "d3.parquet", RewardScale(min=-1.0, max=1.5))
    merged_path = tmp_path / "d3-feedback.parquet"
    assert main(["serve", "feedback-dataset", "--profile", str(profile), "--into",
                 str(tmp_path / "d3.parquet"), "--out", str(merged_path), *trust]) == 0
    merged, merged_scale = read_dataset(merged_path)
    assert merged_scale == RewardScale(min=-1.0, max=1.5)
    added = merged.iloc[1:]
    assert len(added) and (added["reward"] >= 100 * cfg.dataset.expert_fraction).all()
    assert (added["loop"] == 3).all()
    training = read_training_rows(cfg, str(merged_path))
    policy = QPOPolicy.load(str(root / "a"))
    loader, _ = build_loader(policy, training, len(training["query"]), rank=0,
                             world_size=1, seed=0)
    metrics = run_epoch(TorchEngine(policy, TrainingConfig(), lr=1e-4), loader, 1)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0


def test_report_prints_and_logs_each_version(server, setup):
    from mlflow import MlflowClient

    from qpo_ray.serving.feedback_report import report

    cfg, _policy, root, _profile = setup
    # One query with a verdict under both versions: the comparison can pair it.
    for arm, correct in (("a", True), ("b", False)):
        served = ask(server, QUERIES[1], client_key=key_in(server, arm))
        assert give(server, served, correct=correct).status_code == 200
    text = report(cfg)
    print(text)
    lines = text.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:lines.index("")]}
    for arm in ("a", "b"):
        row = table[str(root / arm)]
        assert row[1] == arm and int(row[2]) >= 10 and int(row[3]) >= 2, row
    assert "(Newcombe)" in text and "paired on 1 queries" in text
    run_id = text.rsplit(" ", 1)[-1]
    metrics = MlflowClient(tracking_uri=cfg.tracking_uri()).get_run(run_id).data.metrics
    key = next(k for k in metrics if k.endswith(".feedback") and k.startswith("serve."))
    assert metrics[key] >= 2 and "serve.b_minus_a" in metrics


def test_split_and_arm_switch_in_place_and_drop_the_old_versions_cache(server, setup):
    cfg, _policy, root, profile = setup
    before = server.get("/v1/version").json()
    key = key_in(server, "b")
    assert ask(server, QUERIES[1], client_key=key)["cached"] is True
    deploy(cfg, profile, root / "a", {"policy_uri": str(root / "a"), "ab_policy_uri": str(root / "c"),
                          "ab_traffic_percent": 100, "prompt_cache_entries": 64})
    deadline = time.monotonic() + 120
    while server.get("/v1/version").json()["ab_traffic_percent"] != 100:
        assert time.monotonic() < deadline, "the new user_config never arrived"
        time.sleep(0.5)
    after = server.get("/v1/version").json()
    assert after["replica_id"] == before["replica_id"]  # reconfigured, not restarted
    assert [a["policy_version"] for a in after["arms"]] == [str(root / "a"), str(root / "c")]
    body = ask(server, QUERIES[1], client_key=key)
    assert (body["arm"], body["policy_version"], body["cached"]) == ("b", str(root / "c"), False)
    assert {ask(server, QUERIES[1], client_key=f"user-{i}")["arm"] for i in range(10)} == {"b"}
