"""A loop's policy as an MLflow pyfunc model: input a DataFrame with a `query` column,
output one prompt per query; `mlflow.pyfunc.load_model("models:/qpo-policy@champion")`
and `mlflow models serve` use it without this package's Serve app (the package must be
importable where it loads).

The weights stay the safetensors checkpoint `QPOPolicy.save` wrote (an artifact of the
model, loaded with `QPOPolicy.load`). The model is logged "from code" (this file is the
model's code, `mlflow.models.set_model` below), so no pickle is written. How to decode
is set at load (`model_config`, or the MLFLOW_PYFUNC_INFERENCE_CONFIG environment variable
of `mlflow models serve`: decoding, mbr_temperature, target_reward; greedy at 100 without
them) and per call (predict params of the same names). The champion's tags say how
the test stage decoded it: `qpo_ray.serving.policy_source.load_pyfunc` loads a registry
version with them, as `qpo serve` decodes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import mlflow
import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

ARTIFACT_KEY = "policy"
# How the model decodes when neither model_config nor a predict param says otherwise.
LOADED_DEFAULTS = {"target_reward": 100.0, "decoding": "greedy", "mbr_temperature": 1.0}
# The params' signature defaults, meaning "as loaded": MLflow fills every param a call
# leaves out with its default, so a real default would always override model_config.
UNSET = {"target_reward": -1.0, "decoding": "as_loaded", "mbr_temperature": 0.0}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "query")]),
    outputs=Schema([ColSpec("string", "prompt")]),
    params=ParamSchema([ParamSpec("target_reward", "double", UNSET["target_reward"]),
                        ParamSpec("decoding", "string", UNSET["decoding"]),
                        ParamSpec("mbr_temperature", "double", UNSET["mbr_temperature"])]),
)
INPUT_EXAMPLE = pd.DataFrame({"query": ["a gripping, funny film"]})


class PolicyModel(PythonModel):
    """The policy behind mlflow.pyfunc: queries in, prompts out."""

    def load_context(self, context) -> None:
        from qpo_ray.policy import QPOPolicy

        # MLflow passes the saved model_config with a load's overrides of its keys (others
        # it drops, with a warning).
        self.defaults = {**LOADED_DEFAULTS, **(context.model_config or {})}
        _check_decoding(self.defaults["decoding"], "model_config")
        self.policy = QPOPolicy.load(context.artifacts[ARTIFACT_KEY])
        self.policy.eval()
        if self.defaults["decoding"] == "mbr" and self.policy.mbr_table is None:
            raise ValueError("model_config: decoding=mbr, but this policy has no "
                             "mbr_table.json")

    def predict(self, context, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> list[str]:
        from qpo_ray.policy import generate_prompts
        from qpo_ray.policy.ranking import mbr_prompts

        given = params or {}
        params = {key: given[key] if given.get(key, UNSET[key]) != UNSET[key] else value
                  for key, value in self.defaults.items()}
        _check_decoding(params["decoding"], "params")
        queries = list(model_input["query"])
        bad = next((i for i, q in enumerate(queries) if not isinstance(q, str)), None)
        if bad is not None:
            # A dict of lists reaches here as one row holding the list: one prompt for
            # its text would be a silent wrong answer.
            raise ValueError(f"query: row {bad} is {type(queries[bad]).__name__}, not one "
                             "string; pass pd.DataFrame({'query': [...]}), a row a query")
        reward = float(params["target_reward"])
        if params["decoding"] == "mbr":
            if self.policy.mbr_table is None:
                raise ValueError("decoding=mbr: this policy has no mbr_table.json")
            return mbr_prompts(self.policy, queries, reward, self.policy.mbr_table,
                               temperature=float(params["mbr_temperature"]))
        return generate_prompts(self.policy, queries, target_reward=reward)


def _check_decoding(decoding: Any, where: str) -> None:
    if decoding not in ("greedy", "mbr"):
        raise ValueError(f"{where}: decoding must be greedy or mbr, got {decoding!r}")


def save_policy_model(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the pyfunc model of the checkpoint in `checkpoint_dir` to `out_dir` (which
    must not exist); the checkpoint's files are copied under artifacts/policy/."""
    mlflow.pyfunc.save_model(
        path=str(out_dir), python_model=__file__,
        artifacts={ARTIFACT_KEY: str(Path(checkpoint_dir).resolve())},
        signature=SIGNATURE, input_example=INPUT_EXAMPLE,
        model_config=LOADED_DEFAULTS,  # saved, so that a load can override these keys
        # Given, not inferred: inference loads the model in a subprocess (~20 s a loop).
        pip_requirements=[f"mlflow=={mlflow.__version__}", "qpo-ray"])
    return Path(out_dir)


set_model(PolicyModel())
