"""Test-phase methods: which prompt each method gives each query (qpo_ray.testphase.evaluate scores
them on the target). One registry, name -> a small function; adding a method is one
function plus one line in `METHODS`.

A method returns {row name: one (id, text, source) per query}; most return one row,
`qpo` also returns `qpo_loop<t>` rows for the other loops' policies.

- ``qpo``: the policy of the loop chosen on the dev split, with the decoding chosen
  there (``Choice``: greedy, rank or mbr, see `policy_prompts`); ``qpo_loop<t>``: every
  other loop's policy, same decoding, to show what each loop adds. Without a dev split:
  the last loop, `test.decoding`.
- ``qpo_greedy``: the paper's test protocol as is: the last loop, greedy at reward 100.
- ``manual``: the collection's manual (PromptSource-style) prompt.
- ``best_single``: the prompt with the best Step-0 R_task (every prompt scored on the
  same collection queries), chosen without the test set.
- ``router``: a Prompt-OIRL-style selection baseline: per query, the collection prompt
  whose reward a model fitted on the offline (Step-0) data predicts highest from the
  target's embedding of the query (qpo_ray.testphase.selectors).
- ``label_router`` (label tasks): the collection prompt with the highest expected
  correctness, P(label | query) from a probe on the target's embedding fitted on the
  Step-0 queries' gold labels, times each prompt's Step-0 accuracy per label
  (qpo_ray.testphase.selectors.fit_label_router): it sees the same queries QPO's dataset holds.
- ``label_router_collection`` (label tasks): the same with its probe fitted on every
  collection query's gold label (the dev split is not in the collection): labels the
  user has anyway, read without any target call; Step 0 still gives the per-label
  accuracies. The strongest cheap per-query selector here, not QPO.
- ``nearest_neighbour`` (paper Table 5): the best-reward prompt of the most similar
  training query, embedded by the policy.
- ``sft`` (Table 4) and ``qpo_no_mla`` (Figure 3): policies trained on D_0 with
  `policy.mode=sft`, resp. QPO's loop schedule without augmentation.
- ``best_single_dev``: the collection prompt most accurate on the dev split (every
  collection prompt scored there by qpo_ray.testphase.evaluate): the fixed prompt a
  user with a dev split would pick, the one QPO must beat.
- ``majority`` and ``probe`` (label tasks; skipped, with a line, on free-text ones):
  no prompt, no target call; the collection's most frequent label, resp. a linear
  probe of the features the query summary reads (qpo_ray.testphase.references). They
  return `Predicted` labels instead of prompts.
- ``best_single_oracle``: every collection prompt on the test set and the best of them
  picked there: an UPPER BOUND for any query-agnostic choice, never a baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from qpo_ray.common.console import log
from qpo_ray.config import Config, ConfigError
from qpo_ray.testphase.decoding import (Choice, MethodContext, Predicted, PromptTuple,
                                        policy_prompts)
from qpo_ray.prompts import PromptRecord
from qpo_ray.common.atomic import write_json_atomic
from qpo_ray.common.layout import RunFiles, read_json
from qpo_ray.training.loop import train_loop
from qpo_ray.policy.mbr import step0_table
from qpo_ray.tasks.base import Example


def _choice(ctx: MethodContext) -> Choice:
    if ctx.choice is not None:
        return ctx.choice
    decoding = ctx.cfg.test.decoding
    return Choice(ctx.last_loop, "greedy" if decoding == "dev" else decoding)


# -- the methods --------------------------------------------------------------------------

def qpo(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    choice = _choice(ctx)
    out = {"qpo": policy_prompts(ctx, choice.loop, choice.decoding, queries)}
    for loop in ctx.policy_dirs:
        out[f"qpo_loop{loop}"] = policy_prompts(ctx, loop, choice.decoding, queries)
    return out


def qpo_greedy(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    return {"qpo_greedy": policy_prompts(ctx, ctx.last_loop, "greedy", queries)}


def manual(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    m = ctx.manual
    return {"manual": [(m.id, m.text, m.source)] * len(queries)}


def best_single(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    if ctx.step0 is None:
        raise ConfigError("test.methods: best_single needs the run's Step-0 data (R_task "
                          "per prompt): evaluate a run directory")
    best = ctx.ranked_collection()[0]
    return {"best_single": [(best.id, best.text, best.source)] * len(queries)}


def best_single_dev(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    best = ctx.single_on_dev
    if best is None:
        raise ConfigError("test.methods: best_single_dev needs the dev split's choice "
                          "(task.dev_queries > 0; chosen by evaluate_run)")
    return {"best_single_dev": [(best.id, best.text, best.source)] * len(queries)}


def _collection_labels(ctx: MethodContext, name: str) -> Optional[list[Example]]:
    """The collection's labelled queries; None (with a line) on a free-text task."""
    if not ctx.task.label_words:
        log.info(f"test: {name} skipped: {ctx.task.name!r} answers free text")
        return None
    if ctx.splits is None:
        raise ConfigError(f"test.methods: {name} needs the task's splits (its collection)")
    return list(ctx.splits.collection)


def majority(ctx: MethodContext, queries: list[Example]) -> dict[str, Predicted]:
    from qpo_ray.testphase.references import majority_label

    labelled = _collection_labels(ctx, "majority")
    if labelled is None:
        return {}
    label = majority_label([int(e.label) for e in labelled])
    return {"majority": Predicted([label] * len(queries))}


def probe(ctx: MethodContext, queries: list[Example]) -> dict[str, Predicted]:
    from qpo_ray.testphase.references import fit_probe, probe_layers, summary_features

    labelled = _collection_labels(ctx, "probe")
    if labelled is None:
        return {}
    p = ctx.cfg.policy
    layers = probe_layers(p.backbone, p.query_summary.num_layers)

    def features(examples: list[Example]) -> np.ndarray:
        return summary_features(p.backbone, layers, p.max_query_tokens,
                                [e.text for e in examples])
    if "probe" not in ctx._cache:
        ctx._cache["probe"] = fit_probe(features(labelled), [int(e.label) for e in labelled],
                                        seed=ctx.cfg.seed)
        log.info(f"test: probe reads the first {layers} layers of {p.backbone}, "
                 f"fitted on {len(labelled)} collection labels (C={ctx._cache['probe'].c:g}, "
                 "cross-validated there)")
    return {"probe": Predicted(ctx._cache["probe"].predict(features(queries)).tolist())}


def best_single_oracle(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    # Rows single:<id>; report.py marks the best of them on the test set as the bound.
    return {f"single:{r.id}": [(r.id, r.text, r.source)] * len(queries) for r in ctx.collection}


def router(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    from qpo_ray.testphase.selectors import fit_router, router_embedding_model

    if ctx.step0 is None:
        raise ConfigError("test.methods: router needs the run's Step-0 data (its training "
                          "set): evaluate a run directory")
    model = router_embedding_model(ctx.cfg)
    key = ("router", model)
    if key not in ctx._cache:
        ctx._cache[key] = fit_router(ctx.step0[ctx.step0["loop"] == 0], model,
                                     seed=ctx.cfg.seed)
        _say_depth("router", ctx._cache[key])
    fitted = ctx._cache[key]
    by_id = {r.id: r for r in ctx.collection}
    picks = fitted.choose([q.text for q in queries])
    return {"router": [(by_id[p].id, by_id[p].text, by_id[p].source) for p in picks]}


def _say_depth(name: str, fitted) -> None:
    log.info(f"test: {name} reads the query at {fitted.depth:.0%} of the model's layers, "
             f"ridge {fitted.alpha:g} (both cross-validated)")


def _needs_labels(task, name: str) -> None:
    if not task.label_words:
        raise ConfigError(f"test.methods: {name} needs a label task; "
                          f"{task.name!r} answers free text")


def _label_router(name: str, ctx: MethodContext, queries: list[Example],
                  labelled: Optional[list[Example]]) -> dict[str, list[PromptTuple]]:
    """The label router's picks; its probe fitted on `labelled` (None: the Step-0
    queries' own gold labels)."""
    from qpo_ray.testphase.selectors import (fit_label_router, fit_label_router_on_step0,
                                router_embedding_model)

    if ctx.step0 is None:
        raise ConfigError(f"test.methods: {name} needs the run's Step-0 data: "
                          "evaluate a run directory")
    _needs_labels(ctx.task, name)
    model = router_embedding_model(ctx.cfg)
    key = (name, model)
    if key not in ctx._cache:
        step0, num_labels = ctx.step0[ctx.step0["loop"] == 0], len(ctx.task.label_words)
        ctx._cache[key] = (
            fit_label_router_on_step0(step0, num_labels, model, seed=ctx.cfg.seed)
            if labelled is None else
            fit_label_router(step0, [e.text for e in labelled], [int(e.label) for e in labelled],
                             num_labels, model, seed=ctx.cfg.seed))
        _say_depth(name, ctx._cache[key])
    by_id = {r.id: r for r in ctx.collection}
    picks = ctx._cache[key].choose([q.text for q in queries])
    return {name: [(by_id[p].id, by_id[p].text, by_id[p].source) for p in picks]}


def label_router(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    return _label_router("label_router", ctx, queries, None)


def label_router_collection(ctx: MethodContext,
                            queries: list[Example]) -> dict[str, list[PromptTuple]]:
    if ctx.splits is None:
        raise ConfigError("test.methods: label_router_collection needs the task's splits")
    return _label_router("label_router_collection", ctx, queries, list(ctx.splits.collection))


def nearest_neighbour(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
    from qpo_ray.data.io import read_dataset
    from qpo_ray.policy import QPOPolicy, embed_queries

    if ctx.run is None:
        raise ConfigError("test.methods: nearest_neighbour needs a run directory (its "
                          "training queries)")
    dataset, _ = read_dataset(ctx.run.dataset_path(ctx.last_loop))
    best = dataset.sort_values("reward", ascending=False).drop_duplicates("query")
    policy = QPOPolicy.load(ctx.policy_dirs[ctx.last_loop])
    train_emb = embed_queries(policy, best["query"].tolist())
    test_emb = embed_queries(policy, [q.text for q in queries])
    rows = best.iloc[np.argmax(test_emb @ train_emb.T, axis=1)]
    return {"nearest_neighbour": list(zip(rows["prompt_id"], rows["prompt"],
                                          ["nearest_neighbour"] * len(rows)))}


def _ablation(name: str) -> Callable[[MethodContext, list[Example]], dict]:
    def method(ctx: MethodContext, queries: list[Example]) -> dict[str, list[PromptTuple]]:
        directory = ablation_policy(ctx.cfg, ctx.run, name)
        return {name: policy_prompts(ctx, 0, "greedy", queries, source=name,
                                     policy_dir=directory)}
    return method


# The methods that train a policy of their own (train_method_policies).
ABLATIONS = ("sft", "qpo_no_mla")
# Reference rows that predict the label themselves: no prompt, no target call.
NO_TARGET_CALL = ("majority", "probe")

METHODS: dict[str, Callable[[MethodContext, list[Example]],
                             dict[str, list[PromptTuple] | Predicted]]] = {
    "qpo": qpo,
    "qpo_greedy": qpo_greedy,
    "manual": manual,
    "best_single": best_single,
    "best_single_dev": best_single_dev,
    "majority": majority,
    "probe": probe,
    "router": router,
    "label_router": label_router,
    "label_router_collection": label_router_collection,
    "nearest_neighbour": nearest_neighbour,
    "sft": _ablation("sft"),
    "qpo_no_mla": _ablation("qpo_no_mla"),
    "best_single_oracle": best_single_oracle,
}


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"test.methods: unknown method(s) {unknown} (known: {list(METHODS)})")


def check_method_inputs(cfg: Config, collection: list[PromptRecord]) -> None:
    """What the configured methods take from the config, checked before Step 0 spends
    anything (the rest they take from the run itself): the manual prompt, the router's
    embedding model."""
    from qpo_ray.backends import check_model
    from qpo_ray.prompts import manual_prompt
    from qpo_ray.testphase.selectors import router_embedding_model
    from qpo_ray.tasks import get_task

    check_methods(cfg.test.methods)
    if "manual" in cfg.test.methods:
        manual_prompt(collection, cfg.prompts)
    # (With test.split: dev, evaluate_run leaves best_single_dev out, saying so.)
    if "best_single_dev" in cfg.test.methods and cfg.test.split == "test" \
            and cfg.task.dev_queries == 0:
        raise ConfigError("test.methods: best_single_dev is chosen on the dev split; "
                          "set task.dev_queries > 0")
    labelled = {"label_router", "label_router_collection"} & set(cfg.test.methods)
    if labelled:
        _needs_labels(get_task(cfg.task), sorted(labelled)[0])
    if {"router", *labelled} & set(cfg.test.methods):
        key = ("test.router_embedding_model" if cfg.test.router_embedding_model else
               "test.router_embedding_model (unset: the target's model)")
        check_model(router_embedding_model(cfg), key)


def train_method_policies(ctx: MethodContext, methods: list[str]) -> None:
    """Train (or find cached) the policies of the methods that train one (sft,
    qpo_no_mla) before anything is scored: training asks Ray for the CPUs/GPUs the target
    engines hold from their first scoring call to the end of the stage, so training after
    a dev choice waited forever on one GPU (issue #39)."""
    for name in dict.fromkeys(methods):
        if name in ABLATIONS:
            ablation_policy(ctx.cfg, ctx.run, name)


def method_prompts(ctx: MethodContext, methods: list[str],
                   queries: list[Example]) -> dict[str, list[PromptTuple] | Predicted]:
    """Every configured method's prompts for `queries` (row name -> one per query), or
    its own label predictions (`Predicted`) for the rows that need no prompt."""
    check_methods(methods)
    out: dict[str, list[PromptTuple] | Predicted] = {}
    for name in dict.fromkeys(methods):
        out.update(METHODS[name](ctx, queries))
    return out


# -- ablation policies: trained on D_0 by the train stage's own function ------------------

def ablation_key(cfg: Config, loops: int) -> str:
    """What an ablation's checkpoint depends on: the policy, training and seed settings
    and the number of loops (D_0 is fixed per run directory)."""
    data = {"policy": dataclasses.asdict(cfg.policy),
            "training": dataclasses.asdict(cfg.training), "seed": cfg.seed, "loops": loops}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _train_once(cfg: Config, dataset: Path, out_dir: Path, loops: int,
                candidates: Optional[list[str]]) -> str:
    """`loops` train stages on one fixed dataset, cached under `out_dir` for as long as
    the settings it was trained with (its config key) stay the same."""
    marker, key = out_dir / "done.json", ablation_key(cfg, loops)
    if marker.exists() and read_json(marker).get("config_key") == key:
        return read_json(marker)["checkpoint_dir"]
    checkpoint: Optional[str] = None
    for loop in range(1, loops + 1):
        trained = train_loop(cfg, loop, dataset, out_dir / f"loop{loop}", checkpoint,
                             label=f"{out_dir.name} train_{loop}", candidates=candidates)
        checkpoint = trained.checkpoint_dir
    write_json_atomic(marker, {"checkpoint_dir": checkpoint, "config_key": key})
    return checkpoint


def ablation_policy(cfg: Config, run: Optional[RunFiles], method: str) -> str:
    """The checkpoint of the `sft` or `qpo_no_mla` ablation, trained on D_0."""
    if run is None:
        raise ConfigError(f"test.methods: {method} needs a run directory (it trains on D_0)")
    dataset = run.dataset_path(1)
    if not dataset.exists():
        raise FileNotFoundError(f"{method} needs the run's D_0 ({dataset})")
    # mbr's prompts, which a summary phase stopped early reads its belief over.
    summary = cfg.training.summary
    candidates = (step0_table(run.step0_path(), cfg.training.best_row_column).prompts
                  if summary.epochs and summary.holdout else None)
    if method == "sft":
        sft_cfg = cfg.with_changes({"policy": {"mode": "sft"}})
        return _train_once(sft_cfg, dataset, run.path / "baselines" / "sft", 1, candidates)
    return _train_once(cfg, dataset, run.path / "baselines" / "qpo_no_mla",
                       cfg.loop.num_loops, candidates)
