"""Building and running the Serve application: `build_app(cfg)` for Python and `serve
deploy` (the builder `app_from_args`), `run_serve(cfg)` for `qpo serve`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from qpo_ray.config import Config, ConfigError, load_config
from qpo_ray.serving.feedback import feedback_root
from qpo_ray.serving.guard import check_auth_setup

APP_NAME = "qpo"


def default_policy_uri(cfg: Config) -> str:
    """serve.policy_uri, else the version the test stage chose (qpo_ray.run.tracking's
    CHAMPION_ALIAS; @latest would serve each loop's policy before the dev split judged it)."""
    return cfg.serve.policy_uri or f"models:/{cfg.tracking.registered_model_name}@champion"


def _absolute(uri: Optional[str]) -> Optional[str]:
    """A policy directory made absolute: replicas may run with another working
    directory (or on another node); registry URIs stay as they are."""
    if not uri or uri.startswith("models:/"):
        return uri
    return str(Path(uri).expanduser().resolve())


def user_config(cfg: Config, policy_uri: Optional[str] = None) -> dict[str, Any]:
    """What a replica can change in place (no restart): the policy, the A/B arm and
    split, the cache size and batching knobs. Redeploying with a different one of these
    (a Serve config's `deployments[].user_config`) applies it without downtime."""
    return {
        "policy_uri": _absolute(policy_uri or default_policy_uri(cfg)),
        "ab_policy_uri": _absolute(cfg.serve.ab_policy_uri),
        "ab_traffic_percent": cfg.serve.ab_traffic_percent,
        "prompt_cache_entries": cfg.serve.prompt_cache_entries,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "registry_poll_interval_s": cfg.serve.registry_poll_interval_s,
    }


def proxy_host() -> Optional[str]:
    """The address Serve's HTTP proxy binds (its http_options.host), where a Serve
    controller is running in the connected Ray cluster; None otherwise. A Serve started
    earlier (by `serve start`, a Serve config file, another app) keeps its own options,
    whatever serve.host says, so this is the address the auth rule must check."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.host if client is not None else None


def _check_bound_host(cfg: Config) -> bool:
    """check_auth_setup against the proxy's real address (else serve.host); the error
    names Serve's http_options.host where that is what differs."""
    host = proxy_host()
    if host is None or host == cfg.serve.host:
        return check_auth_setup(cfg.serve)
    try:
        return check_auth_setup(cfg.serve, host=host)
    except ConfigError as exc:
        raise ConfigError(f"Serve's proxy is already running with http_options.host "
                          f"{host} (not serve.host {cfg.serve.host}): {exc}") from exc


def _pinned(cfg: Config) -> Config:
    """A copy whose relative paths (workdir, the default sqlite tracking store) are made
    absolute here, so replicas resolve them the same way as the driver."""
    serve = {"feedback_dir": str(feedback_root(cfg))}
    if cfg.serve.auth_token_file:
        serve["auth_token_file"] = str(Path(cfg.serve.auth_token_file).expanduser().resolve())
    return cfg.with_changes({"workdir": str(Path(cfg.workdir).resolve()),
                             "tracking": {"uri": cfg.tracking_uri()}, "serve": serve})


def build_app(cfg: Config, policy_uri: Optional[str] = None,
              with_target: bool = True) -> Application:
    """The Serve application: PolicyServer (ingress, `cfg.serve` replicas and resources)
    and, unless `with_target` is False, TargetServer for /v1/answer (one replica with
    the resources of one evaluation engine: `evaluation.num_{cpus,gpus}_per_actor`)."""
    from qpo_ray.serving.deployments import PolicyServer
    from qpo_ray.serving.target_server import TargetServer

    # Fail closed where the app is built (here for `serve deploy` too): a non-loopback
    # bind address with no token and no serve.insecure never gets deployed.
    _check_bound_host(cfg)
    cfg = _pinned(cfg)
    uc = user_config(cfg, policy_uri)
    # Each replica keeps up to this many requests in flight: enough to fill a batch
    # while the previous one runs (Serve's default of 5 would cap batches at 5).
    max_ongoing = 4 * cfg.serve.max_batch_size
    # Beyond serve.max_queued_requests waiting at the proxy a request gets 429 at once
    # (overload is the client's to back off from, not a server error).
    queue = {"max_queued_requests": cfg.serve.max_queued_requests,
             "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1)}
    actor_options: dict[str, Any] = {"num_cpus": cfg.serve.num_cpus_per_replica,
                                     "num_gpus": cfg.serve.num_gpus_per_replica}
    # No token goes into the deployment (runtime_env, args, user_config): Serve shows
    # all of those in `serve status`, its config and the dashboard. Replicas read it
    # from their own environment or serve.auth_token_file (qpo_ray.serving.guard).
    # A registry poll that fails is retried by the next tick, so MLflow's own retries
    # (7, exponential backoff: minutes) would only delay reporting the registry as
    # unreachable on /healthz. Merged with the application's env_vars by Serve.
    actor_options["runtime_env"] = {"env_vars": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                                                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}}
    # Any redeploy (`serve.run` again, or a Serve config whose args changed) replaces
    # replicas; with a 100% surge the old ones serve until their replacements are ready.
    surge = {"max_surge_percent": 100}
    target = None
    if with_target:
        target = TargetServer.options(
            num_replicas=1,
            **surge, **queue,
            max_ongoing_requests=max_ongoing,
            user_config={k: uc[k] for k in ("max_batch_size", "batch_wait_timeout_s")},
            ray_actor_options={"num_cpus": cfg.evaluation.num_cpus_per_actor,
                               "num_gpus": cfg.evaluation.num_gpus_per_actor},
        ).bind(cfg)
    return PolicyServer.options(
        num_replicas=cfg.serve.num_replicas,
        **surge, **queue,
        max_ongoing_requests=max_ongoing,
        user_config=uc,
        ray_actor_options=actor_options,
    ).bind(cfg, target)


def app_from_args(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files and `serve run`: `args` may hold
    `profile` (name or YAML path), `policy_uri`, `with_target` (bool) and `overrides`
    (["a.b=1", ...], or one "a.b=1" string)."""
    known = {"profile", "policy_uri", "with_target", "overrides"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"serve config args: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    # `serve run serve.app:build key=value` passes every value as a string.
    overrides = args.get("overrides", [])
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    with_target = args.get("with_target", True)
    if isinstance(with_target, str):
        with_target = with_target.strip().lower() in ("1", "true", "yes")
    cfg = load_config(args.get("profile", "cpu-demo"), overrides)
    return build_app(cfg, policy_uri=args.get("policy_uri"), with_target=bool(with_target))


def run_serve(cfg: Config, blocking: bool = True, policy_uri: Optional[str] = None,
              with_target: bool = True) -> str:
    """Start Serve on `cfg.serve.host:port` (127.0.0.1 unless told otherwise), deploy
    the app and return its base URL; with `blocking`, serve until Ctrl-C, then shut
    Serve down. Calling it again (another policy_uri) replaces the replicas without
    downtime; a registry alias is followed by the replicas themselves."""
    from qpo_ray.common.local_ray import connect_ray
    from qpo_ray.policy.mbr import TABLE_FILE
    from qpo_ray.config.serve import last_good_root
    from qpo_ray.serving.policy_source import (NO_MBR_TABLE, last_good, last_good_path, resolve,
                                               served_decoding)

    # Before Ray starts: a refused host must not leave a proxy listening.
    if check_auth_setup(cfg.serve):
        print(f"qpo serve: WARNING: requests to {cfg.serve.host}:{cfg.serve.port} are "
              "UNAUTHENTICATED (--insecure / serve.insecure and no token)", file=sys.stderr)
    app = build_app(cfg, policy_uri=policy_uri, with_target=with_target)
    # Fail here, with the setting's name, rather than in every replica's constructor.
    uc = user_config(cfg, policy_uri)
    for uri in (uc["policy_uri"], uc["ab_policy_uri"]):
        if uri:
            try:
                ref = resolve(uri, cfg.tracking_uri(), cfg.tracking.experiment)
            except (PermissionError, ConfigError):
                raise
            except Exception:
                # The registry may be down: replicas start from their last good copy.
                copy = last_good_path(Path(last_good_root(cfg.serve)), cfg.tracking_uri(), uri)
                if not uri.startswith("models:/") or last_good(copy, uri) is None:
                    raise
                print(f"qpo serve: WARNING: {uri} cannot be resolved now; serving its last "
                      "good local copy until the registry answers", file=sys.stderr)
                continue
            # A registry version's files are read by the replicas, which refuse it then.
            decoding = served_decoding(ref, cfg.serve.decoding, cfg.serve.mbr_temperature)
            if (decoding.decoding == "mbr" and ref.local_dir is not None
                    and not (Path(ref.local_dir) / TABLE_FILE).exists()):
                raise ConfigError(NO_MBR_TABLE.format(version=ref.version))
    # A single-machine Ray listens on loopback only (qpo_ray.common.local_ray).
    connect_ray(cfg.ray_address)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": cfg.serve.request_timeout_s})
    # Serve may have been running already, bound elsewhere: check where it really is.
    _check_bound_host(cfg)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"qpo serve: {url} serves {uc['policy_uri']}  (POST /v1/prompt, /v1/answer, "
          "/v1/feedback, /v1/chat/completions; GET /v1/models, /v1/version, /healthz)")
    if not blocking:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return url
