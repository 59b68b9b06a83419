"""Serving the QPO policy the test stage chose (models:/<name>@champion) on Ray Serve.

POST /v1/prompt    {"query", "target_reward"=100, "client_key"?} -> the policy's prompt
                   (decoded as the version's champion tags say: decoding, mbr_temperature),
                   the serving policy_version and A/B arm, a request_id, cached
POST /v1/answer    the same + "label"? (gold) -> that prompt + the target LLM's answer
                   (with the label: whether it was right, recorded as feedback)
POST /v1/feedback  {"request_id", "correct"? , "reward"?, "label"?} -> stored durably
GET  /v1/version (arms, split, cache counts), GET /healthz
POST /v1/chat/completions, GET /v1/models: OpenAI-compatible (serving.openai_route)

`build_app(cfg)` returns the Serve application, `run_serve(cfg)` runs it (`qpo serve`);
`app_from_args` is the application builder `serve deploy serve/config.yaml` imports (from
the installed library, so the cluster needs no copy of this repository on its path).
"""

from qpo_ray.serving.app import APP_NAME, app_from_args, build_app, run_serve, user_config

__all__ = ["APP_NAME", "app_from_args", "build_app", "run_serve", "user_config"]
