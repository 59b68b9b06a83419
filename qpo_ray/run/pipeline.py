"""The order of a QPO run: what identifies a stage (`Stage`), the order of a run (`plan`)
and the typed record a stage leaves (`StageOutputs`).

Each stage has a module of its own in qpo_ray/run/stages/ with one entry point,
``run(ctx, stage) -> <its StageOutputs>``, and ``log(ctx, stage, outputs)`` that records
its finished outputs in MLflow; `ctx` is the run's `RunContext` (stages/context.py).
`PIPELINE` below lists the kinds in order; `qpo_ray.run.loop` walks `plan` and finds each
kind's module by name. Nothing here imports a stage module, so the run directory
(qpo_ray.run.rundir) can name stages without a cycle.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional

_NAME = re.compile(r"(?P<kind>[a-z][a-z0-9]*?)(?:_(?P<loop>[1-9][0-9]*))?")


@dataclass(frozen=True)
class Stage:
    """One stage of a run: `train` of loop 2 is Stage("train", 2), named "train_2" in
    stages.json, tracking.json and the log. `augment` of round t makes the training set
    of loop t + 1."""

    kind: str
    loop: Optional[int] = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]*", self.kind) or (self.loop is not None
                                                              and self.loop < 1):
            raise ValueError(f"bad stage {self.kind!r}, loop {self.loop!r}")

    @property
    def name(self) -> str:
        return self.kind if self.loop is None else f"{self.kind}_{self.loop}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Stage":
        """The one place a stage name is read back ("train_2" -> Stage("train", 2))."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a stage name (e.g. step0, train_1)")
        loop = match["loop"]
        return cls(match["kind"], int(loop) if loop else None)


# The stages of a run, in order, by kind (a kind is also its module's name in
# qpo_ray/run/stages/), with how often each runs. Adding a stage is its module plus one line here.
#   once       one stage, named <kind>
#   per_loop   <kind>_t for every loop t = 1 .. T
#   per_round  <kind>_t for every augmentation round t = 1 .. T-1, inside loop t + 1
# Within a loop the repeating stages run in the order listed.
PIPELINE: tuple[tuple[str, str], ...] = (
    ("step0", "once"),
    ("filter", "once"),
    ("augment", "per_round"),
    ("train", "per_loop"),
    ("test", "once"),
)
_REPEATS = ("once", "per_loop", "per_round")


def _loop_span(pipeline: tuple[tuple[str, str], ...]) -> tuple[int, int]:
    """[first, last) of the entries that repeat per loop; they must be contiguous, so that
    every `once` stage runs either before all loops or after them."""
    for kind, repeat in pipeline:
        if repeat not in _REPEATS:
            raise ValueError(f"stage {kind!r}: repeat {repeat!r} is not one of {_REPEATS}")
    looped = [i for i, (_, repeat) in enumerate(pipeline) if repeat != "once"]
    if not looped or looped != list(range(looped[0], looped[-1] + 1)):
        raise ValueError("the per-loop stages of PIPELINE must form one contiguous block")
    return looped[0], looped[-1] + 1


def plan(num_loops: int, pipeline: tuple[tuple[str, str], ...] = PIPELINE) -> list[Stage]:
    """Every stage of a run with `num_loops` loops, in order (paper Algorithm 1): Step 0,
    the expert filter, train_1, then per further loop t an augmentation round with
    pi_{t-1} and train_t, then the test phase. A stage's index here seeds its random
    choices, so a resumed run draws what an uninterrupted one draws."""
    first, end = _loop_span(pipeline)
    stages = [Stage(kind) for kind, _ in pipeline[:first]]
    for t in range(1, num_loops + 1):
        for kind, repeat in pipeline[first:end]:
            if repeat == "per_loop":
                stages.append(Stage(kind, t))
            elif t > 1:  # per_round: round t - 1 makes the training set of loop t
                stages.append(Stage(kind, t - 1))
    return stages + [Stage(kind) for kind, _ in pipeline[end:]]


@dataclass(frozen=True)
class StageOutputs:
    """Base of each stage's outputs: what stages.json records for it (paths become
    relative to the run directory there, see RunDir.mark_done)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Read back from stages.json; keys the loop adds (wall_s) are left out, and an
        output an older version did not record reads as None."""
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})
