"""`serve.decoding: mbr` on a real Serve instance on 127.0.0.1 (policy from a directory,
no target deployment): /v1/prompt answers with the mbr choice of the table saved beside
the policy, not the greedy prompt; a policy without a table is refused before Serve
changes anything, naming the setting."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from qpo_ray.config import ConfigError, load_config
from qpo_ray.policy.mbr import UtilityTable
from qpo_ray.policy.ranking import mbr_prompts
from tests.serving.test_serve import PROMPT_HIGH, PROMPT_LOW, PROMPT_V2, QUERIES, fit_policy

# Columns: the prompt the policy believes best; rows: how often each prompt is right
# then. Where PROMPT_HIGH is believed best, PROMPT_V2 pays; where PROMPT_LOW is, itself.
PROMPTS = [PROMPT_HIGH, PROMPT_LOW, PROMPT_V2]
UTILITY = np.array([[0.5, 0.2, 0.5],
                    [0.3, 0.9, 0.3],
                    [0.9, 0.1, 0.6]])


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory, tiny_policy, free_port):
    from ray import serve

    from qpo_ray.serving import run_serve

    cfg = load_config("cpu-demo", [
        f"workdir={tmp_path_factory.mktemp('serve-mbr')}", *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=12",
        f"serve.port={free_port}", "serve.num_cpus_per_replica=0.25", "serve.decoding=mbr",
    ])
    root = tmp_path_factory.mktemp("policies")
    policy = fit_policy(cfg, {100.0: PROMPT_HIGH, 0.0: PROMPT_LOW}, root / "plain")
    policy.mbr_table = UtilityTable(PROMPTS, UTILITY, 10)
    policy.save(root / "with-table")
    url = run_serve(cfg, blocking=False, policy_uri=str(root / "with-table"),
                    with_target=False)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, cfg, policy, root
    serve.shutdown()


def test_prompt_is_the_mbr_choice_not_the_greedy_one(deployed):
    server, _cfg, policy, _root = deployed
    for reward, expected in ((100.0, PROMPT_V2), (0.0, PROMPT_LOW)):
        for query in QUERIES:
            body = server.post("/v1/prompt", json={"query": query,
                                                   "target_reward": reward}).json()
            assert body["prompt"] == expected, (reward, query, body)
            assert body["prompt"] == mbr_prompts(policy, [query], reward,
                                                 policy.mbr_table)[0]


def test_a_policy_without_a_table_is_refused_naming_the_setting(deployed):
    from qpo_ray.serving import run_serve

    server, cfg, _policy, root = deployed
    with pytest.raises(ConfigError, match="serve.decoding"):
        run_serve(cfg, blocking=False, policy_uri=str(root / "plain"), with_target=False)
    # The running app kept its policy.
    body = server.post("/v1/prompt", json={"query": QUERIES[0]}).json()
    assert body["prompt"] == PROMPT_V2


def test_the_belief_temperature_reaches_the_served_choice(deployed):
    """serve.mbr_temperature: redeployed at 1000 (a belief spread evenly), /v1/prompt gives
    every query the prompt best on average (PROMPT_V2, row means 0.4 / 0.5 / 0.53), as
    `mbr_prompts` does at that temperature, where at 1 a reward of 0 got PROMPT_LOW."""
    from qpo_ray.serving import run_serve

    server, cfg, policy, root = deployed
    warm = cfg.with_changes({"serve": {"mbr_temperature": 1000.0}})
    run_serve(warm, blocking=False, policy_uri=str(root / "with-table"), with_target=False)
    for query in QUERIES:
        body = server.post("/v1/prompt", json={"query": query, "target_reward": 0.0}).json()
        assert body["prompt"] == PROMPT_V2 == mbr_prompts(policy, [query], 0.0, policy.mbr_table,
                                                          temperature=1000.0)[0]
