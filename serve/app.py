"""Entry point for `serve run` / `serve deploy` (and KubeRay's RayService): thin on
purpose, everything lives in qpo_ray.serving.

    serve deploy serve/config.yaml     # import_path: serve.app:build, with args
    serve run serve.app:app            # the profile in $QPO_PROFILE (default cpu-demo)
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
