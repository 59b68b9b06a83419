"""Import the QPO paper's published offline datasets (github KongYilun/QPO, data/<task>/).

The file is a JSON list of ``{prompt_method, query, label, prompt, <target>: {...}}``;
for few-shot files the target entry holds ``few_shot_accuracy`` (R_query: mean
correctness over the demonstration sets) and ``few_shot_avg_acc`` (R_task: the prompt's
mean accuracy), for zero-shot ones ``zero_shot_*`` with the same meaning. Prompts end in
GPT-2's ``<|endoftext|>``, stripped here (the policy appends its own EOS). The rows keep
`loop` 0 and `group` 0; score columns are empty (only the rewards were published) and
`demo_ids` is [] (the demonstration sets were not published).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from qpo_ray.data.rewards import RewardScale
from qpo_ray.data.schema import PAIR_COLUMNS, SCORE_COLUMNS
from qpo_ray.prompts import prompt_id
from qpo_ray.tasks import TASKS

END_OF_TEXT = "<|endoftext|>"
REWARD_KEYS = (("few_shot_accuracy", "few_shot_avg_acc"),
               ("zero_shot_accuracy", "zero_shot_avg_acc"))


def query_id(text: str) -> str:
    """Stable id of an imported query (the file has no ids)."""
    return "q-" + prompt_id(text)[2:]


def _label_words_for(path: Path) -> Sequence[str]:
    """The label words of the built-in task the file is named after (tweet_emotion_...)."""
    for name in sorted(TASKS, key=len, reverse=True):
        if path.name.startswith(name + "_") and name != "byo":
            return tuple(TASKS[name].label_words)
    return ()


def _label(value: Any, label_words: Sequence[str], where: str) -> str:
    """The label as the index text "0".."n-1" when it maps to the task's label words."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: label {value!r} is neither an integer nor a string")
    text = str(value).strip()
    lowered = [w.lower() for w in label_words]
    if text.lower() in lowered:
        return str(lowered.index(text.lower()))
    if label_words and text.lstrip("-").isdigit() and not 0 <= int(text) < len(label_words):
        raise ValueError(f"{where}: label {text} out of range 0..{len(label_words) - 1}")
    return text


def import_paper_json(path: str | Path, target_key: str = "llama7b",
                      label_words: Optional[Sequence[str]] = None
                      ) -> tuple[pd.DataFrame, RewardScale]:
    """The published dataset as a frame with PAIR, SCORE and REWARD columns, and the
    reward scale fitted on it (the file is already expert-filtered, so the scale spans
    the expert range). `label_words` default: those of the task in the file name."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of entries")
    words = tuple(label_words) if label_words is not None else _label_words_for(path)
    rows = []
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        rows.append(_row(entry, index, target_key, words, where))
    df = pd.DataFrame(rows)
    for column in SCORE_COLUMNS:
        df[column] = None
    df["r_raw"] = df["r_query"] + df["r_task"]
    scale = RewardScale.fit(df["r_raw"])
    df["reward"] = scale.apply(df["r_raw"])
    return df, scale


def _row(entry: Any, index: int, target_key: str, label_words: Sequence[str],
         where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    for key in ("prompt_method", "query", "label", "prompt", target_key):
        if key not in entry:
            raise ValueError(f"{where}: missing key {key!r}")
    for key in ("prompt_method", "query", "prompt"):
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    target = entry[target_key]
    keys = next((k for k in REWARD_KEYS if isinstance(target, dict) and k[0] in target), None)
    if keys is None:
        raise ValueError(f"{where}: {target_key!r} has none of "
                         f"{[k[0] for k in REWARD_KEYS]}")
    rewards = []
    for key in keys:
        value = target.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {target_key}.{key} must be a number, got {value!r}")
        rewards.append(float(value))
    prompt = entry["prompt"].removesuffix(END_OF_TEXT).strip()
    query = entry["query"].strip()
    row = {
        "pair_id": f"paper-{index}", "query_id": query_id(query), "query": query,
        "prompt_id": prompt_id(prompt), "prompt": prompt,
        "source": entry["prompt_method"].removeprefix("instructions/"),
        "label": _label(entry["label"], label_words, where), "group": 0, "loop": 0,
        "seed": -1, "demo_ids": [],
        "r_query": rewards[0], "r_task": rewards[1],
    }
    assert set(PAIR_COLUMNS) <= set(row)
    return row
