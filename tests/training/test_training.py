"""Policy training on real Ray Train: 2 CPU workers with gloo DDP and DeepSpeed ZeRO-2,
on rows of the QPO paper's published Tweet Emotion dataset."""

from __future__ import annotations

import json
import math

import pandas as pd
import torch
import pytest

from qpo_ray.common import device as devices
from qpo_ray.config import load_config
from qpo_ray.data.importer import import_paper_json
from qpo_ray.data.io import write_dataset
from qpo_ray.policy import QPOPolicy, as_batch, encode_rows, generate_prompts
from qpo_ray.training.trainer import check_training_config, schedule_for_loop, train_policy

PAPER_JSON = "qpo_offline/tweet_emotion_llama7b_few_shot_expert.json"
NUM_ROWS = 64
# A 2-layer, 4-dim query summary: the summary tests' policy.
SUMMARY_POLICY = {"query_summary": {"enable": True, "layers": 2, "dims": 4}}
# The main part's settings of the summary-part tests: they share its one training.
MAIN_PART = {"strategy": "ddp", "epochs_first_loop": 1, "batch_size_global": 4}


@pytest.fixture(scope="module")
def paper_dataset(shared_data, tmp_path_factory):
    """A seeded sample of the paper's rows as a QPO Parquet dataset (rewards 0-100 from
    few_shot_accuracy + few_shot_avg_acc, min-max scaled by the importer)."""
    frame, scale = import_paper_json(shared_data / PAPER_JSON)
    sample = frame.sample(n=NUM_ROWS, random_state=0).reset_index(drop=True)
    return write_dataset(sample, tmp_path_factory.mktemp("data") / "tweet_emotion.parquet", scale)


def _cfg(tiny_model_dir, policy=None, dataset=None, **training):
    return load_config(None, {
        "seed": 0,
        "dataset": dataset or {},
        "policy": {"backbone": str(tiny_model_dir), "backbone_num_layers": 1,
                   "max_query_tokens": 24, "max_prompt_tokens": 32, **(policy or {})},
        "training": {"num_workers": 2, "batch_size_global": 16, "lr_first_loop": 5e-4,
                     **training},
    })


def _mean_loss(policy: QPOPolicy, dataset_path) -> float:
    from qpo_ray.data.io import read_dataset

    frame, _ = read_dataset(dataset_path)
    cfg = policy.config
    enc = encode_rows(policy.tokenizer, frame["query"].tolist(), frame["prompt"].tolist(),
                      frame["reward"].tolist(), cfg.max_query_tokens, cfg.max_prompt_tokens)
    policy.eval()
    with torch.no_grad():
        return float(policy.compute_loss(as_batch(enc.tensors()))["loss"])


def test_table9_schedule_and_config_checks(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    assert schedule_for_loop(cfg.training, 1) == (5e-4, cfg.training.epochs_first_loop)
    assert schedule_for_loop(cfg.training, 3) == (cfg.training.lr_later_loops,
                                                  cfg.training.epochs_later_loops)
    with pytest.raises(ValueError, match="loop_index"):
        schedule_for_loop(cfg.training, 0)
    with pytest.raises(ValueError, match="training.mixed_precision=fp16 needs training.use_gpu"):
        check_training_config(_cfg(tiny_model_dir, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="mixed_precision='bf16' under DeepSpeed"):
        check_training_config(_cfg(tiny_model_dir, mixed_precision="bf16", strategy="deepspeed"))
    check_training_config(_cfg(tiny_model_dir, mixed_precision="auto", strategy="deepspeed"))


def test_bad_dataset_fails_before_any_worker_starts(tiny_model_dir, tmp_path, paper_dataset):
    from qpo_ray.data.io import read_dataset

    frame, scale = read_dataset(paper_dataset)
    frame.loc[5, "reward"] = float("inf")
    bad = write_dataset(frame, tmp_path / "bad.parquet", scale)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 5: column 'reward'"):
        train_policy(_cfg(tiny_model_dir), str(bad), str(tmp_path / "out"), loop_index=1)


def test_ddp_on_two_cpu_workers_lowers_the_loss(ray_cluster, tiny_model_dir, paper_dataset,
                                                tmp_path):
    cfg = _cfg(tiny_model_dir, strategy="ddp", epochs_first_loop=3)
    result = train_policy(cfg, str(paper_dataset), str(tmp_path / "loop1"), loop_index=1)

    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    for m in result.metrics:
        assert {"loss", "prompt_loss", "reward_loss", "reward_mae", "samples_per_s"} <= set(m)
        assert m["steps"] == NUM_ROWS // 16  # 8 rows per worker per step, both workers
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]

    torch.manual_seed(cfg.seed)
    initial = QPOPolicy.from_backbone(cfg.policy)
    trained = QPOPolicy.load(result.checkpoint_dir)
    assert _mean_loss(trained, paper_dataset) < _mean_loss(initial, paper_dataset) - 0.5
    assert all(isinstance(p, str) for p in generate_prompts(trained, ["so happy today!"]))


@pytest.fixture(scope="module")
def main_part(ray_cluster, tiny_model_dir, paper_dataset, tmp_path_factory):
    """The main part's policy (2 DDP workers) that the summary tests start from: the
    summary section does not change what the main part trains."""
    cfg = _cfg(tiny_model_dir, policy=SUMMARY_POLICY, summary={"epochs": 1}, **MAIN_PART)
    return train_policy(cfg, str(paper_dataset), str(tmp_path_factory.mktemp("main")),
                        loop_index=1)


def test_summary_part_trains_only_the_adapter_on_each_querys_best_row(
        tiny_model_dir, paper_dataset, main_part, tmp_path):
    from qpo_ray.data.io import read_dataset
    from qpo_ray.common.errors import ConfigError

    cfg = _cfg(tiny_model_dir, policy=SUMMARY_POLICY, summary={"epochs": 2, "lr": 1e-2},
               **MAIN_PART)
    summary = train_policy(cfg, str(paper_dataset), str(tmp_path / "summary"), loop_index=1,
                           init_checkpoint=main_part.checkpoint_dir, part="summary")
    before = QPOPolicy.load(main_part.checkpoint_dir)
    after = QPOPolicy.load(summary.checkpoint_dir)

    # The main part leaves the summary unfitted and its adapter at zero.
    assert not bool(before.query_summary.fitted)
    assert float(before.query_summary.adapter.weight.abs().max()) == 0.0
    # The summary part fits the projection, trains the adapter, and nothing of the backbone.
    assert bool(after.query_summary.fitted)
    assert float(after.query_summary.adapter.weight.abs().max()) > 0.0
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("backbone."))
    # One row per query (the best); each of the 2 workers takes half, 2 rows a step.
    queries = read_dataset(paper_dataset)[0]["query"].nunique()
    assert [m["steps"] for m in summary.metrics] == [math.ceil(math.ceil(queries / 2) / 2)] * 2

    plain = _cfg(tiny_model_dir)
    with pytest.raises(ConfigError, match="no query summary"):
        train_policy(plain, str(paper_dataset), str(tmp_path / "x"), loop_index=1,
                     part="summary")


def test_summary_rows_are_each_querys_best_by_training_summary_rank_by(
        tiny_model_dir, paper_dataset, tmp_path):
    from qpo_ray.data.io import DatasetFileError, read_dataset
    from qpo_ray.training.trainer import read_training_rows

    frame, scale = read_dataset(paper_dataset)
    policy = SUMMARY_POLICY
    for rank_by in ("reward", "r_query"):
        cfg = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "rank_by": rank_by})
        rows = read_training_rows(cfg, str(paper_dataset), part="summary")
        assert len(rows["query"]) == frame["query"].nunique() == len(set(rows["query"]))
        top = frame[frame.groupby("query")[rank_by].transform("max") == frame[rank_by]]
        assert set(zip(rows["query"], rows["prompt"])) <= set(zip(top["query"], top["prompt"]))
    # The two rankings disagree on this data (R_task tips the reward), so the test can fail.
    by_reward = read_training_rows(_cfg(tiny_model_dir, policy=policy, summary={"epochs": 1}),
                                   str(paper_dataset), part="summary")
    assert by_reward["prompt"] != rows["prompt"]
    # A dataset without the column fails on the driver naming it; the main part needs none.
    bare = write_dataset(frame.drop(columns=["r_query"]), tmp_path / "bare.parquet", scale)
    with pytest.raises(DatasetFileError, match=r"bare\.parquet: missing column 'r_query'"):
        read_training_rows(cfg, str(bare), part="summary")
    assert len(read_training_rows(cfg, str(bare))["query"]) == len(frame)


def test_summary_rows_are_conditioned_on_the_target_reward_with_summary_reward_target(
        tiny_model_dir, paper_dataset):
    from qpo_ray.training.trainer import read_training_rows

    policy = SUMMARY_POLICY
    own = read_training_rows(_cfg(tiny_model_dir, policy=policy, summary={"epochs": 1}),
                             str(paper_dataset), part="summary")
    target = read_training_rows(
        _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "reward": "target"}),
        str(paper_dataset), part="summary")
    # The same best rows; only the reward they are learnt at changes.
    assert (target["query"], target["prompt"]) == (own["query"], own["prompt"])
    assert len(set(own["reward"])) > 1 and max(own["reward"]) < 100.0
    assert target["reward"] == [100.0] * len(own["reward"])
    # The main part keeps every row's own reward.
    cfg = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "reward": "target"})
    assert len(set(read_training_rows(cfg, str(paper_dataset))["reward"])) > 1


def test_summary_queries_unseen_trains_each_part_on_its_own_queries(
        tiny_model_dir, paper_dataset, tmp_path):
    from qpo_ray.data.io import DatasetFileError, read_dataset
    from qpo_ray.data.pairs import NO_GROUP, WIDE_GROUP
    from qpo_ray.training.trainer import read_training_rows

    frame, scale = read_dataset(paper_dataset)
    queries = sorted(frame["query"].unique())
    wide = set(queries[::2])  # every other query: a wide Step-0 one
    frame = frame.assign(loop=0, group=[WIDE_GROUP if q in wide else 0
                                        for q in frame["query"]])
    # Augmentation rows (loop 1, no group) land on a wide and on a shared query.
    extra = frame.drop_duplicates("query").head(4).assign(loop=1, group=NO_GROUP,
                                                          prompt="A sampled prompt.")
    assert set(extra["query"]) & wide and set(extra["query"]) - wide
    path = write_dataset(pd.concat([frame, extra], ignore_index=True),
                         tmp_path / "wide.parquet", scale)
    policy = SUMMARY_POLICY
    cfg = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "queries": "unseen"},
               dataset={"prompts_per_group": 0,
                        "wide": {"enable": True, "prompts": 2, "queries": 8}})
    main = read_training_rows(cfg, str(path))
    summary = read_training_rows(cfg, str(path), part="summary")
    assert set(main["query"]) == set(queries) - wide
    assert set(summary["query"]) == wide and len(summary["query"]) == len(wide)
    # Every row of a wide query (its augmentation rows too) stays out of the main part.
    on_shared = extra[~extra["query"].isin(wide)]
    assert len(main["query"]) == (~frame["query"].isin(wide)).sum() + len(on_shared)
    # "all": both parts see every query.
    both = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1})
    assert set(read_training_rows(both, str(path))["query"]) == set(queries)
    assert set(read_training_rows(both, str(path), part="summary")["query"]) == set(queries)
    # A dataset without wide Step-0 rows fails naming the file and the setting.
    plain = write_dataset(frame.assign(group=0), tmp_path / "plain.parquet", scale)
    with pytest.raises(DatasetFileError, match=r"plain\.parquet: training.summary.queries"):
        read_training_rows(cfg, str(plain))


def test_summary_holdout_keeps_the_epoch_whose_belief_fits_held_out_queries_best(
        tiny_model_dir, paper_dataset, main_part, tmp_path):
    from qpo_ray.common.errors import ConfigError
    from qpo_ray.data.io import DatasetFileError, read_dataset
    from qpo_ray.training.summary_part import BestEpoch
    from qpo_ray.training.trainer import read_training_rows

    frame, _ = read_dataset(paper_dataset)
    # mbr's candidates: here 12 prompts, each the best of some query.
    best_of = frame.sort_values("reward").drop_duplicates("query", keep="last")["prompt"]
    candidates = sorted(best_of.unique()[:12])
    policy = SUMMARY_POLICY
    # A learning rate far too high: the belief on held-out queries gets worse after a while.
    cfg = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 4, "lr": 0.3, "holdout": 0.15},
               **MAIN_PART)
    rows = read_training_rows(cfg, str(paper_dataset), "summary", candidates)
    held = rows["holdout"]
    assert len(held.queries) == round(0.15 * frame["query"].nunique())
    assert not set(held.queries) & set(rows["query"])  # held out of the part's training
    assert set(held.queries) | set(rows["query"]) == set(frame["query"])
    assert read_training_rows(cfg, str(paper_dataset), "summary", candidates)["holdout"] == held
    for query, best in zip(held.queries, held.best):  # labelled with its best row's prompt
        own = frame[frame["query"] == query]
        assert own.loc[own["prompt"] == candidates[best], "reward"].max() == own["reward"].max()

    summary = train_policy(cfg, str(paper_dataset), str(tmp_path / "summary"), loop_index=1,
                           init_checkpoint=main_part.checkpoint_dir, part="summary",
                           candidates=candidates)
    last = summary.metrics[-1]
    # The loss of the summary as it came in (epoch 0), then after each epoch.
    losses = [last["holdout_choice_loss_start"]] + [m["holdout_choice_loss"]
                                                    for m in summary.metrics]
    kept = last["kept_epoch"]
    assert len(losses) == 5 and kept == losses.index(min(losses)) and kept < 4, losses
    # The saved policy is the kept epoch's, not the last one's.
    amp = devices.autocast_dtype(cfg.training.mixed_precision, torch.device("cpu"))
    score = BestEpoch(held, amp).score(QPOPolicy.load(summary.checkpoint_dir))
    assert score == pytest.approx(min(losses), abs=2e-3) and score < losses[-1] - 1e-2

    with pytest.raises(ConfigError, match="training.summary.holdout: needs mbr's candidates"):
        read_training_rows(cfg, str(paper_dataset), "summary")
    greedy = _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "holdout": 0.99})
    with pytest.raises(DatasetFileError, match=r"tweet_emotion\.parquet: training.summary"):
        read_training_rows(greedy, str(paper_dataset), "summary", candidates)
    with pytest.raises(ConfigError, match=r"training.summary.holdout must be in \[0, 1\)"):
        _cfg(tiny_model_dir, policy=policy, summary={"epochs": 1, "holdout": 1.0})
    with pytest.raises(ConfigError, match=r"holdout > 0 needs a summary phase"):
        _cfg(tiny_model_dir, policy=policy, summary={"epochs": 0, "holdout": 0.2})


def test_train_stage_moves_the_summary_parts_policy_into_the_loops_place(
        ray_cluster, tiny_model_dir, paper_dataset, tmp_path):
    from qpo_ray.run.stages.train import train_loop

    cfg = _cfg(tiny_model_dir, policy=SUMMARY_POLICY,
               epochs_first_loop=1, summary={"epochs": 1}, batch_size_global=4)
    out = train_loop(cfg, 1, paper_dataset, tmp_path / "loop1")
    assert out.checkpoint_dir == str(tmp_path / "loop1" / "policy")
    assert bool(QPOPolicy.load(out.checkpoint_dir).query_summary.fitted)
    assert not (tmp_path / "loop1" / "summary" / "policy").exists()  # moved, not copied
    # The loop's metrics stay the main part's (one epoch), the summary part's beside them.
    assert [m["epoch"] for m in json.loads((tmp_path / "loop1" / "metrics.json").read_text())] == [1]
    assert (tmp_path / "loop1" / "summary" / "metrics.json").exists()


def test_bf16_autocast_on_cpu_trains_float32_weights(tiny_model_dir, paper_dataset,
                                                     one_torch_thread):
    """training.mixed_precision=bf16 on a CPU: the steps run autocast (their loss is not
    float32's to the digit), the weights and optimizer stay float32, and the loss falls
    as in float32."""
    from torch.utils.data import DataLoader, TensorDataset

    from qpo_ray.data.io import read_dataset
    from qpo_ray.training.trainer import TorchEngine

    frame, _ = read_dataset(paper_dataset)
    losses = {}
    for precision in ("no", "bf16"):
        cfg = _cfg(tiny_model_dir, mixed_precision=precision)
        torch.manual_seed(0)
        policy = QPOPolicy.from_backbone(cfg.policy)
        enc = encode_rows(policy.tokenizer, frame["query"].tolist(), frame["prompt"].tolist(),
                          frame["reward"].tolist(), 24, 32)
        engine = TorchEngine(policy, cfg.training, lr=5e-4)
        assert engine.amp_dtype == (None if precision == "no" else torch.bfloat16)
        loader = DataLoader(TensorDataset(*enc.tensors()), batch_size=16)
        losses[precision] = [float(engine.step(as_batch(b))["loss"]) for _ in range(3)
                             for b in loader]
        assert all(p.dtype == torch.float32 for p in policy.parameters())
        assert all(v.dtype == torch.float32 for state in engine.optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    fp32, bf16 = losses["no"], losses["bf16"]
    assert fp32[0] != bf16[0] and abs(fp32[0] - bf16[0]) < 0.02 * fp32[0]
    assert bf16[-1] < bf16[0] - 1.0 and abs(bf16[-1] - fp32[-1]) < 0.15 * fp32[-1]


def test_deepspeed_zero2_checkpoint_restores_every_parameter(ray_cluster, tiny_model_dir,
                                                             paper_dataset, tmp_path):
    """Both ranks' ZeRO shards reach the checkpoint, and the fp32 weights merged from
    them equal the full module weights rank 0 held, for every parameter of the policy."""
    from pathlib import Path

    cfg = _cfg(tiny_model_dir, strategy="deepspeed", zero_stage=2, epochs_first_loop=1,
               max_steps_per_loop=3)
    result = train_policy(cfg, str(paper_dataset), str(tmp_path / "ds"), loop_index=1)
    assert result.metrics[0]["steps"] == 3

    shards = Path(result.ray_checkpoint) / "deepspeed" / "final"
    names = sorted(p.name for p in shards.iterdir())
    assert any(n.startswith("zero_pp_rank_0_") for n in names), names
    assert any(n.startswith("zero_pp_rank_1_") for n in names), names

    restored = QPOPolicy.load(result.checkpoint_dir).state_dict()
    module_state = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)["module"]
    torch.manual_seed(cfg.seed)
    fresh = QPOPolicy.from_backbone(cfg.policy).state_dict()
    assert set(restored) == set(fresh)
    for key, value in fresh.items():
        if key in module_state:
            torch.testing.assert_close(restored[key], module_state[key].float())
    changed = [k for k in fresh if not torch.equal(restored[k], fresh[k])]
    assert "reward_embed.weight" in changed and len(changed) > len(fresh) // 2

    # The merge reads shards with the weights-only unpickler: a shard carrying anything
    # but tensors and DeepSpeed's few plain types is refused, and nothing in it runs.
    import shutil

    from qpo_ray.training.deepspeed_engine import consolidate_checkpoint

    tampered = tmp_path / "tampered"
    shutil.copytree(result.ray_checkpoint, tampered)
    marker = tmp_path / "code-ran"
    shard = next((tampered / "deepspeed" / "final").glob("zero_pp_rank_0_*optim_states.pt"))
    state = torch.load(shard, map_location="cpu", weights_only=False)  # our own file
    state["extra"] = _RunsCode(marker)
    torch.save(state, shard)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        consolidate_checkpoint(tampered, QPOPolicy.from_backbone(cfg.policy))
    assert not marker.exists()


class _RunsCode:
    """Unpickling this creates a file: what a crafted shard could do with pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,precision", [("ddp", "fp16"), ("ddp", "bf16"),
                                                ("deepspeed", "bf16")])
def test_gpu_training_paths(ray_cluster, tiny_model_dir, paper_dataset, tmp_path, strategy,
                            precision):
    """NCCL DDP with autocast (fp16 + gradient scaler, bf16) and DeepSpeed on GPU workers."""
    if precision == "bf16" and not devices.bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = _cfg(tiny_model_dir, strategy=strategy, use_gpu=True, num_workers=1,
               mixed_precision=precision, epochs_first_loop=2)
    result = train_policy(cfg, str(paper_dataset), str(tmp_path / strategy), loop_index=1)
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    policy = QPOPolicy.load(result.checkpoint_dir)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert len(generate_prompts(policy, ["so happy today!"])) == 1
