"""The reference rows that predict the label themselves (majority, probe), their rows in
the predictions, and the label shares and prompt-origin columns of the results table:
on small synthetic data, where the right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qpo_ray.tasks.base import Example
from qpo_ray.testphase.evaluate import predicted_rows
from qpo_ray.testphase.references import fit_probe, majority_label
from qpo_ray.testphase.render import label_shares, markdown, results_table


def test_majority_is_the_most_frequent_label_ties_to_the_smallest():
    assert majority_label([2, 1, 2, 0, 2, 1]) == 2
    assert majority_label([3, 1, 1, 3]) == 1
    with pytest.raises(ValueError, match="no labelled query"):
        majority_label([])


def test_probe_reads_a_linear_signal_and_beats_majority_on_held_out_points():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 3
    y = rng.choice(3, size=300, p=[0.6, 0.25, 0.15])
    x = centres[y] + rng.normal(size=(300, 20))
    probe = fit_probe(x[:200], y[:200], seed=0)
    held = probe.predict(x[200:])
    assert (held == y[200:]).mean() > 0.9
    assert (held == y[200:]).mean() > (y[200:] == majority_label(y[:200].tolist())).mean() + 0.2
    assert probe.c in (0.001, 0.01, 0.1, 1.0)
    # One label in the collection: the probe is that label.
    one = fit_probe(x[:10], [1] * 10)
    assert one.predict(x[:4]).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="3 feature rows for 2 labels"):
        fit_probe(x[:3], [0, 1])


def _queries(labels):
    return [Example(f"q{i}", f"text {i}", y) for i, y in enumerate(labels)]


def test_predicted_rows_have_no_prompt_and_score_against_gold():
    queries = _queries([0, 1, 1, 0])
    rows = predicted_rows(queries, "majority", [1, 1, 1, 1], shots=0, split="test")
    assert rows["correct"].tolist() == [False, True, True, False]
    assert rows["accuracy"].mean() == 0.5
    assert set(rows["prompt"]) == {""} and set(rows["prompt_id"]) == {""}
    assert rows["prediction"].tolist() == ["1"] * 4 and rows["label"].tolist() == ["0", "1", "1", "0"]
    with pytest.raises(ValueError, match="3 predictions for 4 queries"):
        predicted_rows(queries, "probe", [0, 1, 1], 0, "test")


def test_results_table_has_label_shares_paired_direct_rows_and_prompt_origin():
    words = ("negative", "positive")
    gold = [0, 1, 1, 0, 1, 1, 0, 1]
    queries = _queries(gold)
    collection = ["Is it positive or negative?", "Sentiment (positive/negative):"]
    qpo_prompts = [collection[0]] * 4 + ["A new prompt: positive or negative?"] * 4
    qpo_pred = [0, 1, 1, 0, 1, 1, 1, 1]  # right on 7 of 8; the new prompts on 3 of 4
    qpo = pd.DataFrame({
        "shots": 0, "method": "qpo", "query_id": [q.id for q in queries],
        "label": [str(y) for y in gold], "prompt_id": [f"p{i % 2}" for i in range(8)],
        "prompt": qpo_prompts, "prediction": [str(y) for y in qpo_pred],
        "accuracy": [float(a == b) for a, b in zip(qpo_pred, gold)]})
    manual = qpo.assign(method="manual", prompt_id="m", prompt=collection[1],
                        prediction="0", accuracy=[float(y == 0) for y in gold])
    majority = predicted_rows(queries, "majority", [1] * 8, 0, "test")
    probe = predicted_rows(queries, "probe", gold, 0, "test")
    pred = pd.concat([qpo, manual, majority, probe], ignore_index=True)
    table = results_table(pred, words, collection=collection).set_index("method")

    assert table.loc["manual", "pred_share:negative"] == 1.0
    assert table.loc["qpo", "pred_share:positive"] == pytest.approx(6 / 8)
    assert table.loc["majority", "gold_share:positive"] == pytest.approx(5 / 8)
    assert table.loc["probe", "accuracy"] == 1.0 and table.loc["probe", "distinct_prompts"] == 0
    assert table.loc["qpo", "diff_vs_majority"] == pytest.approx(7 / 8 - 5 / 8)
    assert table.loc["qpo", "diff_vs_probe"] == pytest.approx(-1 / 8)
    assert table.loc["qpo", "non_collection_share"] == 0.5
    assert table.loc["qpo", "non_collection_accuracy"] == pytest.approx(3 / 4)
    assert table.loc["qpo", "collection_prompt_accuracy"] == 1.0
    assert "non_collection_share" not in table.columns[table.loc["manual"].notna()]

    report = markdown(table.reset_index(), pd.DataFrame(), ["## report"], label_words=words)
    assert "| gold | 38 | 62 |" in report and "| manual | 100 | 0 |" in report
    assert "qpo vs probe (no prompt, no target call): -12.5" in report
    assert "not collection prompts: 50% of queries, accuracy 75.0% (collection prompts: 100.0%)" \
        in report
    assert "| majority | 62.5 |" in report and "none: predicts the label itself" in report


def test_label_shares_ignore_unparsed_predictions_and_free_text_tasks():
    part = pd.DataFrame({"prediction": ["0", "2", "x", None]})
    assert label_shares(part, "prediction", ("a", "b", "c")) == {"a": 0.25, "b": 0.0, "c": 0.25}
    assert label_shares(part, "prediction", ()) == {}
    assert label_shares(part, "label", ("a",)) == {}
