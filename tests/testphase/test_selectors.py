"""The Prompt-OIRL-style router baselines on the real tiny target's query embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qpo_ray.config import ConfigError, load_config
from qpo_ray.testphase.decoding import MethodContext
from qpo_ray.testphase.methods import check_method_inputs, method_prompts
from qpo_ray.prompts import PromptRecord
from qpo_ray.testphase.selectors import PROBE_DEPTHS, embed_texts, fit_label_router, fit_router
from qpo_ray.tasks import get_task
from qpo_ray.tasks.base import Example, Splits

GOOD = ["Bake the bread at 200 degrees for forty minutes.", "Whisk the eggs with sugar and butter.",
        "Simmer the tomato sauce with garlic and basil.", "Knead the dough until it is smooth.",
        "Fry the onions in olive oil until golden.", "Season the soup with salt and pepper."]
BAD = ["The striker scored twice in the second half.", "The goalkeeper saved a late penalty.",
       "The home team won the league on Sunday.", "The referee showed him a red card.",
       "The midfielder signed a new three-year contract.", "Fans cheered as the match ended."]


def test_query_embeddings_are_normalised_and_deterministic(tiny_model_dir, one_torch_thread):
    a = embed_texts(str(tiny_model_dir), GOOD[:3])[0]
    b = embed_texts(str(tiny_model_dir), GOOD[:3], batch_size=1)[0]  # padding changes nothing
    assert a.shape[0] == 3 and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-4)
    # one read at several depths: the last is the default, a middle one another view
    deep = embed_texts(str(tiny_model_dir), GOOD[:3], (0.5, 1.0), batch_size=1)
    assert deep.shape == (2,) + a.shape
    np.testing.assert_allclose(deep[1], a, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(deep[0], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(deep[0], a, atol=1e-2)


def test_router_learns_which_prompt_pays_for_which_query(tiny_model_dir, one_torch_thread):
    """Offline data where prompt P wins on cooking queries and N on football ones: the
    router fitted on it sends held-out queries of each kind to their prompt."""
    rows = []
    for query in GOOD[:4] + BAD[:4]:
        good = query in GOOD
        rows += [{"query": query, "prompt_id": "P", "reward": 90.0 if good else 10.0},
                 {"query": query, "prompt_id": "N", "reward": 10.0 if good else 90.0}]
    fitted = fit_router(pd.DataFrame(rows), str(tiny_model_dir), folds=4)
    assert fitted.alpha in (0.01, 0.1, 1.0, 10.0, 100.0) and fitted.depth in PROBE_DEPTHS
    assert fitted.choose(GOOD[4:] + BAD[4:]) == ["P", "P", "N", "N"]
    with pytest.raises(ValueError, match="at least 2 queries"):
        fit_router(pd.DataFrame(rows[:2]), str(tiny_model_dir))


def test_label_router_sends_each_label_to_the_prompt_that_answers_it(tiny_model_dir,
                                                                     one_torch_thread):
    """Step-0 pairs where prompt P is right on label-1 (cooking) queries and N on label-0
    (football) ones: the label probe, fitted on those queries' gold labels, sends held-out
    queries of each kind to their prompt; the per-label accuracies are the hand-computed
    Laplace-smoothed ones."""
    texts = GOOD[:4] + BAD[:4]
    labels = [1] * 4 + [0] * 4
    rows = [{"prompt_id": pid, "label": str(label), "correct": (pid == "P") == (label == 1)}
            for label in labels for pid in ("P", "N")]
    fitted = fit_label_router(pd.DataFrame(rows), texts, labels, 2, str(tiny_model_dir),
                              folds=4)
    assert fitted.prompt_ids == ["N", "P"] and fitted.depth in PROBE_DEPTHS
    np.testing.assert_allclose(fitted.per_label, [[5 / 6, 1 / 6], [1 / 6, 5 / 6]])
    assert fitted.choose(GOOD[4:] + BAD[4:]) == ["P", "P", "N", "N"]
    expected = fitted.expected_correct(GOOD[4:])
    assert expected.shape == (2, 2) and (expected[:, 1] > expected[:, 0]).all()
    with pytest.raises(ValueError, match="at least 2 labels, got 4 of 1"):
        fit_label_router(pd.DataFrame(rows), GOOD[:4], [1] * 4, 2, str(tiny_model_dir),
                         folds=4)


def test_label_router_collection_fits_its_probe_on_the_collection_labels(tiny_model_dir,
                                                                         one_torch_thread):
    """Step 0 holds one query per label, too few for the Step-0 label router; the
    collection variant reads the collection's gold labels (no target call) and still
    takes the per-label accuracies from Step 0: held-out queries go to their prompt."""
    cfg = load_config(None, {"task": {"name": "rotten_tomatoes"},
                             "test": {"router_embedding_model": str(tiny_model_dir)}})
    step0 = pd.DataFrame([
        {"loop": 0, "query_id": qid, "query": text, "label": label, "prompt_id": pid,
         "correct": (pid == "P") == (label == 1)}
        for qid, text, label in (("c0", GOOD[0], 1), ("f0", BAD[0], 0)) for pid in ("P", "N")])
    collection = [Example(f"c{i}", text, 1) for i, text in enumerate(GOOD[:4])] + \
        [Example(f"f{i}", text, 0) for i, text in enumerate(BAD[:4])]
    prompts = [PromptRecord("P", "Say positive.", "test"), PromptRecord("N", "Say negative.", "test")]
    ctx = MethodContext(cfg, get_task(cfg.task), prompts, prompts[0], {}, step0=step0,
                        splits=Splits(collection=collection, demo_pool=[], test=[]))
    held_out = [Example(f"t{i}", text, 0) for i, text in enumerate(GOOD[4:] + BAD[4:])]
    rows = method_prompts(ctx, ["label_router_collection"], held_out)["label_router_collection"]
    assert [pid for pid, _, _ in rows] == ["P", "P", "N", "N"]
    assert rows[0][1] == "Say positive." and rows[0][2] == "test"
    with pytest.raises(ValueError, match="at least 5 labelled queries"):
        method_prompts(ctx, ["label_router"], held_out)


@pytest.mark.parametrize("method", ["label_router", "label_router_collection"])
def test_label_router_on_a_free_text_task_is_refused_before_any_work(method):
    cfg = load_config(None, {"task": {"name": "gsm8k"}, "test": {"methods": [method]}})
    with pytest.raises(ConfigError, match=f"{method} needs a label task; 'gsm8k'"):
        check_method_inputs(cfg, [])
