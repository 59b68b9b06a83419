"""The Prompt-OIRL-style router baseline on the real tiny target's query embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qpo_ray.router import embed_texts, fit_router

GOOD = ["Bake the bread at 200 degrees for forty minutes.", "Whisk the eggs with sugar and butter.",
        "Simmer the tomato sauce with garlic and basil.", "Knead the dough until it is smooth.",
        "Fry the onions in olive oil until golden.", "Season the soup with salt and pepper."]
BAD = ["The striker scored twice in the second half.", "The goalkeeper saved a late penalty.",
       "The home team won the league on Sunday.", "The referee showed him a red card.",
       "The midfielder signed a new three-year contract.", "Fans cheered as the match ended."]


def test_query_embeddings_are_normalised_and_deterministic(tiny_model_dir, one_torch_thread):
    a = embed_texts(str(tiny_model_dir), GOOD[:3])
    b = embed_texts(str(tiny_model_dir), GOOD[:3], batch_size=1)  # padding changes nothing
    assert a.shape[0] == 3 and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_router_learns_which_prompt_pays_for_which_query(tiny_model_dir, one_torch_thread):
    """Offline data where prompt P wins on cooking queries and N on football ones: the
    router fitted on it sends held-out queries of each kind to their prompt."""
    rows = []
    for query in GOOD[:4] + BAD[:4]:
        good = query in GOOD
        rows += [{"query": query, "prompt_id": "P", "reward": 90.0 if good else 10.0},
                 {"query": query, "prompt_id": "N", "reward": 10.0 if good else 90.0}]
    fitted = fit_router(pd.DataFrame(rows), str(tiny_model_dir), folds=4)
    assert fitted.alpha in (0.01, 0.1, 1.0, 10.0, 100.0)
    assert fitted.choose(GOOD[4:] + BAD[4:]) == ["P", "P", "N", "N"]
    with pytest.raises(ValueError, match="at least 2 queries"):
        fit_router(pd.DataFrame(rows[:2]), str(tiny_model_dir))
