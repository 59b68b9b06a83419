"""mbr decoding (qpo_ray/policy/mbr.py): the utility table from Step-0 rows and the
expected-correctness choice, on a table small enough to compute by hand."""

import numpy as np
import pandas as pd
import pytest

from qpo_ray.policy.mbr import fit_temperature, mbr_choice, utility_table

POS, NEG, READ, RARE = "Say positive.", "Say negative.", "Read it, then answer.", "Rare."


def step0_rows() -> pd.DataFrame:
    """Ten queries, five of each label. POS is right on every positive and confident,
    NEG on every negative; READ is right on 4 of 5 of each, never the most confident.
    RARE was scored on two queries only (not a candidate); query q10 lacks READ (left
    out of the table: every entry compares prompts on the same queries; READ, one query
    short of the most, is still a candidate)."""
    rows = []
    for i in range(10):
        positive = i < 5
        for prompt, right, r_query in (
                (POS, positive, 0.97 if positive else 0.03),
                (NEG, not positive, 0.03 if positive else 0.97),
                (READ, i not in (0, 5), 0.7 if i not in (0, 5) else 0.3)):
            rows.append((f"q{i}", prompt, float(right), r_query))
        if i < 2:
            rows.append((f"q{i}", RARE, 1.0, 0.99 if i == 0 else 0.01))
    rows.append(("q10", POS, 1.0, 0.97))
    rows.append(("q10", NEG, 0.0, 0.03))
    frame = pd.DataFrame(rows, columns=["query_id", "prompt", "correct", "r_query"])
    return frame.assign(loop=0, reward=frame["r_query"] * 100)


def test_utility_is_each_prompts_accuracy_where_each_candidate_was_best():
    table = utility_table(step0_rows(), "r_query")
    assert table.prompts == sorted([POS, NEG, READ]) and table.num_queries == 10
    u = pd.DataFrame(table.utility, index=table.prompts, columns=table.prompts)
    # Best on q0..q4 is POS (the positives), on q5..q9 NEG; READ is never best, so its
    # column is each prompt's mean accuracy over the ten queries.
    assert u.loc[POS, POS] == 1.0 and u.loc[NEG, POS] == 0.0 and u.loc[READ, POS] == 0.8
    assert u.loc[POS, NEG] == 0.0 and u.loc[NEG, NEG] == 1.0 and u.loc[READ, NEG] == 0.8
    assert u.loc[POS, READ] == 0.5 and u.loc[NEG, READ] == 0.5 and u.loc[READ, READ] == 0.8


def test_an_unsure_policy_gets_the_prompt_that_reads_a_sure_one_its_bet():
    table = utility_table(step0_rows(), "r_query")
    at = {p: i for i, p in enumerate(table.prompts)}

    def logprobs(p_pos: float, p_neg: float) -> np.ndarray:
        row = np.full(3, np.log(1e-6))
        row[at[POS]], row[at[NEG]] = np.log(p_pos), np.log(p_neg)
        return row + 3.0  # an unnormalised log-likelihood: only differences count
    picks = mbr_choice(np.stack([logprobs(0.5, 0.5), logprobs(0.95, 0.05),
                                 logprobs(0.1, 0.9)]), table.utility)
    # Expected correctness: 50/50 -> POS 0.5, NEG 0.5, READ 0.8; 95/5 -> POS 0.95.
    assert [table.prompts[i] for i in picks] == [READ, POS, NEG]


def test_a_warmer_belief_hedges_a_sure_bet():
    table = utility_table(step0_rows(), "r_query")
    at = {p: i for i, p in enumerate(table.prompts)}
    sure = np.full((1, 3), np.log(1e-6))
    sure[0, at[POS]], sure[0, at[NEG]] = np.log(0.95), np.log(0.05)
    # At T = 1: POS 0.95 vs READ 0.8. At T = 4 the belief is ~0.67 / 0.33 (the
    # 1e-6 READ gets ~0.02): POS ~0.67, READ ~0.80 -> READ.
    assert table.prompts[mbr_choice(sure, table.utility)[0]] == POS
    assert table.prompts[mbr_choice(sure, table.utility, temperature=4.0)[0]] == READ
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mbr_choice(sure, table.utility, temperature=0.0)


def test_fit_temperature_recovers_how_over_sure_a_belief_is():
    """Best candidates drawn from softmax(z); a policy that reports 3 z is over-sure by
    a factor 3, one that reports z / 2 under-sure by 2: the likelihood of the draws
    peaks at T ~ 3, resp. ~ 0.5; a policy that reports z gets T ~ 1."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    best = np.array([rng.choice(5, p=row) for row in p])
    for scale, expected in ((3.0, 3.0), (1.0, 1.0), (0.5, 0.5)):
        assert fit_temperature(scale * z, best) == pytest.approx(expected, rel=0.12)
    with pytest.raises(ValueError, match="3 best candidates"):
        fit_temperature(z, best[:3])


def test_bad_inputs_name_what_is_missing():
    with pytest.raises(ValueError, match="r_query"):
        utility_table(step0_rows().drop(columns=["r_query"]), "r_query")
    one = step0_rows().query("prompt == @POS")
    with pytest.raises(ValueError, match="at least two prompts"):
        utility_table(one, "r_query")
    # Each prompt on its own queries: no query compares the candidates.
    apart = step0_rows().assign(query_id=lambda f: f["query_id"] + f["prompt"])
    with pytest.raises(ValueError, match="no Step-0 query has all 3"):
        utility_table(apart, "r_query")
    with pytest.raises(ValueError, match="3 candidates"):
        mbr_choice(np.zeros((2, 4)), np.eye(3))
