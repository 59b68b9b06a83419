"""Serving the latest QPO policy on Ray Serve.

POST /v1/prompt  {"query", "target_reward"=100} -> the policy's greedy prompt
POST /v1/answer  {"query", "target_reward"=100} -> that prompt + the target LLM's answer
GET  /v1/version, GET /healthz

`build_app(cfg)` returns the Serve application, `run_serve(cfg)` runs it (`qpo serve`);
`app_from_args` is the application builder `serve deploy serve/config.yaml` imports (from
the installed library, so the cluster needs no copy of this repository on its path).
"""

from qpo_ray.serving.app import APP_NAME, app_from_args, build_app, run_serve, user_config

__all__ = ["APP_NAME", "app_from_args", "build_app", "run_serve", "user_config"]
