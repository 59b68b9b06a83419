"""qpo_ray.testphase.methods, method by method, on real small parts: the registry's checks,
the query-agnostic rows, the label predictors (majority; probe on the embedded model's
own features) and best_single_dev's contract."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from qpo_ray.config import ConfigError
from qpo_ray.tasks.base import Example, Splits
from qpo_ray.testphase.decoding import Predicted
from qpo_ray.testphase.methods import (METHODS, ablation_key, check_method_inputs,
                                       check_methods, method_prompts)


def test_unknown_methods_are_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['oracle'\]"):
        check_methods(["qpo", "oracle"])
    assert {"majority", "probe", "best_single_dev"} <= set(METHODS)


def test_manual_and_best_single_give_one_prompt_to_every_query(ctx, rt_task_splits, collection):
    queries = rt_task_splits[1].test[:3]
    out = method_prompts(ctx, ["manual", "best_single", "manual"], queries)
    assert list(out) == ["manual", "best_single"]
    assert out["manual"] == [(ctx.manual.id, ctx.manual.text, ctx.manual.source)] * 3
    best = collection[-1]  # the highest Step-0 R_task (tests/testphase/conftest.py)
    assert out["best_single"] == [(best.id, best.text, best.source)] * 3
    ctx.step0 = None
    with pytest.raises(ConfigError, match="best_single needs the run's Step-0 data"):
        method_prompts(ctx, ["best_single"], queries)


def test_best_single_dev_needs_the_dev_choice_and_a_dev_split(ctx, small_cfg, collection):
    with pytest.raises(ConfigError, match="best_single_dev needs the dev split's choice"):
        method_prompts(ctx, ["best_single_dev"], [Example("a", "x", 0)])
    ctx.single_on_dev = collection[2]
    got = method_prompts(ctx, ["best_single_dev"], [Example("a", "x", 0)] * 2)
    assert got["best_single_dev"] == [(collection[2].id, collection[2].text,
                                       collection[2].source)] * 2
    cfg = small_cfg.with_changes({"test": {"methods": ["best_single_dev"]}})
    check_method_inputs(cfg, collection)  # dev_queries 4: fine
    with pytest.raises(ConfigError, match="set task.dev_queries > 0"):
        check_method_inputs(cfg.with_changes({"task": {"dev_queries": 0}}), collection)
    # Left out by evaluate_run on the dev split, not refused. (small_cfg is built by hand,
    # not loaded: a config that would not validate, to reach this check alone.)
    unchecked = copy.deepcopy(small_cfg)
    unchecked.test.methods, unchecked.task.dev_queries = ["best_single_dev"], 0
    unchecked.test.split = "dev"
    check_method_inputs(unchecked, collection)


def test_majority_predicts_the_collections_most_frequent_label(ctx, rt_task_splits):
    _, splits = rt_task_splits
    counts = Counter(int(e.label) for e in splits.collection)
    out = method_prompts(ctx, ["majority"], splits.test)
    assert isinstance(out["majority"], Predicted)
    assert out["majority"].labels == [counts.most_common(1)[0][0]] * len(splits.test)
    # A collection of one label, different from the usual majority: that label.
    flipped = 1 - counts.most_common(1)[0][0]
    ctx.splits = Splits([Example(f"c{i}", "x", flipped) for i in range(3)], [], splits.test)
    assert method_prompts(ctx, ["majority"], splits.test)["majority"].labels[0] == flipped


def test_majority_and_probe_skip_a_free_text_task(ctx, capsys):
    ctx.task = copy.copy(ctx.task)
    ctx.task.label_words = ()
    assert method_prompts(ctx, ["majority", "probe"], [Example("a", "x", "1")]) == {}
    assert "majority skipped" in capsys.readouterr().out


WORDS = {1: ["wonderful", "brilliant", "delightful", "superb", "moving", "charming"],
         0: ["terrible", "boring", "awful", "dreadful", "tedious", "clumsy"]}


def _reviews(templates: list[str]) -> list[Example]:
    return [Example(f"{label}-{t}-{w}", template.format(w), label)
            for t, template in enumerate(templates) for label, words in WORDS.items()
            for w in words]


def test_probe_reads_the_summary_layers_and_labels_new_queries(ctx):
    """Fitted on the collection's labels only (never the queries it labels): on reviews
    whose sentiment word decides the label, held-out sentences come out mostly right."""
    train = _reviews(["The film was {}.", "A {} movie.", "Honestly, {}.", "It felt {} to me.",
                      "What a {} story."])
    test = _reviews(["The acting was {} throughout.", "Overall a {} experience."])
    ctx.splits = Splits(train, [], test)
    ctx.cfg = ctx.cfg.with_changes({"policy": {"query_summary": {"enable": True, "layers": 8}}})
    out = method_prompts(ctx, ["probe"], test)["probe"]
    accuracy = sum(int(y == e.label) for y, e in zip(out.labels, test)) / len(test)
    assert len(out.labels) == len(test) and set(out.labels) <= {0, 1}
    assert accuracy >= 0.75, accuracy
    # Fitted once per run: a second call reuses the probe (same predictions, no refit).
    fitted = ctx._cache["probe"]
    assert method_prompts(ctx, ["probe"], test)["probe"].labels == out.labels
    assert ctx._cache["probe"] is fitted


def test_ablation_key_follows_the_settings_an_ablation_is_trained_with(small_cfg):
    key = ablation_key(small_cfg, 2)
    assert ablation_key(copy.deepcopy(small_cfg), 2) == key
    assert ablation_key(small_cfg, 3) != key
    assert ablation_key(small_cfg.with_changes({"seed": 1}), 2) != key
