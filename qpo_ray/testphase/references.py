"""Reference rows that predict the label themselves, with no prompt and no target call:
what a per-query prompt choice has to beat before the target's own answer counts.

- ``majority``: the collection's most frequent gold label, for every query.
- ``probe``: a logistic regression on the frozen features the policy's query summary
  reads (the backbone's first `policy.query_summary.num_layers` pretrained layers,
  mean-pooled over the query's tokens, qpo_ray.policy.summary), fitted on the
  collection's gold labels. Routing among prompts that each push one label can act as
  such a side classifier (issue #41: a probe beat every prompt-based row on two tasks).

Both read only collection labels (never dev or test ones) and are fitted once per run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Inverse regularisation strengths the probe chooses among by stratified 5-fold
# cross-validation on the collection (its features are standardised first).
PROBE_CS = (0.001, 0.01, 0.1, 1.0)


def majority_label(labels: Sequence[int]) -> int:
    """The most frequent label; ties go to the smallest label index (deterministic)."""
    if not len(labels):
        raise ValueError("majority: the collection has no labelled query")
    counts = Counter(int(y) for y in labels)
    return min(counts, key=lambda y: (-counts[y], y))


def probe_layers(backbone: str, summary_layers: int) -> int:
    """The layers the probe reads: the query summary's, else half the backbone's (a
    review's sentiment reads best from the middle of SmolLM2: docs/experiments.md)."""
    if summary_layers:
        return summary_layers
    from transformers import AutoConfig

    from qpo_ray.common.models import resolve_model

    return max(1, AutoConfig.from_pretrained(resolve_model(backbone)).num_hidden_layers // 2)


def summary_features(backbone: str, layers: int, max_query_tokens: int,
                     texts: Sequence[str]) -> np.ndarray:
    """(N, H) float32: what QuerySummary.read gives the policy for these queries (the
    same tokenisation, truncation and pooling), before its PCA and adapter."""
    from transformers import AutoConfig, AutoTokenizer

    from qpo_ray.common.device import get_device
    from qpo_ray.common.models import resolve_model
    from qpo_ray.policy.batching import encode_queries
    from qpo_ray.policy.summary import QuerySummary

    path = resolve_model(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hidden = AutoConfig.from_pretrained(path).hidden_size
    reader = QuerySummary(backbone, layers, dims=1, hidden=hidden)
    ids, mask = encode_queries(tokenizer, list(texts), max_query_tokens)
    device = get_device()
    return reader.read(ids.to(device), mask.to(device)).cpu().numpy().astype(np.float32)


@dataclass
class FittedProbe:
    """A fitted label probe: `predict` gives label indices."""

    model: object  # an sklearn Pipeline, or None when the collection has one label
    constant: int
    c: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            return np.full(len(x), self.constant, dtype=int)
        return np.asarray(self.model.predict(x), dtype=int)


def fit_probe(x: np.ndarray, y: Sequence[int], seed: int = 0) -> FittedProbe:
    """Standardise, then logistic regression with C chosen by stratified k-fold
    cross-validated accuracy on (x, y) alone (k = 5, fewer when a label has fewer
    queries; ties to the smaller C). sklearn's LogisticRegressionCV is not used: its
    defaults and fitted attributes are changing across 1.9-1.11."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=int)
    if len(x) != len(y) or not len(y):
        raise ValueError(f"probe: {len(x)} feature rows for {len(y)} labels")
    counts = Counter(y.tolist())
    if len(counts) == 1:
        return FittedProbe(None, int(y[0]), float("nan"))

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    folds = min(5, min(counts.values()))
    if folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        scores = [cross_val_score(model(c), x, y, cv=cv, scoring="accuracy").mean()
                  for c in PROBE_CS]
        c = PROBE_CS[int(np.argmax(scores))]
    else:  # a label seen once: nothing to cross-validate on
        c = PROBE_CS[1]
    return FittedProbe(model(c).fit(x, y), majority_label(y.tolist()), c)
