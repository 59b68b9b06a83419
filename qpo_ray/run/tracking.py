"""MLflow tracking of a QPO run: one parent run per run directory, one nested run per loop.

Only `qpo_ray.run.loop` (and the test phase it drives) calls this module; the core never
does (serving's report borrows `metric_key`). Everything goes through an explicit `MlflowClient` bound to the run's tracking
URI instead of MLflow's global "active run" stack, so a resumed run (a new process)
reopens the same runs by the ids kept in ``<workdir>/tracking.json``.

Registered policy layout (what `qpo_ray.serving` loads): every loop logs its policy as
an MLflow pyfunc model (qpo_ray.run.policy_pyfunc: MLmodel, and the checkpoint exactly
as `QPOPolicy.save` wrote it under artifacts/policy/) at the artifact path ``policy/``
of the loop's run, and registers ``<run artifact uri>/policy`` as a new
version of ``cfg.tracking.registered_model_name``. MLflow 3 reserves the alias
``latest`` and resolves it to the newest version, so ``models:/<name>@latest``
(``MlflowClient().get_model_version_by_alias(name, "latest")`` or
``mlflow.artifacts.download_artifacts("models:/<name>@latest")``) yields the files
of the last trained loop; the final policy of a run also gets the alias ``final``.
Once the test stage has chosen (loop, decoding) on the dev split, that loop's version
gets the alias ``champion`` and tags saying how to decode it (`promote_champion`):
``models:/<name>@champion`` is what `qpo serve` serves by default.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from qpo_ray.common.atomic import write_text_atomic
from qpo_ray.config import Config

TRACKING_FILE = "tracking.json"
POLICY_ARTIFACT_PATH = "policy"
FINAL_ALIAS = "final"
# Registry answers worth asking again (a restarting, overloaded or unreachable server:
# MLflow reports a refused connection as INTERNAL_ERROR); any other answer is final.
TRANSIENT_ERRORS = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                    "DEADLINE_EXCEEDED", "ABORTED")
# Looking a version up: tries and the first wait (doubled each time: 1+2+4+8+16 s).
FIND_TRIES, FIND_BACKOFF_S = 6, 1.0
CHAMPION_ALIAS = "champion"
# The version tags a champion carries (read back by qpo_ray.serving.policy_source).
CHAMPION_TAGS = ("qpo.loop", "qpo.decoding", "qpo.mbr_temperature", "qpo.target_reward",
                 "qpo.dev_accuracy", "qpo.chosen_on", "qpo.run_id")


def file_digest(path: str | Path) -> str:
    """Short content hash of a file: the dataset digest MLflow shows."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _scalar_columns(df: pd.DataFrame) -> pd.DataFrame:
    """MLflow's schema inference rejects nested lists (demo_ids, demo_correct)."""
    import numpy as np

    nested = [c for c in df.columns
              if len(df) and isinstance(df[c].iloc[0], (list, tuple, np.ndarray))]
    return df.drop(columns=nested)


def artifact_location(uri: str, run_dir: Path) -> Optional[str]:
    """Where a new experiment keeps its artifacts. Without one MLflow writes them to
    ./mlruns in the current directory (a pod's ephemeral one), where nothing finds them:
    a SQLite store keeps them beside its file (<dir>/mlartifacts), another database in
    the run directory; a server (http, databricks) or a file store decides its own."""
    scheme = uri.split(":", 1)[0] if "://" in uri else "file"
    if scheme == "sqlite":
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    if scheme in ("file", "http", "https", "databricks", "databricks-uc"):
        return None
    return (run_dir / "mlartifacts").as_uri()


class Tracker:
    """The MLflow runs of one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.uri = cfg.tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        # The registry is the run's own store, whatever registry URI the process set.
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        self._state_path = self.run_dir / TRACKING_FILE
        self.state: dict[str, Any] = (
            json.loads(self._state_path.read_text()) if self._state_path.exists() else {}
        )

    # -- runs ---------------------------------------------------------------------

    def _save_state(self) -> None:
        write_text_atomic(self._state_path, json.dumps(self.state, indent=2))

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.cfg.tracking.experiment,
                                             artifact_location(self.uri, self.run_dir))

    def _find_run(self, tags: dict[str, str]) -> Optional[str]:
        """A run of this experiment carrying all `tags`: one that a crash left created but
        unrecorded in tracking.json (the resume finds it instead of making another)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self._experiment_id()], query, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def parent_run_id(self) -> str:
        """The run directory's parent run, created once and reopened on resume."""
        run_id = self.state.get("parent_run_id")
        if run_id is None:
            # Write down a key for the run before creating it, so that a crash between
            # create_run and saving its id leaves a run this directory can find again.
            if "run_key" not in self.state:
                self.state["run_key"] = uuid.uuid4().hex
                self._save_state()
            key = self.state["run_key"]
            run_id = self._find_run({"qpo.run_key": key})
            if run_id is None:
                run_id = self.client.create_run(
                    self._experiment_id(), run_name=self.run_dir.name,
                    tags={"qpo.run_dir": str(self.run_dir), "qpo.target": self.cfg.target.model,
                          "qpo.task": self.cfg.task.name, "qpo.run_key": key},
                ).info.run_id
            # Params are write-once in MLflow: logging the same values again is a no-op.
            self.client.log_dict(run_id, self.cfg.to_dict(), "config.yaml")
            for k, value in _flat_params(self.cfg.to_dict()).items():
                self.client.log_param(run_id, k, value)
            self.state["parent_run_id"] = run_id
            self._save_state()
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def loop_run_id(self, loop: int) -> str:
        """The nested run of loop `loop` (1-based), created once (found again by its tags
        after a crash between its creation and tracking.json)."""
        runs = self.state.setdefault("loop_run_ids", {})
        if str(loop) not in runs:
            parent = self.parent_run_id()
            tags = {"mlflow.parentRunId": parent, "qpo.loop": str(loop)}
            run_id = self._find_run(tags)
            if run_id is None:
                run_id = self.client.create_run(self._experiment_id(), run_name=f"loop-{loop}",
                                                tags=tags).info.run_id
            runs[str(loop)] = run_id
            self._save_state()
        return runs[str(loop)]

    def evaluation_run_id(self, name: str) -> tuple[str, Optional[str]]:
        """A new run for a standalone `qpo evaluate`, nested under this run directory's
        parent run when it has one, else a new top-level run. (run id, parent or None)."""
        parent = self.state.get("parent_run_id")
        tags = {"qpo.evaluation": name, "qpo.target": self.cfg.target.model,
                "qpo.run_dir": str(self.run_dir)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self._experiment_id(), run_name=name, tags=tags)
        return run.info.run_id, parent

    def logged_stages(self) -> set[str]:
        """Stages whose results are already in MLflow (a resume logs only the rest)."""
        return set(self.state.get("logged_stages", []))

    def mark_logged(self, stage: str) -> None:
        self.state["logged_stages"] = sorted(self.logged_stages() | {stage})
        self._save_state()

    def finish_loop(self, loop: int) -> None:
        self.client.set_terminated(self.loop_run_id(loop), "FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        if "parent_run_id" in self.state:
            self.client.set_terminated(self.state["parent_run_id"], status)

    # -- what a loop logs -----------------------------------------------------------

    def log_dataset(self, loop: int, df: pd.DataFrame, path: str | Path, name: str,
                    context: str = "training") -> None:
        """The loop's training set as an MLflow dataset input (source = the Parquet)."""
        import mlflow
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        path = Path(path).resolve()
        dataset = mlflow.data.from_pandas(
            _scalar_columns(df), source=LocalArtifactDatasetSource(str(path)),
            name=name, digest=file_digest(path),
        )
        # `_to_mlflow_entity` is what mlflow.log_input itself uses; going through the
        # client keeps the resumable explicit-run-id style.
        self.client.log_inputs(self.loop_run_id(loop), [DatasetInput(
            dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0,
                    prefix: str = "") -> None:
        self._log_points(run_id, [(prefix + k, v, step) for k, v in metrics.items()])

    def _log_points(self, run_id: str, points: list[tuple[str, Any, int]]) -> None:
        """Log (key, value, step) points, skipping any (key, step) the run already has:
        a stage logged again after a crash (before `mark_logged`) adds nothing. One
        history read per key already in the run, then batches."""
        from mlflow.entities import Metric

        values: dict[tuple[str, int], float] = {}
        for key, value, step in points:
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) and value == value:  # skip NaN
                values[(metric_key(key), int(step))] = float(value)
        if not values:
            return
        present = set(self.client.get_run(run_id).data.metrics) & {k for k, _ in values}
        for key in present:
            for m in self.client.get_metric_history(run_id, key):
                values.pop((key, m.step), None)
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for (key, step), value in values.items()]
        for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
            self.client.log_batch(run_id, metrics=batch[start:start + 1000])

    def log_loop_metrics(self, loop: int, metrics: dict[str, Any], step: int = 0,
                         prefix: str = "") -> None:
        self.log_metrics(self.loop_run_id(loop), metrics, step=step, prefix=prefix)

    def log_training_curves(self, loop: int, epoch_metrics: list[dict]) -> None:
        points = [(f"train/{k}", v, int(row.get("epoch", 0)))
                  for row in epoch_metrics for k, v in row.items() if k != "epoch"]
        self._log_points(self.loop_run_id(loop), points)

    def log_artifact(self, loop: Optional[int], path: str | Path,
                     artifact_path: Optional[str] = None) -> None:
        run_id = self.loop_run_id(loop) if loop is not None else self.parent_run_id()
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, loop: Optional[int], text: str, artifact_file: str) -> None:
        run_id = self.loop_run_id(loop) if loop is not None else self.parent_run_id()
        self.client.log_text(run_id, text, artifact_file)

    def register_policy(self, loop: int, checkpoint_dir: str | Path, final: bool = False) -> str:
        """Log the checkpoint and register it as a new model version; returns the version.

        Idempotent per loop: the version is looked up by the loop run's id and the
        `qpo.loop` tag before one is created, so neither tracking.json nor a crash
        between create_model_version and saving it can make a second version (which
        `@latest` would then move to).
        """
        versions = self.state.setdefault("model_versions", {})
        name = self.cfg.tracking.registered_model_name
        if str(loop) not in versions:
            run_id = self.loop_run_id(loop)
            version = self._find_version(name, run_id, loop)
            if version is None:
                # Re-logging the same files to the same run overwrites them. The version is
                # an MLflow pyfunc model (qpo_ray.run.policy_pyfunc) holding the checkpoint.
                from qpo_ray.run.policy_pyfunc import save_policy_model

                with tempfile.TemporaryDirectory() as tmp:
                    model = save_policy_model(checkpoint_dir, Path(tmp) / "model")
                    self.client.log_artifacts(run_id, str(model), POLICY_ARTIFACT_PATH)
                if self.client.search_registered_models(f"name = '{name}'") == []:
                    self.client.create_registered_model(
                        name, description="QPO policy: (target reward, query) -> prompt")
                artifact_uri = self.client.get_run(run_id).info.artifact_uri
                version = self.client.create_model_version(
                    name, source=f"{artifact_uri}/{POLICY_ARTIFACT_PATH}", run_id=run_id,
                    tags={"qpo.loop": str(loop), "qpo.run_dir": str(self.run_dir)},
                ).version
            versions[str(loop)] = str(version)
            self._save_state()
        if final:
            self.client.set_registered_model_alias(name, FINAL_ALIAS, versions[str(loop)])
        return str(versions[str(loop)])

    def promote_champion(self, loop: int, tags: dict[str, str]) -> str:
        """Tag loop `loop`'s model version with how the test stage decodes it and point the
        alias `champion` at it; returns the version. Idempotent on resume: tags are
        set to the same values again, and the alias is moved at most once per run
        directory (tracking.json; after a crash before that was saved, only when it does
        not already point at the version)."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.tracking.registered_model_name
        version = (self.state.get("model_versions", {}).get(str(loop))
                   or self._find_version(name, self.loop_run_id(loop), loop))
        if version is None:
            raise ValueError(f"promote_champion: loop {loop} has no model version of "
                             f"{name!r} (its train stage registers one)")
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        if self.state.get("champion_version") != str(version):
            try:
                current = str(self.client.get_model_version_by_alias(
                    name, CHAMPION_ALIAS).version)
            except MlflowException:
                current = None
            if current != str(version):
                self.client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            self.state["champion_version"] = str(version)
            self._save_state()
        return str(version)

    def _find_version(self, name: str, run_id: str, loop: int) -> Optional[str]:
        """Loop `loop`'s version, registered by `run_id`; None only when the registry
        answered that there is none (no such version, or no such model yet). A transient
        error is retried (FIND_TRIES, doubling waits), then raised: guessing "none" would
        create a second version of the same loop, which `@latest` would move to."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        for attempt in range(FIND_TRIES):
            try:
                found = self.client.search_model_versions(
                    f"name = '{name}' and run_id = '{run_id}'")
                break
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None  # no such registered model yet
                if exc.error_code not in TRANSIENT_ERRORS or attempt == FIND_TRIES - 1:
                    raise MlflowException(
                        f"MLflow registry at {self.uri}: could not look up loop {loop}'s "
                        f"model version of {name!r} ({exc.error_code}, {attempt + 1} "
                        f"tries): none was created; resume the run (`qpo run --resume "
                        f"{self.run_dir}`) once the registry answers. {exc.message}",
                        error_code=ErrorCode.Value(exc.error_code)) from exc
                time.sleep(FIND_BACKOFF_S * 2 ** attempt)
        mine = sorted((int(mv.version) for mv in found
                       if (mv.tags or {}).get("qpo.loop") == str(loop)))
        return str(mine[0]) if mine else None

    def log_figure(self, loop: Optional[int], figure: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / Path(artifact_file).name
            figure.savefig(out, dpi=100, bbox_inches="tight")
            parent = str(Path(artifact_file).parent)
            self.log_artifact(loop, out, None if parent == "." else parent)


def metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics and _ - . space / only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out
