"""The QPO policy on a 1-layer SmolLM2 backbone: layout, loss, generation, save/load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from qpo_ray.config import PolicyConfig, TrainingConfig
from qpo_ray.policy import QPOPolicy, as_batch, embed_queries, encode_rows, generate_prompts
from qpo_ray.policy.batching import best_rows, encode_queries, training_rows
from qpo_ray.policy.generation import generate_token_ids
from qpo_ray.training.trainer import TorchEngine, build_loader, run_epoch

Q_TOKENS, P_TOKENS = 12, 10


@pytest.fixture(scope="module")
def policy_cfg(tiny_model_dir) -> PolicyConfig:
    return PolicyConfig(backbone=str(tiny_model_dir), backbone_num_layers=1,
                        max_query_tokens=Q_TOKENS, max_prompt_tokens=P_TOKENS)


@pytest.fixture(scope="module")
def policy(policy_cfg) -> QPOPolicy:
    torch.manual_seed(0)
    return QPOPolicy.from_backbone(policy_cfg).eval()


def _batch(policy, queries, prompts, rewards):
    enc = encode_rows(policy.tokenizer, queries, prompts, rewards, Q_TOKENS, P_TOKENS)
    return as_batch(enc.tensors())


def test_the_policy_package_imports_no_ray_mlflow_vllm_or_deepspeed():
    code = ("import sys, qpo_ray.policy; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'mlflow', 'vllm', 'deepspeed'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_backbone_is_cut_to_the_configured_layers(policy, tiny_model_dir):
    assert policy.backbone.config.num_hidden_layers == 1
    assert len(policy.backbone.base_model.layers) == 1
    full = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert full > 1


def test_logits_only_at_real_prompt_tokens_and_a_finite_loss(policy):
    batch = _batch(policy, ["great movie, loved it", "a dull and far too long film that never ends"],
                   ["Classify the review.", "Is it positive?<|endoftext|>"], [80.0, 20.0])
    seen = []
    hook = policy.backbone.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        logits, targets, r_hat = policy.prompt_logits_and_reward(batch)
        losses = policy.compute_loss(batch)
    finally:
        hook.remove()
    n_prompt = int(batch["prompt_mask"].sum())
    assert logits.shape == (n_prompt, policy.backbone.config.vocab_size)
    assert seen[0] == (n_prompt, policy.backbone.config.hidden_size)  # the LM head's input
    assert targets.shape == (n_prompt,) and r_hat.shape == (2,)
    # Every prompt is EOS-terminated, and the literal GPT-2 marker is not learned as text.
    eos = policy.tokenizer.eos_token_id
    lengths = batch["prompt_mask"].sum(1)
    assert [int(batch["prompt_ids"][i, n - 1]) for i, n in enumerate(lengths)] == [eos, eos]
    assert "endoftext" not in policy.tokenizer.decode(batch["prompt_ids"][1])
    assert set(losses) >= {"loss", "prompt_loss", "reward_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    expected = losses["prompt_loss"] + policy.config.reward_loss_weight * losses["reward_loss"]
    assert torch.allclose(losses["loss"], expected)


def test_padding_does_not_change_a_rows_logits(policy):
    """Masks and position ids are right: a row gives the same logits alone or next to a
    row with a longer query and prompt (so different padding)."""
    alone = _batch(policy, ["nice"], ["Say yes."], [50.0])
    mixed = _batch(policy, ["nice", "a much longer query with many more tokens in it"],
                   ["Say yes.", "A longer prompt that fills the whole slot up"], [50.0, 90.0])
    with torch.no_grad():
        la, _, ra = policy.prompt_logits_and_reward(alone)
        lm, _, rm = policy.prompt_logits_and_reward(mixed)
    n = la.shape[0]
    torch.testing.assert_close(lm[:n], la, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(rm[:1], ra, atol=1e-5, rtol=1e-5)


def test_all_padding_columns_are_dropped_and_change_no_number(policy, monkeypatch):
    """A batch pays for its longest row, not the slot width: columns that are padding
    in every row are dropped (leading ones of the query slot, trailing ones of the
    prompt slot), and the logits, reward and ranked log-likelihoods stay the same."""
    import qpo_ray.policy.batching as batching
    import qpo_ray.policy.generation as generation
    import qpo_ray.policy.model as model
    import qpo_ray.policy.ranking as ranking
    from qpo_ray.policy.batching import trim_padding

    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    assert trim_padding(ids, mask, "left")[1].tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    assert trim_padding(ids, mask, "right")[0].tolist() == [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]
    assert trim_padding(ids, torch.zeros_like(mask), "left")[0].shape == (2, 0)
    with pytest.raises(ValueError, match="side"):
        trim_padding(ids, mask, "middle")

    batch = _batch(policy, ["nice", "fine film"], ["Say yes.", "No."], [50.0, 90.0])
    assert batch["query_mask"][:, 0].sum() == 0 and batch["prompt_mask"][:, -1].sum() == 0
    queries, cands = ["a fine film", "dull"], [["Say yes.", "No."], ["No.", "Rate it."]]

    def numbers():
        with torch.no_grad():
            logits, targets, r_hat = policy.prompt_logits_and_reward(batch)
        return logits, targets, r_hat, ranking.candidate_logprobs(policy, queries, cands, 70.0)
    trimmed = numbers()
    for module in (model, generation, ranking):  # the full slots, as before trimming
        monkeypatch.setattr(module, "trim_padding", lambda i, m, side: (i, m))
    full = numbers()
    assert batching.trim_padding is trim_padding
    for a, b in zip(trimmed[:3], full[:3]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(trimmed[3], full[3], atol=1e-3)


def test_cached_greedy_generation_matches_the_training_forward(policy):
    """The KV-cache path feeds the same inputs at the same positions as training: each
    greedy token is the argmax of the teacher-forced logits at that position."""
    queries = ["the plot was thin but the actors were wonderful", "boring"]
    generated = generate_token_ids(policy, queries, target_reward=70.0)
    batch = _batch(policy, queries, ["x", "x"], [70.0, 70.0])
    batch["prompt_ids"].fill_(policy.tokenizer.eos_token_id)
    batch["prompt_mask"].zero_()
    for i, row in enumerate(generated):
        batch["prompt_ids"][i, :len(row)] = torch.tensor(row)
        batch["prompt_mask"][i, :len(row)] = 1
    with torch.no_grad():
        logits, targets, _ = policy.prompt_logits_and_reward(batch)
    assert sum(map(len, generated)) >= 4
    assert logits.argmax(-1).tolist() == targets.tolist() == [t for row in generated for t in row]


def test_sampling_is_reproducible_and_greedy_ignores_batch_size(policy):
    queries = ["what a film", "terrible acting", "i would watch it again", "meh"]
    a = generate_prompts(policy, queries, do_sample=True, seed=7)
    b = generate_prompts(policy, queries, do_sample=True, seed=7)
    assert a == b
    assert generate_prompts(policy, queries, batch_size=1) == generate_prompts(policy, queries,
                                                                                batch_size=4)
    assert all(isinstance(p, str) for p in a)


def test_query_embeddings_are_normalised_and_query_specific(policy):
    emb = embed_queries(policy, ["good film", "good film", "the stock market fell sharply"])
    assert emb.shape == (3, policy.backbone.config.hidden_size) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
    assert emb[0] @ emb[2] < 0.9999


def test_training_rows_validate_and_select_the_best_prompt_for_sft():
    frame = pd.DataFrame({"query": ["q1", "q1", "q2"], "prompt": ["a", "b", "c"],
                          "reward": [10.0, 90.0, 40.0]})
    assert len(training_rows(frame, "qpo")) == 3
    sft = training_rows(frame, "sft")
    assert sorted(zip(sft["query"], sft["prompt"])) == [("q1", "b"), ("q2", "c")]
    bad = frame.assign(reward=[1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match=r"data\.parquet: row 1: column 'reward'"):
        training_rows(bad, "qpo", source="data.parquet")
    with pytest.raises(ValueError, match="missing column"):
        training_rows(frame.drop(columns=["prompt"]), "qpo", source="data.parquet")


# ----- a toy dataset where the reward decides the prompt ----------------------------------
PROMPT_HIGH = "Answer with positive or negative."
PROMPT_LOW = "Summarise the text in one line."
TOY_QUERIES = ["the film was a delight", "i hated every minute", "solid cast, weak script",
               "an instant classic", "two hours i will never get back", "charming and warm"]


def _toy_rows() -> dict[str, list]:
    rows = {"query": [], "prompt": [], "reward": []}
    for i, q in enumerate(TOY_QUERIES):
        for reward, prompt in ((100.0 - i, PROMPT_HIGH), (i * 2.0, PROMPT_LOW)):
            rows["query"].append(q)
            rows["prompt"].append(prompt)
            rows["reward"].append(reward)
    return rows


def _train_in_process(policy: QPOPolicy, rows: dict[str, list], steps: int, lr: float) -> None:
    tcfg = TrainingConfig(batch_size_global=12, lr_first_loop=lr)
    loader, _ = build_loader(policy, rows, tcfg.batch_size_global, rank=0, world_size=1, seed=0)
    engine = TorchEngine(policy, tcfg, lr)
    done = 0
    while done < steps:
        done += run_epoch(engine, loader, steps - done)["steps"]
    policy.eval()


@pytest.fixture(scope="module")
def toy_policy(policy_cfg) -> QPOPolicy:
    torch.manual_seed(0)
    policy = QPOPolicy.from_backbone(policy_cfg)
    _train_in_process(policy, _toy_rows(), steps=36, lr=2e-3)
    return policy


def test_the_reward_conditions_what_is_generated(toy_policy):
    assert generate_prompts(toy_policy, TOY_QUERIES, target_reward=100.0) == [PROMPT_HIGH] * 6
    assert generate_prompts(toy_policy, TOY_QUERIES, target_reward=0.0) == [PROMPT_LOW] * 6


def test_save_load_round_trip_generates_identical_prompts(toy_policy, tmp_path):
    out = toy_policy.save(tmp_path / "policy")
    assert (out / "qpo_heads.safetensors").exists() and (out / "qpo_policy.json").exists()
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    loaded = QPOPolicy.load(out).eval()
    assert loaded.config == toy_policy.config
    for key, value in toy_policy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    queries = TOY_QUERIES + ["an unseen query about cooking pasta"]
    for reward in (100.0, 0.0, 55.0):
        assert (generate_prompts(loaded, queries, target_reward=reward)
                == generate_prompts(toy_policy, queries, target_reward=reward))


def test_load_refuses_a_policy_whose_weights_are_a_pickle(policy, tmp_path):
    """The same policy with its backbone as pytorch_model.bin (what transformers would
    otherwise load, pickle and all) is refused, naming the file; safetensors load."""
    out = policy.save(tmp_path / "policy")
    QPOPolicy.load(out)
    torch.save(policy.backbone.state_dict(), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors backbone weights \(found "
                       r"pytorch_model\.bin\).*never from pickled weights"):
        QPOPolicy.load(out)


def test_an_mbr_table_travels_with_the_policy_and_steers_its_choice(toy_policy, tmp_path):
    """The table saved with a policy loads with it (Serve decodes by it), and mbr picks
    what the table says pays, not the policy's most likely prompt."""
    from qpo_ray.policy.mbr import TABLE_FILE, UtilityTable
    from qpo_ray.policy.ranking import mbr_prompts

    assert QPOPolicy.load(toy_policy.save(tmp_path / "plain")).mbr_table is None
    # The policy believes PROMPT_HIGH is best at reward 100; the table says PROMPT_LOW is
    # right 90% of the time wherever PROMPT_HIGH is best.
    table = UtilityTable([PROMPT_HIGH, PROMPT_LOW], np.array([[0.5, 0.5], [0.9, 0.1]]), 12)
    toy_policy.mbr_table = table
    try:
        out = toy_policy.save(tmp_path / "with-table")
    finally:
        toy_policy.mbr_table = None
    assert (out / TABLE_FILE).exists()
    loaded = QPOPolicy.load(out)
    assert loaded.mbr_table.prompts == table.prompts and loaded.mbr_table.num_queries == 12
    np.testing.assert_array_equal(loaded.mbr_table.utility, table.utility)
    assert mbr_prompts(loaded, TOY_QUERIES, 100.0, loaded.mbr_table) == [PROMPT_LOW] * 6
    (out / TABLE_FILE).write_text('{"prompts": ["a"]}')
    with pytest.raises(ValueError, match=TABLE_FILE):
        QPOPolicy.load(out)


def test_finished_rows_leave_the_batch_without_changing_the_others(policy_cfg):
    """A batch mixing a 2-token and a 9-token prompt: the short row drops out of the
    batch (and the KV cache) after its EOS, and every row is what it is on its own."""
    torch.manual_seed(0)
    policy = QPOPolicy.from_backbone(policy_cfg)
    short, long = "Yes.", "Classify the review as positive or negative."
    queries = ["short answer please", "a long prompt for this one"]
    rows = {"query": queries * 3, "prompt": [short, long] * 3, "reward": [100.0] * 6}
    _train_in_process(policy, rows, steps=40, lr=2e-3)
    assert generate_prompts(policy, queries) == [short, long]
    together = generate_token_ids(policy, queries + queries[::-1])
    alone = [generate_token_ids(policy, [q])[0] for q in queries + queries[::-1]]
    assert together == alone
    assert len(together[0]) < len(together[1]) < P_TOKENS


def test_pretransposed_linears_match_and_follow_weight_updates():
    from qpo_ray.policy.inference import speed_up_decoding

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(8, 16)
    want = model(x)
    assert speed_up_decoding(model) == 2 and speed_up_decoding(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
        model[1].weight.mul_(2.0)  # an optimizer step, a load: the copy must follow
        torch.testing.assert_close(model(x), 2 * want)
    loss = model(x).sum()  # with gradients on, the usual path: the weights get them
    loss.backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is not None


def test_sft_mode_ignores_the_reward(policy_cfg):
    torch.manual_seed(0)
    sft = QPOPolicy.from_backbone(PolicyConfig(**{**policy_cfg.__dict__, "mode": "sft"})).eval()
    batch = _batch(sft, ["q one", "q two"], ["p one", "p two"], [3.0, 97.0])
    losses = sft.compute_loss(batch)
    torch.testing.assert_close(losses["loss"], losses["prompt_loss"])
    assert (generate_prompts(sft, TOY_QUERIES[:3], target_reward=0.0)
            == generate_prompts(sft, TOY_QUERIES[:3], target_reward=100.0))


def test_a_gpt2_backbone_works_too(tiny_model_dir, tmp_path):
    """GPT-2 keeps its layers in `transformer.h` and has learned absolute positions; the
    same code cuts, trains, saves and reloads it (random weights, the embedded tokenizer)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=3,
                        n_head=2, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")
    tokenizer.save_pretrained(tmp_path / "gpt2-tiny")
    cfg = PolicyConfig(backbone=str(tmp_path / "gpt2-tiny"), backbone_num_layers=2,
                       max_query_tokens=8, max_prompt_tokens=6)
    gpt = QPOPolicy.from_backbone(cfg)
    assert len(gpt.backbone.transformer.h) == 2
    losses = gpt.compute_loss(_batch_for(gpt, cfg))
    assert torch.isfinite(losses["loss"])
    gpt.eval()
    before = generate_prompts(gpt, ["hello there"], target_reward=90.0)
    again = QPOPolicy.load(gpt.save(tmp_path / "saved")).eval()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["n_layer"] == 2
    assert generate_prompts(again, ["hello there"], target_reward=90.0) == before


def _batch_for(policy, cfg):
    enc = encode_rows(policy.tokenizer, ["hello there"], ["say hi"], [90.0],
                      cfg.max_query_tokens, cfg.max_prompt_tokens)
    return as_batch(enc.tensors())


# ----- reward-conditioned ranking of candidate prompts -------------------------------------
def test_candidate_logprobs_equal_the_training_forward(policy):
    """The cached [R|q] prefix repeated over candidates gives the same log-likelihood as
    the training forward over each (query, candidate) row, EOS included."""
    from qpo_ray.policy.ranking import candidate_logprobs

    queries = ["the film was a delight", "i hated every minute of it, truly"]
    # a candidate listed twice for one query is read once and reported in both slots
    cands = [["Answer with positive or negative.", "Summarise.", "Summarise."],
             ["Is it good?", "Answer with positive or negative.", "Is it good?"]]
    got = candidate_logprobs(policy, queries, cands, reward=70.0)
    assert got[0, 1] == got[0, 2] and got[1, 0] == got[1, 2]
    for i, q in enumerate(queries):
        for j, c in enumerate(cands[i]):
            batch = _batch(policy, [q], [c], [70.0])
            with torch.no_grad():
                logits, targets, _ = policy.prompt_logits_and_reward(batch)
            want = logits.float().log_softmax(-1).gather(-1, targets[:, None]).sum().item()
            assert got[i, j] == pytest.approx(want, abs=1e-3)


def test_ranking_prefers_the_prompt_the_policy_ties_to_high_reward(toy_policy):
    from qpo_ray.policy.ranking import candidate_logprobs, rank_candidates

    cands = [[PROMPT_LOW, PROMPT_HIGH]] * len(TOY_QUERIES)
    seen: list[int] = []
    scores = rank_candidates(toy_policy, TOY_QUERIES, cands, high_reward=100.0, low_reward=0.0,
                             batch_size=2, on_batch=seen.append)
    assert (scores.argmax(axis=1) == 1).all()
    # progress counts every query at both rewards, batch by batch, up to 2N
    n = len(TOY_QUERIES)
    assert seen == [min(i + 2, n) for i in range(0, n, 2)] + [n + min(i + 2, n)
                                                               for i in range(0, n, 2)]
    # the score is exactly the contrast of the two conditional log-likelihoods
    high = candidate_logprobs(toy_policy, TOY_QUERIES, cands, 100.0)
    low = candidate_logprobs(toy_policy, TOY_QUERIES, cands, 0.0)
    np.testing.assert_allclose(scores, high - low, atol=1e-5)
    with pytest.raises(ValueError, match="same, non-zero number"):
        candidate_logprobs(toy_policy, TOY_QUERIES[:2], [[PROMPT_LOW], [PROMPT_LOW, PROMPT_HIGH]],
                           100.0)


def test_best_rows_keep_each_querys_top_k_in_the_datasets_order():
    rows = pd.DataFrame({"query": ["a", "b", "a", "a", "b"], "prompt": list("pqrst"),
                         "reward": [50.0, 90.0, 80.0, 80.0, 10.0]})
    assert best_rows(rows, 1)["prompt"].tolist() == ["q", "r"]  # tie at 80: r comes first
    assert best_rows(rows, 2)["prompt"].tolist() == ["q", "r", "s", "t"]
    # Ranked by another column (training.summary.rank_by: r_query): its order, not reward's.
    rows["r_query"] = [0.9, 0.1, 0.2, 0.3, 0.5]
    assert best_rows(rows, 1, by="r_query")["prompt"].tolist() == ["p", "t"]


def test_query_summary_adds_nothing_until_fitted_and_survives_a_reload(policy_cfg, tmp_path):
    import dataclasses

    from qpo_ray.policy.ranking import candidate_logprobs

    from qpo_ray.config.features import QuerySummaryConfig

    cfg = dataclasses.replace(policy_cfg, query_summary=QuerySummaryConfig(True, 2, 3))
    torch.manual_seed(0)
    plain = QPOPolicy.from_backbone(policy_cfg).eval()
    summed = QPOPolicy.from_backbone(cfg).eval()
    summed.load_state_dict(plain.state_dict(), strict=False)  # the same policy + a summary
    queries = ["a gorgeous, witty film", "dull and lifeless", "the best movie of the year",
               "a waste of two hours", "I loved every minute", "boring plot, bad acting"]
    cands = [["Is it positive or negative?", "Label: positive | negative."]] * len(queries)
    before = candidate_logprobs(plain, queries, cands, 100.0)
    np.testing.assert_allclose(candidate_logprobs(summed, queries, cands, 100.0), before)

    ids, mask = encode_queries(summed.tokenizer, queries, Q_TOKENS)
    summed.query_summary.fit(ids, mask)
    # Fitted but with the adapter still zero: nothing moves; a trained adapter steers.
    np.testing.assert_allclose(candidate_logprobs(summed, queries, cands, 100.0), before,
                               atol=1e-5)
    z = (summed.query_summary.read(ids, mask) - summed.query_summary.mean) @ \
        summed.query_summary.proj
    # Whitened components: zero mean, unit variance over the queries it was fitted on.
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0).numpy(), 1.0, atol=1e-3)
    with torch.no_grad():
        summed.query_summary.adapter.weight.normal_(std=0.5)
    steered = candidate_logprobs(summed, queries, cands, 100.0)
    assert np.abs(steered - before).max() > 0.1

    summed.train_only_summary()
    trainable = {n for n, p in summed.named_parameters() if p.requires_grad}
    assert "query_summary.adapter.weight" in trainable and "reward_embed.weight" in trainable
    assert not any(n.startswith("backbone.") for n in trainable)
    with pytest.raises(ValueError, match=r"query_summary\.enable: false"):
        plain.train_only_summary()

    back = QPOPolicy.load(summed.save(tmp_path / "p"))
    assert back.config.query_summary.num_layers == 2 and bool(back.query_summary.fitted)
    np.testing.assert_allclose(candidate_logprobs(back, queries, cands, 100.0), steered,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"more than policy\.query_summary\.dims=3"):
        QPOPolicy.from_backbone(cfg).query_summary.fit(ids[:3], mask[:3])

