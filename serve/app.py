"""Entry point for `serve run` from the repository root: thin on purpose, everything
lives in qpo_ray.serving (serve/config.yaml imports `qpo_ray.serving:app_from_args`
directly, so a cluster needs only the installed library).

    serve run serve.app:app                        # the profile in $QPO_PROFILE (cpu-demo)
    serve run serve.app:build profile=cpu-demo policy_uri=/abs/policy/dir
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from qpo_ray.config import load_config
from qpo_ray.serving import app_from_args, build_app


def build(args: dict[str, Any]) -> Application:
    """Application builder: args = {profile, policy_uri, with_target, overrides}."""
    return app_from_args(args)


app = build_app(load_config(os.environ.get("QPO_PROFILE", "cpu-demo")))
