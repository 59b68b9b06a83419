"""The run directory of one QPO run: its saved config, its stage markers, its files.

Layout (``cfg.workdir``)::

    config.yaml                    resolved config, written once at the start
    stages.json                    finished stages -> their outputs (atomic rewrite)
    tracking.json                  MLflow run ids (see qpo_ray.tracking)
    dataset_loop0.parquet          Step 0: every scored (query, prompt) pair + scale
    dataset_loop0.usage.json       target-LLM cost of Step 0
    dataset_1.parquet              D_0: Step 0 after the expert filter (trains loop 1)
    loop<t>/                       training output of loop t (checkpoint, metrics.json)
    dataset_<t+1>.parquet          D_t = D_{t-1} + D_A of round t (trains loop t+1)
    dataset_<t+1>.rows.parquet     round t's scored rows before the filter
    dataset_<t+1>.round.json       round t's R_task, cost, accept rate
    report/                        test phase: report.md, results.csv, plots

A stage counts as finished only once its name is in ``stages.json``; that file is
rewritten with ``os.replace`` after the stage's outputs exist, so a crash or Ctrl-C at
any moment leaves either the old or the new list, never a half-written one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from qpo_ray.config import Config, ConfigError, config_from_dict

CONFIG_FILE = "config.yaml"
STAGES_FILE = "stages.json"


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def stage_names(cfg: Config) -> list[str]:
    """Every stage of a run, in order; the index of a stage seeds its random choices."""
    names = ["step0", "filter", "train_1"]
    for t in range(1, cfg.loop.num_loops):
        names += [f"augment_{t}", f"train_{t + 1}"]
    return names + ["test"]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # -- creation and resume ----------------------------------------------------------

    @classmethod
    def create(cls, cfg: Config) -> "RunDir":
        """Start a run in ``cfg.workdir``; an existing run there continues only if it
        was started with the same config (else the user meant another directory)."""
        run = cls(cfg.workdir)
        run.path.mkdir(parents=True, exist_ok=True)
        config_path = run.path / CONFIG_FILE
        if config_path.exists():
            saved = yaml.safe_load(config_path.read_text())
            if saved != cfg.to_dict():
                raise ConfigError(
                    f"{config_path}: a run with a different config already lives in "
                    f"{run.path}; pick another --workdir, or continue it with "
                    f"`qpo run --resume {run.path}`")
        else:
            tmp = config_path.with_name(CONFIG_FILE + ".tmp")
            tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            os.replace(tmp, config_path)
        return run

    @classmethod
    def load(cls, path: str | Path) -> tuple["RunDir", Config]:
        """Reopen a run directory and its saved config (for --resume)."""
        run = cls(path)
        config_path = run.path / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: {run.path} is not a run directory")
        data = yaml.safe_load(config_path.read_text())
        try:
            cfg = config_from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: {exc}") from exc
        # The saved workdir may be relative to where the run started.
        cfg.workdir = str(run.path)
        return run, cfg

    # -- stage markers ----------------------------------------------------------------

    def stages(self) -> dict[str, dict[str, Any]]:
        path = self.path / STAGES_FILE
        return read_json(path) if path.exists() else {}

    def is_done(self, stage: str) -> bool:
        return stage in self.stages()

    def outputs(self, stage: str) -> dict[str, Any]:
        return self.stages()[stage]

    def mark_done(self, stage: str, outputs: Optional[dict[str, Any]] = None) -> None:
        stages = self.stages()
        stages[stage] = outputs or {}
        write_json_atomic(self.path / STAGES_FILE, stages)

    # -- file names -------------------------------------------------------------------

    def step0_path(self) -> Path:
        return self.path / "dataset_loop0.parquet"

    def dataset_path(self, loop: int) -> Path:
        """The training set of loop `loop` (1-based)."""
        return self.path / f"dataset_{loop}.parquet"

    def train_dir(self, loop: int) -> Path:
        return self.path / f"loop{loop}"

    def report_dir(self) -> Path:
        return self.path / "report"

    def final_dataset_path(self, cfg: Config) -> Path:
        return self.dataset_path(cfg.loop.num_loops)

    def policy_dir(self, loop: Optional[int] = None) -> Path:
        """The checkpoint of loop `loop` (default: the last finished one)."""
        trained = self.trained_loops()
        if not trained:
            raise FileNotFoundError(f"{self.path}: no finished training stage (stages.json)")
        loop = trained[-1] if loop is None else loop
        return Path(self.outputs(f"train_{loop}")["checkpoint_dir"])

    def trained_loops(self) -> list[int]:
        return sorted(int(n.split("_")[1]) for n in self.stages() if n.startswith("train_"))


def sidecar(path: str | Path, suffix: str) -> Path:
    """`dataset_2.parquet` + ".round.json" -> `dataset_2.round.json`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".parquet") + suffix)
