"""Minimum-Bayes-risk choice among scored prompts: a decoding for the test phase and Serve.

Why: trained on each query's best prompt, the policy learns which prompt *was* best on a
query, and on a label task that is nearly always a prompt that pushes the query's gold
label. Greedy decoding then bets on one label per query, so its accuracy is the
accuracy of that bet. Where the policy is unsure (0.55 / 0.45 between a prompt that
pushes "positive" and one that pushes "negative"), a prompt that lets the target read
the review is right more often than either bet. MBR decoding (Kumar & Byrne, NAACL
2004) takes the prompt with the highest expected correctness under the policy's own
belief about which prompt is best:

    choose argmax_c  sum_c' p(c' | R = target, q) * U[c, c']

- p: the policy's likelihood of each candidate c' at the target reward (teacher-forced,
  EOS included, as `ranking.candidate_logprobs`), normalised over the candidates at a
  temperature T (1 = as the policy says; `fit_temperature` below);
- U[c, c']: how often the target answered correctly with c on the offline queries whose
  best prompt (by `rank_by`) was c'.

Both come from what QPO already holds, its policy and its Step-0 data; the train stage
writes the table beside each loop's policy (`TABLE_FILE`), so that Serve decodes as the
test phase does (`serve.decoding: mbr`). Candidates: the prompts Step 0 scored on the
most queries (a wide Step 0's prompts, else every prompt; within 10% of the most, so a
few pairs lost to failed calls drop no prompt), read on the queries where all of them
were scored, so every entry of U compares prompts on the same queries.

The belief's temperature T: 1 unless set; the test phase fits it on the dev split by
maximum likelihood (`fit_temperature`, test.mbr.calibration), and Serve takes the
fitted value from the report (serve.mbr_temperature).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from qpo_ray.common.atomic import write_text_atomic

TABLE_FILE = "mbr_table.json"
# The belief temperatures `fit_temperature` tries: log-spaced, 1 (the policy's own belief)
# among them, from sharper (0.25) to nearly uniform (16).
TEMPERATURES = np.geomspace(0.25, 16.0, 49)


@dataclass(frozen=True)
class UtilityTable:
    prompts: list[str]
    # (C, C): [c, c'] = accuracy of prompt c on the queries whose best prompt was c'.
    utility: np.ndarray
    num_queries: int

    def choose(self, logprobs: np.ndarray, temperature: float = 1.0) -> list[str]:
        """Each query's mbr choice (`mbr_choice`), as prompt text."""
        return [self.prompts[i] for i in mbr_choice(logprobs, self.utility, temperature)]


def utility_table(step0: pd.DataFrame, rank_by: str, score: str = "correct") -> UtilityTable:
    """U from Step 0's scored pairs (loop 0 rows; columns query_id, prompt, `rank_by`,
    `score`). A prompt that is never a query's best gets its mean accuracy as its column
    (the belief that it is best carries no extra information then)."""
    missing = {"loop", "query_id", "prompt", rank_by, score} - set(step0.columns)
    if missing:
        raise ValueError(f"mbr decoding: Step-0 data lacks column(s) {sorted(missing)}")
    rows = step0[step0["loop"] == 0]
    counts = rows.groupby("prompt")["query_id"].nunique()
    prompts = sorted(counts[counts >= 0.9 * counts.max()].index) if len(counts) else []
    if len(prompts) < 2:
        raise ValueError("mbr decoding needs at least two prompts scored on the same "
                         f"Step-0 queries; found {len(prompts)}")
    rows = rows[rows["prompt"].isin(prompts)]
    complete = rows.groupby("query_id")["prompt"].nunique() == len(prompts)
    rows = rows[rows["query_id"].isin(complete[complete].index)]
    if rows.empty:
        raise ValueError(f"mbr decoding: no Step-0 query has all {len(prompts)} candidate "
                         "prompts scored")

    def table(column: str) -> np.ndarray:
        return rows.pivot_table(index="query_id", columns="prompt", values=column,
                                aggfunc="first")[prompts].to_numpy(dtype=float)
    correct, best = table(score), table(rank_by).argmax(axis=1)
    mean = correct.mean(axis=0)
    utility = np.stack([correct[best == j].mean(axis=0) if (best == j).any() else mean
                        for j in range(len(prompts))], axis=1)
    return UtilityTable(prompts, utility, len(correct))


def step0_table(step0_path: str | Path, rank_by: str) -> UtilityTable:
    """`utility_table` of a run's Step-0 file (dataset_loop0.parquet)."""
    from qpo_ray.data.io import read_dataset

    return utility_table(read_dataset(step0_path)[0], rank_by)


def belief(logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) softmax of each row of log-likelihoods at `temperature`."""
    if not temperature > 0:
        raise ValueError(f"mbr: the belief temperature must be > 0, got {temperature}")
    scaled = (logprobs - logprobs.max(axis=1, keepdims=True)) / temperature
    p = np.exp(scaled)
    return p / p.sum(axis=1, keepdims=True)


def mbr_choice(logprobs: np.ndarray, utility: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) index of each query's candidate with the highest expected utility, given the
    (N, C) log-likelihoods of the C candidates (in `utility`'s order)."""
    if logprobs.ndim != 2 or logprobs.shape[1] != utility.shape[0]:
        raise ValueError(f"mbr_choice: log-likelihoods of shape {logprobs.shape} for "
                         f"{utility.shape[0]} candidates")
    return (belief(logprobs, temperature) @ utility.T).argmax(axis=1)


def fit_temperature(logprobs: np.ndarray, best: np.ndarray) -> float:
    """Temperature scaling (Guo et al., ICML 2017) of the policy's belief: the T in
    `TEMPERATURES` under which the (N, C) log-likelihoods give each held-out query's
    best candidate (index in `best`) the highest likelihood. Why: trained on its
    queries' best prompts, the policy is surer on new queries than it is right, and an
    over-sure belief turns MBR back into a bet (docs/experiments.md:
    "mbr decoding")."""
    best = np.asarray(best, dtype=int)
    if logprobs.ndim != 2 or len(best) != len(logprobs) or not len(best):
        raise ValueError(f"fit_temperature: {len(best)} best candidates for log-likelihoods "
                         f"of shape {logprobs.shape}")
    rows = np.arange(len(best))
    nll = [-np.log(belief(logprobs, t)[rows, best] + 1e-12).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def save_table(table: UtilityTable, policy_dir: str | Path) -> Path:
    path = Path(policy_dir) / TABLE_FILE
    write_text_atomic(path, json.dumps({"prompts": table.prompts,
                                        "utility": table.utility.tolist(),
                                        "num_queries": table.num_queries}, indent=1))
    return path


def load_table(policy_dir: str | Path) -> Optional[UtilityTable]:
    """The table saved beside a policy; None if it has none."""
    path = Path(policy_dir) / TABLE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        prompts, utility = list(data["prompts"]), np.asarray(data["utility"], dtype=float)
        table = UtilityTable(prompts, utility, int(data["num_queries"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an mbr table ({exc})") from exc
    if utility.shape != (len(prompts), len(prompts)) or len(prompts) < 2:
        raise ValueError(f"{path}: utility of shape {utility.shape} for {len(prompts)} prompts")
    return table
