"""Where a run directory keeps its files, by name only (what the test phase and Serve read
of a run). The run's plumbing (qpo_ray.run.rundir) adds the saved config, the stage
markers and the lock on top; the parts below it are handed a `RunFiles` and never read
the markers themselves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sidecar(path: str | Path, suffix: str) -> Path:
    """`dataset_2.parquet` + ".round.json" -> `dataset_2.round.json`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".parquet") + suffix)


class RunLayout:
    """The file names of a run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    def step0_path(self) -> Path:
        return self.path / "dataset_loop0.parquet"

    def dataset_path(self, loop: int) -> Path:
        """The training set of loop `loop` (1-based)."""
        return self.path / f"dataset_{loop}.parquet"

    def train_dir(self, loop: int) -> Path:
        return self.path / f"loop{loop}"


class RunFiles(RunLayout):
    """A run directory as the test phase reads it: its files and its trained policies
    (loop -> policy directory), taken from the stage markers by whoever hands it down."""

    def __init__(self, path: str | Path, policies: Mapping[int, str | Path]):
        super().__init__(path)
        self.policies = {int(t): Path(p) for t, p in sorted(policies.items())}

    def trained_loops(self) -> list[int]:
        return list(self.policies)

    def policy_dir(self, loop: Optional[int] = None) -> Path:
        """The checkpoint of loop `loop` (default: the last trained one)."""
        if not self.policies:
            raise FileNotFoundError(f"{self.path}: no finished training stage (stages.json)")
        return self.policies[self.trained_loops()[-1] if loop is None else loop]
