"""(query, prompt) pairs to be scored on the target LLM: Step 0 and augmentation rounds.

Step 0 (paper appendix B.2): the collection is shuffled (seeded) into groups of
`dataset.prompts_per_group` prompts, so that each group mixes prompt sources; each group
is tested on its own `dataset.queries_per_group` random queries of the collection set.
`prompts_per_group: 0` makes one group: every prompt on the same queries.
Few-shot pairs carry `task.num_demo_sets` demonstration sets of `task.num_shots` query
ids, always drawn from the demonstration pool, so a collected query is never a
demonstration. In Step 0 the sets are drawn once per (group, query) and shared by the
group's prompts, so the prompts of a query are compared on the same demonstrations.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

import pandas as pd

from qpo_ray.config import ConfigError, DatasetConfig, TaskConfig
from qpo_ray.config.features import WideStep0Config
from qpo_ray.data.schema import PAIR_COLUMNS
from qpo_ray.prompts import PromptRecord
from qpo_ray.tasks.base import Example, Splits, Task

#: The `group` of augmentation pairs (groups exist only in Step 0).
NO_GROUP = -1
#: The `group` of wide Step-0 pairs (wide Step 0 needs one shared group, numbered 0).
WIDE_GROUP = 1


def derive_seed(*parts: object) -> int:
    """A seed that depends on every part (stable across processes, unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_demo_sets(demo_pool: Sequence[Example], num_shots: int, num_sets: int,
                   seed: int, exclude: str = "") -> list[list[str]]:
    """`num_sets` sets of `num_shots` distinct demo ids from the pool (never `exclude`)."""
    candidates = [e.id for e in demo_pool if e.id != exclude]
    if len(candidates) < num_shots:
        raise ConfigError(f"task.num_shots: few-shot needs {num_shots} demonstrations but "
                          f"the demonstration pool has {len(candidates)}")
    rng = random.Random(seed)
    return [rng.sample(candidates, num_shots) for _ in range(num_sets)]


def _check_few_shot(task: Task, splits: Splits, num_shots: int) -> bool:
    few_shot = num_shots > 0
    if few_shot and not task.supports_few_shot:
        raise ConfigError(f"task.num_shots: task {task.name} does not support few-shot")
    if few_shot:
        collected = {e.id for e in splits.collection}
        leaked = collected & {e.id for e in splits.demo_pool}
        if leaked:
            raise ValueError(f"splits: {len(leaked)} collection queries are also in the "
                             f"demonstration pool (e.g. {sorted(leaked)[0]})")
    return few_shot


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    return frame.astype({"group": "int64", "loop": "int64", "seed": "int64"})


def build_step0_pairs(task: Task, splits: Splits, prompts: list[PromptRecord],
                      task_cfg: TaskConfig, dataset: DatasetConfig, seed: int) -> pd.DataFrame:
    """Step 0: every prompt of a group x the group's random queries (PAIR_COLUMNS, loop 0);
    groups sized by `dataset`, demonstrations by `task_cfg` (num_shots, num_demo_sets)."""
    if not prompts:
        raise ValueError("build_step0_pairs: the prompt collection is empty")
    if not splits.collection:
        raise ValueError("build_step0_pairs: the collection set is empty")
    few_shot = _check_few_shot(task, splits, task_cfg.num_shots)
    rng = random.Random(derive_seed("step0", seed))
    order = list(prompts)
    rng.shuffle(order)
    size = dataset.prompts_per_group or len(order)
    n_queries = min(dataset.queries_per_group, len(splits.collection))
    rows = []
    for group, start in enumerate(range(0, len(order), size)):
        queries = rng.sample(splits.collection, n_queries)
        for query in queries:
            pair_seed = derive_seed("step0", seed, group, query.id)
            demo_ids = (draw_demo_sets(splits.demo_pool, task_cfg.num_shots,
                                       task_cfg.num_demo_sets, pair_seed, exclude=query.id)
                        if few_shot else [])
            for prompt in order[start:start + size]:
                rows.append({
                    "pair_id": f"l0-{len(rows)}", "query_id": query.id, "query": query.text,
                    "prompt_id": prompt.id, "prompt": prompt.text, "source": prompt.source,
                    "label": str(query.label), "group": group, "loop": 0, "seed": pair_seed,
                    "demo_ids": demo_ids,
                })
    return _frame(rows)


def wide_queries(splits: Splits, step0_pairs: pd.DataFrame, wide: WideStep0Config,
                 num_shots: int, seed: int) -> list[Example]:
    """Wide Step 0's queries: `dataset.wide.queries` collection queries that Step 0's
    shared pairs did not use (seeded), checked before anything is scored."""
    wanted = wide.num_queries
    if wanted == 0:
        return []
    if num_shots > 0:
        raise ConfigError("dataset.wide.prompts: wide Step 0 is zero-shot only "
                          "(task.num_shots must be 0)")
    used = set(step0_pairs["query_id"])
    free = [q for q in splits.collection if q.id not in used]
    if len(free) < wanted:
        raise ConfigError(f"dataset.wide.queries: {wanted} asked, but the collection set "
                          f"has {len(free)} queries besides Step 0's shared ones (raise "
                          "task.collection_fraction or lower dataset.wide.queries)")
    return random.Random(derive_seed("wide", seed)).sample(free, wanted)


def build_wide_pairs(queries: Sequence[Example], prompts: Sequence[PromptRecord],
                     seed: int) -> pd.DataFrame:
    """Every one of `prompts` (the best on the shared queries) on every wide query: one
    more Step-0 group, numbered after the shared one (zero-shot: see wide_queries)."""
    rows = []
    for query in queries:
        pair_seed = derive_seed("wide", seed, query.id)
        for prompt in prompts:
            rows.append({
                "pair_id": f"l0w-{len(rows)}", "query_id": query.id, "query": query.text,
                "prompt_id": prompt.id, "prompt": prompt.text, "source": prompt.source,
                "label": str(query.label), "group": WIDE_GROUP, "loop": 0, "seed": pair_seed,
                "demo_ids": [],
            })
    return _frame(rows)


def make_pairs(queries: list[Example], prompts: list[tuple[str, str, str]], task: Task,
               splits: Splits, *, num_shots: int, num_demo_sets: int, loop: int,
               seed: int) -> pd.DataFrame:
    """Augmentation round `loop` (or test pairs): one pair per (query, (id, text,
    source)), zipped. With `num_shots` > 0 each pair gets its own demonstration sets
    (`num_demo_sets` of them), seeded by (`seed`, position)."""
    if len(queries) != len(prompts):
        raise ValueError(f"make_pairs: {len(queries)} queries but {len(prompts)} prompts "
                         "(they are zipped)")
    if loop < 1:
        raise ValueError(f"make_pairs: augmentation rounds have loop >= 1, got {loop}")
    few_shot = _check_few_shot(task, splits, num_shots)
    rows = []
    for i, (query, (pid, text, source)) in enumerate(zip(queries, prompts)):
        pair_seed = derive_seed("augment", seed, loop, i)
        demo_ids = (draw_demo_sets(splits.demo_pool, num_shots, num_demo_sets, pair_seed,
                                   exclude=query.id)
                    if few_shot else [])
        rows.append({
            "pair_id": f"l{loop}-{i}", "query_id": query.id, "query": query.text,
            "prompt_id": pid, "prompt": text, "source": source, "label": str(query.label),
            "group": NO_GROUP, "loop": loop, "seed": pair_seed, "demo_ids": demo_ids,
        })
    return _frame(rows)


def on_wide_queries(frame: pd.DataFrame) -> pd.Series:
    """Which rows (of any loop) are on one of wide Step 0's queries."""
    wide = frame.loc[(frame["loop"] == 0) & (frame["group"] == WIDE_GROUP), "query"]
    return frame["query"].isin(set(wide))
