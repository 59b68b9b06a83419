"""Prompt-OIRL-style selection baselines: pick a collection prompt per query from the
target's embedding of the query.

Fitted on the offline (Step-0) data only: for each prompt, a ridge regression from the
query embedding to the pair's reward (0-100), over the queries that prompt was scored
on; a new query gets the prompt with the highest predicted reward. The ridge strength
and the depth the query is read at are chosen by 5-fold cross-validation over the
Step-0 queries (the mean reward of the prompts it would pick), never on dev or test
queries. Queries are embedded by a causal LM's hidden states at that depth, mean-pooled
over the query's tokens and L2-normalised: the target itself by default (its own
reading of the query), as in Prompt-OIRL.

`fit_label_router` knows a label task's structure instead: P(label | query) from one
ridge probe on the same model's hidden states (its depth chosen the same way, by
cross-validated accuracy), fitted on labelled queries' gold labels, times each
prompt's Step-0 accuracy on queries of each label; a query gets the prompt with the
highest expected correctness. On a small target whose prompts mostly differ in which
label they push, that shares one model across prompts where `fit_router` fits one per
prompt, and needs far fewer queries (docs/experiments.md: "Where the per-query headroom is").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from qpo_ray.config import Config

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
# The label probe's inputs are standardised (unit variance per feature), hence larger.
LABEL_ALPHAS = (1.0, 10.0, 100.0, 1000.0)
# Where in the model the routers read the query, as fractions of its layers. On
# SmolLM2-135M a review's sentiment reads best from the middle: a probe on 256 labelled
# reviews scores 1,000 other train reviews at 68% from layer 6, 77% from layer 16, 73%
# from the last (docs/experiments.md: "Where in the model the query is read"). Chosen with the ridge
# strength by cross-validation on the queries the router is fitted on.
PROBE_DEPTHS = (1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0)


def router_embedding_model(cfg: Config) -> str:
    """test.router_embedding_model, else the target (the policy backbone when the
    target is only reachable over HTTP)."""
    if cfg.test.router_embedding_model:
        return cfg.test.router_embedding_model
    return cfg.policy.backbone if cfg.target.backend == "openai" else cfg.target.model


def embed_texts(model: str, texts: Sequence[str], depths: Sequence[float] = (1.0,),
                batch_size: int = 32) -> np.ndarray:
    """(len(depths), N, H) float32: mean-pooled, L2-normalised hidden states of `model`
    at each depth, a fraction of its layers (1.0: the last hidden state, after the final
    norm), all from one read of the texts."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from qpo_ray.common.device import get_device, move
    from qpo_ray.common.models import resolve_model

    path = resolve_model(model)
    device = get_device()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = move(AutoModel.from_pretrained(path, dtype=torch.float32), device).eval()
    layers = [round(d * encoder.config.num_hidden_layers) for d in depths]
    chunks: list[list] = [[] for _ in depths]
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True,
                              truncation=True, max_length=256, return_tensors="pt")
            batch = move(dict(batch), device)
            out = encoder(**batch, output_hidden_states=any(d != 1.0 for d in depths))
            weights = batch["attention_mask"].unsqueeze(-1).float()
            for chunk, layer, depth in zip(chunks, layers, depths):
                hidden = out.last_hidden_state if depth == 1.0 else out.hidden_states[layer]
                pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
                chunk.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    if not texts:
        return np.zeros((len(depths), 0, 0), dtype=np.float32)
    return np.stack([torch.cat(chunk).numpy() for chunk in chunks])


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights (with a bias as the last row) of ridge regression y ~ x (y: (N,) or (N, K))."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    reg = alpha * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0  # the bias is not shrunk
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _fit_all(x: np.ndarray, rewards: np.ndarray, alpha: float) -> np.ndarray:
    """(H + 1, P) weights, one ridge per prompt column on its observed (non-NaN) rows."""
    weights = np.zeros((x.shape[1] + 1, rewards.shape[1]))
    for j in range(rewards.shape[1]):
        seen = ~np.isnan(rewards[:, j])
        if seen.sum() == 0:
            weights[-1, j] = -np.inf
            continue
        weights[:, j] = ridge(x[seen], rewards[seen, j], alpha)
    return weights


def predict(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ weights


def _best_depth_and_alpha(cv_score: Callable[[int, float], float],
                          alphas: Sequence[float]) -> tuple[int, float]:
    """(index into PROBE_DEPTHS, ridge strength) with the best cross-validated score; ties
    go to the first: the shallower depth, then the weaker shrinkage."""
    return max(((d, a) for d in range(len(PROBE_DEPTHS)) for a in alphas),
               key=lambda da: cv_score(*da))


@dataclass
class FittedRouter:
    model: str
    prompt_ids: list[str]
    weights: np.ndarray
    alpha: float
    depth: float  # where the router reads the query (a fraction of the model's layers)

    def choose(self, queries: Sequence[str]) -> list[str]:
        if not len(queries):
            return []
        scores = predict(embed_texts(self.model, queries, (self.depth,))[0], self.weights)
        return [self.prompt_ids[j] for j in scores.argmax(axis=1)]


def fit_router(step0: pd.DataFrame, model: str, seed: int = 0, folds: int = 5) -> FittedRouter:
    """Fit on Step-0 pairs (query, prompt_id, reward); depth and alpha by cross-validation."""
    matrix = step0.pivot_table(index="query", columns="prompt_id", values="reward",
                               aggfunc="mean")
    if matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise ValueError(f"router: Step 0 has {matrix.shape[0]} queries and "
                         f"{matrix.shape[1]} prompts; it needs at least 2 queries")
    xs = embed_texts(model, matrix.index.tolist(), PROBE_DEPTHS)
    rewards = matrix.to_numpy(dtype=float)
    order = np.random.default_rng(seed).permutation(len(rewards))
    parts = np.array_split(order, min(folds, len(rewards)))

    def cv_reward(d: int, alpha: float) -> float:
        gained = []
        for held in parts:
            train = np.setdiff1d(order, held)
            w = _fit_all(xs[d][train], rewards[train], alpha)
            picks = predict(xs[d][held], w).argmax(axis=1)
            got = rewards[held, picks]
            gained.extend(got[~np.isnan(got)])
        return float(np.mean(gained)) if gained else -np.inf

    d, alpha = _best_depth_and_alpha(cv_reward, ALPHAS)
    return FittedRouter(model, matrix.columns.tolist(), _fit_all(xs[d], rewards, alpha), alpha,
                        PROBE_DEPTHS[d])


@dataclass
class FittedLabelRouter:
    model: str
    prompt_ids: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray       # (H + 1, labels): the label probe
    per_label: np.ndarray     # (prompts, labels): Step-0 accuracy on queries of each label
    alpha: float
    depth: float              # where the probe reads the query (a fraction of the layers)

    def expected_correct(self, queries: Sequence[str]) -> np.ndarray:
        """(queries, prompts): P(label | query) @ per-label accuracy."""
        x = embed_texts(self.model, queries, (self.depth,))[0]
        scores = predict((x - self.mean) / self.std, self.weights)
        p_label = np.clip(scores, 0.0, None) + 1e-6
        p_label /= p_label.sum(axis=1, keepdims=True)
        return p_label @ self.per_label.T

    def choose(self, queries: Sequence[str]) -> list[str]:
        if not len(queries):
            return []
        return [self.prompt_ids[j] for j in self.expected_correct(queries).argmax(axis=1)]


def fit_label_router(step0: pd.DataFrame, texts: Sequence[str], labels: Sequence[int],
                     num_labels: int, model: str, prompt_ids: Optional[Sequence[str]] = None,
                     seed: int = 0, folds: int = 5) -> FittedLabelRouter:
    """The label probe on (`texts`, `labels`), its depth and ridge strength by
    cross-validated accuracy over them; per-label accuracy of `prompt_ids` (default: every
    Step-0 prompt) from the Step-0 pairs (prompt_id, label, correct), Laplace-smoothed."""
    if len(texts) < folds or len(set(labels)) < 2:
        raise ValueError(f"label router: needs at least {folds} labelled queries of at least "
                         f"2 labels, got {len(texts)} of {len(set(labels))}")
    at_depth = embed_texts(model, texts, PROBE_DEPTHS)
    mean, std = at_depth.mean(axis=1), at_depth.std(axis=1) + 1e-6
    xs = (at_depth - mean[:, None]) / std[:, None]
    y = np.eye(num_labels)[np.asarray(labels, dtype=int)]
    parts = np.array_split(np.random.default_rng(seed).permutation(len(texts)), folds)

    def cv_accuracy(d: int, alpha: float) -> float:
        x = xs[d]
        hits = [predict(x[held], ridge(np.delete(x, held, 0), np.delete(y, held, 0), alpha))
                .argmax(axis=1) == y[held].argmax(axis=1) for held in parts]
        return float(np.concatenate(hits).mean())

    d, alpha = _best_depth_and_alpha(cv_accuracy, LABEL_ALPHAS)
    label = step0["label"].astype(int)
    hits = step0["correct"].astype(float).groupby([step0["prompt_id"], label]).sum()
    seen = step0["correct"].groupby([step0["prompt_id"], label]).size()
    ids = list(prompt_ids) if prompt_ids is not None else sorted(set(step0["prompt_id"]))
    per_label = ((hits + 1) / (seen + 2)).unstack().reindex(index=ids,
                                                            columns=range(num_labels))
    return FittedLabelRouter(model, ids, mean[d], std[d], ridge(xs[d], y, alpha),
                             per_label.fillna(0.5).to_numpy(), alpha, PROBE_DEPTHS[d])


def fit_label_router_on_step0(step0: pd.DataFrame, num_labels: int, model: str,
                              seed: int = 0) -> FittedLabelRouter:
    """The label router as a baseline: its probe fitted on the Step-0 queries' own gold
    labels, i.e. on exactly the queries QPO's dataset holds."""
    labelled = step0.drop_duplicates("query_id")
    return fit_label_router(step0, labelled["query"].tolist(),
                            labelled["label"].astype(int).tolist(), num_labels, model,
                            seed=seed)
