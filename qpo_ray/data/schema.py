"""The QPO dataset schema: one row per (query, prompt) pair, written as Parquet.

Three stages fill the columns: building pairs (PAIR_COLUMNS), scoring them on the
target LLM (SCORE_COLUMNS) and computing rewards (REWARD_COLUMNS). The min-max reward
scale is stored in the Parquet file's metadata (key ``qpo.reward_scale``) so later
loops reuse it.
"""

from __future__ import annotations

# column -> (pyarrow-ish type, meaning)
PAIR_COLUMNS: dict[str, tuple[str, str]] = {
    "pair_id": ("string", "unique id of the pair within the dataset"),
    "query_id": ("string", "id of the query in its task split"),
    "query": ("string", "query text as the policy sees it"),
    "prompt_id": ("string", "id of the prompt (collection id, or a hash of generated text)"),
    "prompt": ("string", "prompt text"),
    "source": ("string", "prompt's origin: collection method name, or 'policy' for augmented"),
    "label": ("string", "gold label index (label tasks) or answer (generation), as text"),
    "group": ("int64", "Step 0 group: prompts of a group share their random queries"),
    "loop": ("int64", "0 = Step 0, t >= 1 = augmentation round t"),
    "seed": ("int64", "seed the pair's demonstration sets were drawn with"),
    "demo_ids": ("list<list<string>>", "few-shot: K demonstration sets (query ids); [] zero-shot"),
}

SCORE_COLUMNS: dict[str, tuple[str, str]] = {
    "prediction": ("string", "target's answer (label index or parsed answer) on the first set"),
    "correct": ("bool", "prediction == label (zero-shot), or on the first demo set"),
    "demo_correct": ("list<bool>", "few-shot: correctness per demonstration set"),
    "label_logprobs": ("list<double>", "label tasks: log-likelihood of every label word "
                       "(first demo set), in label order; [] for generation tasks"),
    "answer_logprob": ("float64", "sum of log-probs of the output tokens"),
    "answer_num_tokens": ("int64", "tokens in the output"),
    "answer_nll": ("float64", "mean negative log-likelihood per output token"),
    "answer_ppl": ("float64", "perplexity of the output = exp(answer_nll)"),
    "prompt_tokens": ("int64", "input tokens the target read for this pair"),
    "completion_tokens": ("int64", "tokens the target generated or scored for this pair"),
}

REWARD_COLUMNS: dict[str, tuple[str, str]] = {
    "r_query": ("float64", "query-level reward (eq. 3)"),
    "r_task": ("float64", "task-level reward: the prompt's mean accuracy (eq. 2)"),
    "r_raw": ("float64", "r_query + r_task before scaling (eq. 4)"),
    "reward": ("float64", "r_raw min-max scaled to 0-100 with the dataset's stored scale"),
}

ALL_COLUMNS = {**PAIR_COLUMNS, **SCORE_COLUMNS, **REWARD_COLUMNS}

REWARD_SCALE_KEY = "qpo.reward_scale"
