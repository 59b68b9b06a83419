"""`qpo init DIR`: a bring-your-own-task skeleton that `qpo check` accepts as written:
the task spec (qpo_ray/tasks/byo.py documents every key), a placeholder labelled data
set to replace with your own, ten prompts, and a profile that extends cpu-demo and sets
no sizes (they are fitted to the data: qpo_ray/tasks/sizes.py)."""

from __future__ import annotations

import random
from pathlib import Path

from qpo_ray.common.errors import ConfigError

TASK = """\
# Your task (every key: qpo_ray/tasks/byo.py). Replace data/train.csv with your own
# labelled rows; with only a train file, a seeded 80/20 train/test split is carved.
name: {name}
type: classification
files:
  train: data/train.csv
text_column: text
label_column: label
label_words:
  0: negative
  1: positive
"""

PROMPTS = """\
Is the sentiment of this review positive or negative?
Classify the review as positive or negative.
Read the review and say whether the writer liked the product.
Decide if the following text expresses a positive or a negative opinion.
What is the sentiment of this text? Answer positive or negative.
Tell me whether this customer review is positive or negative.
Label the review: positive or negative.
Does the author of this review recommend the product? Answer positive or negative.
Is the following opinion favourable (positive) or unfavourable (negative)?
Determine the overall sentiment (positive or negative) of the review.
"""

PROFILE = """\
# Runs your task with the cpu-demo settings (`qpo config show --profile {profile}` prints
# them all); sizes that do not fit your data are scaled to it, with one log line.
extends: cpu-demo
workdir: {workdir}
task:
  name: byo
  spec_path: {spec}
  max_test_queries: 200
prompts:
  source: {prompts}
# Your own LLM behind an OpenAI-compatible server (docs/cli.md):
# target:
#   backend: openai
#   base_url: http://127.0.0.1:8000/v1
#   model: my-served-name
#   tokenizer: HuggingFaceTB/SmolLM2-135M-Instruct
"""

_GOOD = ["works well", "is great", "exceeded my hopes", "is a delight", "is worth it"]
_BAD = ["broke in a week", "is awful", "was a waste", "is a letdown", "feels cheap"]
_THINGS = ["The kettle", "This lamp", "The blender", "My new chair", "The headset",
           "This backpack", "The charger", "The tent", "This mug", "The keyboard"]


def _rows(n: int = 400) -> list[str]:
    """Placeholder reviews (seeded): enough rows for cpu-demo's sizes once fitted."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(n):
        label = i % 2
        words = rng.choice(_GOOD if label else _BAD)
        lines.append(f"\"{rng.choice(_THINGS)} {words}, review {i}.\",{label}")
    return lines


def write_skeleton(directory: str, force: bool = False) -> list[Path]:
    """Write the skeleton into `directory`; the profile is the last path returned."""
    root = Path(directory).expanduser().resolve()
    name = "".join(c if c.isalnum() else "_" for c in root.name).strip("_") or "my_task"
    files = {root / "task.yaml": TASK.format(name=name),
             root / "data" / "train.csv": "\n".join(_rows()) + "\n",
             root / "prompts.txt": PROMPTS}
    profile = root / "profile.yaml"
    files[profile] = PROFILE.format(profile=profile, workdir=root / "runs" / "qpo",
                                    spec=root / "task.yaml", prompts=root / "prompts.txt")
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise ConfigError(f"qpo init: {existing[0]} exists (--force overwrites the skeleton)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
