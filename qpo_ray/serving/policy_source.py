"""Where the served policy comes from: a policy directory, or a version in the MLflow
model registry (`models:/<name>@<alias>` or `models:/<name>/<version>`).

The loop registers every loop's policy directory as a new version of
`tracking.registered_model_name` (`@latest` resolves to the newest) and the test stage
points `@champion` at the version it chose on the dev split, tagged with how it decoded
it; serving resolves the alias to a concrete version, reads those tags (`ServedDecoding`),
downloads that version's files and loads them with `QPOPolicy.load` (safetensors, never
pickle). `load_pyfunc` gives the same version as an MLflow pyfunc model, decoded alike.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qpo_ray.common.errors import ConfigError

NO_MBR_TABLE = ("serve.decoding: mbr needs the table the train stage saves beside a loop's "
                "policy (mbr_table.json); {version} has none: serve it with "
                "serve.decoding=greedy")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class PolicyRef:
    """One concrete policy: `version` names it in responses and tells two apart."""

    uri: str
    version: str
    # Set for registry versions: (registered model name, version number).
    registry: Optional[tuple[str, str]] = None
    # Set for directories.
    local_dir: Optional[str] = None
    # How the test stage decoded this version (its champion tags; None without them).
    decoding: Optional[str] = None
    mbr_temperature: Optional[float] = None
    target_reward: Optional[float] = None


# Decodings a replica can run; a champion chosen with another ("rank") is served greedy,
# and every response says so.
SERVABLE = ("greedy", "mbr")


@dataclass(frozen=True)
class ServedDecoding:
    """How a replica decodes one loaded version: serve.decoding / serve.mbr_temperature
    when set (explicit overrides), else the version's recorded tags, else greedy at 1."""

    decoding: str
    mbr_temperature: Optional[float]
    # The version's recorded target reward (the chat route asks the policy for it).
    target_reward: float
    # The decoding the test stage recorded, when it differs from what is served.
    recorded: Optional[str] = None

    def describe(self) -> dict:
        out = {"decoding": self.decoding, "mbr_temperature": self.mbr_temperature}
        if self.recorded:
            out["recorded_decoding"] = self.recorded
        return out


def served_decoding(ref: PolicyRef, decoding: Optional[str] = None,
                    mbr_temperature: Optional[float] = None) -> ServedDecoding:
    chosen = decoding or ref.decoding or "greedy"
    recorded = None
    if chosen not in SERVABLE:
        chosen, recorded = "greedy", chosen
    temperature = None
    if chosen == "mbr":
        temperature = mbr_temperature or ref.mbr_temperature or 1.0
    reward = 100.0 if ref.target_reward is None else ref.target_reward
    return ServedDecoding(chosen, temperature, reward, recorded)


def _tag_float(tags: dict, key: str) -> Optional[float]:
    try:
        return float(tags[key]) if key in tags else None
    except ValueError:
        return None


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def resolve(uri: str, tracking_uri: Optional[str],
            experiment: Optional[str] = None) -> PolicyRef:
    """Turn a policy URI into the concrete version it points at right now. With
    `experiment`, a registry version whose run is not in that MLflow experiment is
    refused (PermissionError): a version someone else registered under the model name
    (the alias moves to it) is never loaded."""
    if not is_registry_uri(uri):
        path = Path(uri).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"serve.policy_uri: policy directory {path} does not exist")
        return PolicyRef(uri=uri, version=str(path), local_dir=str(path))
    match = _MODELS_URI.match(uri)
    if not match:
        raise ConfigError(
            f"serve.policy_uri: {uri!r} is neither a directory nor models:/<name>@<alias> "
            f"or models:/<name>/<version>"
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = match["name"]
    version = match["version"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = (client.get_model_version(name, version) if version is not None else
              client.get_model_version_by_alias(name, match["alias"]))
    except MlflowException as exc:
        hint = ("has a QPO loop registered a policy there?" if match["alias"] != "champion"
                else "the test stage sets @champion once a run has chosen its policy; "
                f"to serve each new version at once: serve.policy_uri=models:/{name}@latest")
        raise FileNotFoundError(f"serve.policy_uri: {uri} not found in the registry at "
                                f"{tracking_uri} ({exc.message}); {hint}") from exc
    version = str(mv.version)
    if experiment is not None:
        _check_experiment(client, mv, experiment)
    tags = dict(mv.tags or {})
    return PolicyRef(uri=uri, version=f"models:/{name}/{version}", registry=(name, version),
                     decoding=tags.get("qpo.decoding"),
                     mbr_temperature=_tag_float(tags, "qpo.mbr_temperature"),
                     target_reward=_tag_float(tags, "qpo.target_reward"))


def _check_experiment(client, mv, experiment: str) -> None:
    from mlflow.exceptions import MlflowException

    name, version = mv.name, mv.version
    actual = None
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            actual = client.get_experiment(run.info.experiment_id).name
        except MlflowException:
            actual = None
    if actual != experiment:
        raise PermissionError(
            f"models:/{name}/{version} was registered from "
            f"{'experiment ' + repr(actual) if actual else 'no run of this tracking store'}, "
            f"not from tracking.experiment {experiment!r}: refusing to serve it")


def find_policy_dir(root: Path) -> Path:
    """The directory `QPOPolicy.save` wrote: `root` itself (the loop logs the checkpoint
    as the version's whole artifact tree) or the shallowest directory below it."""
    from qpo_ray.policy.model import POLICY_FILE

    candidates = sorted((p.parent for p in root.rglob(POLICY_FILE)),
                        key=lambda p: len(p.relative_to(root).parts))
    if not candidates:
        raise FileNotFoundError(f"no policy under {root}: no {POLICY_FILE} (see QPOPolicy.save)")
    return candidates[0]


def load_policy(ref: PolicyRef, tracking_uri: Optional[str], device=None,
                keep_copy: Optional[Path] = None):
    """Load the policy `ref` names; registry versions are downloaded to a temporary
    directory that is removed once the weights are in memory (after a copy to
    `keep_copy`, the last good version a replica can start from: save_last_good)."""
    from qpo_ray.policy import QPOPolicy

    if ref.local_dir is not None:
        return QPOPolicy.load(ref.local_dir, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="qpo-serve-policy-"))
    try:
        policy_dir = find_policy_dir(_download(ref, tracking_uri, tmp))
        policy = QPOPolicy.load(str(policy_dir), device=device)
        if keep_copy is not None:
            save_last_good(policy_dir, ref, keep_copy)
        return policy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pyfunc(uri: str, tracking_uri: Optional[str] = None):
    """A registry version (models:/<name>@<alias> or /<version>) as an MLflow pyfunc model
    that decodes as `qpo serve` decodes it: its champion tags, else greedy at reward 100.
    A plain mlflow.pyfunc.load_model cannot: MLflow gives a model no way to read its
    version's tags, so they go in as its model_config."""
    import mlflow

    from qpo_ray.run.policy_pyfunc import LOADED_DEFAULTS

    if not is_registry_uri(uri):
        raise ValueError(f"load_pyfunc: {uri!r} is not a models:/ URI (a checkpoint "
                         "directory loads with qpo_ray.policy.QPOPolicy.load)")
    ref = resolve(uri, tracking_uri)
    served = served_decoding(ref)
    config = {"decoding": served.decoding, "target_reward": served.target_reward}
    if served.mbr_temperature is not None:
        config["mbr_temperature"] = served.mbr_temperature
    tmp = Path(tempfile.mkdtemp(prefix="qpo-pyfunc-policy-"))
    try:  # the weights are in memory once load_model returns
        model = mlflow.pyfunc.load_model(str(_download(ref, tracking_uri, tmp)),
                                         model_config=config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not model.model_config and any(config[k] != LOADED_DEFAULTS[k] for k in config):
        raise ValueError(f"load_pyfunc: {ref.version} was registered before its pyfunc model "
                         f"took a model_config, so it cannot decode as its tags say by "
                         f"default; load it with mlflow.pyfunc.load_model and pass "
                         f"params={config} to predict")
    return model


def _download(ref: PolicyRef, tracking_uri: Optional[str], tmp: Path) -> Path:
    """A registry version's artifact tree, downloaded under `tmp`."""
    import mlflow
    from mlflow import MlflowClient

    name, version = ref.registry  # type: ignore[misc]
    # The version's own storage location, not "models:/..." (which MLflow resolves
    # through the process-global registry URI, not the one passed here).
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri))


LAST_GOOD_REF = "qpo-last-good.json"


def last_good_path(root: Path, tracking_uri: Optional[str], uri: str) -> Path:
    """Where the last good version of a registry URI is kept under `root` (one per
    tracking store and URI)."""
    import hashlib

    return Path(root) / hashlib.sha256(f"{tracking_uri}|{uri}".encode()).hexdigest()[:16]


def save_last_good(policy_dir: Path, ref: PolicyRef, dest: Path) -> None:
    """Copy a loaded registry version to `dest` (replaced whole: copied aside, then
    renamed over), so that a replica started while the registry is down can serve it."""
    import json
    import os

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
    shutil.copytree(policy_dir, staging, dirs_exist_ok=True)
    # With how the version is decoded (its champion tags), so a fallback decodes the same.
    (staging / LAST_GOOD_REF).write_text(json.dumps({
        "uri": ref.uri, "version": ref.version, "decoding": ref.decoding,
        "mbr_temperature": ref.mbr_temperature, "target_reward": ref.target_reward}))
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)


def last_good(dest: Path, uri: str) -> Optional[PolicyRef]:
    """The copy save_last_good made for `uri`, as a ref naming the registry version it
    came from (its files in `dest`); None when there is none."""
    import json

    try:
        meta = json.loads((dest / LAST_GOOD_REF).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("uri") != uri:
        return None
    return PolicyRef(uri=uri, version=meta["version"], local_dir=str(dest),
                     decoding=meta.get("decoding"), mbr_temperature=meta.get("mbr_temperature"),
                     target_reward=meta.get("target_reward"))
