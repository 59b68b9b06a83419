"""The task interface: what QPO needs to know about a task, and nothing more.

A task turns (prompt, query, demonstrations) into the text the target LLM sees, says
how the target's answer is read (label scoring over verbalizers, or generation plus an
answer parser) and whether it is right, and loads its splits.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from qpo_ray.common.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One query of a task.

    `text` is the query as the policy and the target see it (for multiple choice it
    already lists the options). `label` is the gold answer: the index into
    `Task.label_words` for label-scored tasks, the reference answer string for
    generation tasks.
    """

    id: str
    text: str
    label: int | str


@dataclass(frozen=True)
class Splits:
    """Paper appendix B.2: the collection set (Step 0 and augmentation queries), the
    demonstration pool (the rest of train: never a collected query) and the test set."""

    collection: list[Example]
    demo_pool: list[Example]
    test: list[Example]
    # Queries held out of the collection set to choose with (which loop's policy, which
    # decoding): never scored in Step 0 or augmentation, never a demonstration, never
    # test. Empty unless asked for.
    dev: list[Example] = field(default_factory=list)


class Task(ABC):
    """One small abstract class per swappable part: a task."""

    #: registry name
    name: str = ""
    #: "labels": score every verbalizer, prediction = argmax;
    #: "generate": greedy generation, prediction = parse(output).
    mode: Literal["labels", "generate"] = "labels"
    #: the verbalizers, one per class (label-scored tasks only)
    label_words: Sequence[str] = ()
    #: whether few-shot demonstrations make sense for this task
    supports_few_shot: bool = True

    @abstractmethod
    def load_split(self, split: Literal["train", "validation", "test"]) -> list[Example]:
        """Every example of a split (train, or the official test/dev split; validation
        only where the dataset has a separate one, e.g. tweet_emotion)."""

    def format_demo(self, demo: Example) -> str:
        """A demonstration with its answer, as placed before the query."""
        return f"{self.format_query(demo)}{self.answer_text(demo)}"

    def format_query(self, query: Example) -> str:
        """The query part of the input, ending where the answer starts."""
        return f"Input: {query.text}\nAnswer:"

    def answer_text(self, example: Example) -> str:
        """The gold answer as it would follow `format_query` (used in demonstrations)."""
        if self.mode == "labels":
            return " " + self.label_words[int(example.label)]
        return " " + str(example.label)

    def format(self, prompt: str, query: Example, demos: Sequence[Example] = ()) -> str:
        """The full input the target LLM sees: prompt, demonstrations, query."""
        parts = [prompt.strip()] if prompt.strip() else []
        parts += [self.format_demo(d) for d in demos]
        parts.append(self.format_query(query))
        return "\n\n".join(parts)

    def continuations(self) -> list[str]:
        """What label scoring compares after the formatted input (leading space kept)."""
        return [" " + w for w in self.label_words]

    def parse(self, output: str) -> str:
        """Read the answer out of a generated output (generation tasks)."""
        return output.strip()

    def is_correct(self, example: Example, prediction: int | str) -> bool:
        """The metric rho(y*, y_hat): exact match of the label index or parsed answer."""
        if self.mode == "labels":
            return int(prediction) == int(example.label)
        return str(prediction).strip() == str(example.label).strip()

    def splits(self, collection_fraction: float = 0.1, seed: int = 0,
               max_test: Optional[int] = None, dev_queries: int = 0) -> Splits:
        """Seeded, reproducible split of train into collection set, dev set (the last
        `dev_queries` of the collection's share) and demo pool."""
        train = list(self.load_split("train"))
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_collect = max(1, int(round(collection_fraction * len(train))))
        if dev_queries and dev_queries >= n_collect:
            raise ConfigError(f"task.dev_queries={dev_queries} leaves no collection queries: "
                              f"the collection share of {self.name!r} has {n_collect}")
        collection = [train[i] for i in order[:n_collect - dev_queries]]
        dev = [train[i] for i in order[n_collect - dev_queries:n_collect]]
        demo_pool = [train[i] for i in order[n_collect:]]
        test = list(self.load_split("test"))
        if max_test is not None and len(test) > max_test:
            test = random.Random(seed + 1).sample(test, max_test)
        return Splits(collection=collection, demo_pool=demo_pool, test=test, dev=dev)
