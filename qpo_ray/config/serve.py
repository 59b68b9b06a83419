"""The `serve` section of the typed configuration (qpo_ray.config): Ray Serve's policy
endpoint, its limits, auth and A/B settings. Its own file only to keep
qpo_ray.config.sections short; it checks its fields the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from qpo_ray.config.base import Section, require_all


def last_good_root(serve_cfg: "ServeConfig") -> str:
    """serve.last_good_dir, or the per-user default on the replica's local disk."""
    return str(Path(serve_cfg.last_good_dir or "~/.cache/qpo_ray/serve").expanduser())


@dataclass
class ServeConfig(Section):
    # Where Serve's HTTP proxy listens. Anything but a loopback address needs a token
    # (auth_token_env / auth_token_file) or, in so many words, insecure: true.
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_batch_size: int = 8
    # How long a batch waits to fill when requests are concurrent; a lone client never
    # waits (see serving.deployments.PolicyServer._generate).
    batch_wait_timeout_s: float = 0.01
    max_query_chars: int = 2000
    # Bodies larger than this are answered 413 before they are parsed. Must leave room
    # for a query of max_query_chars even if every character is JSON-escaped (\uXXXX).
    max_request_bytes: int = 65536
    # Bearer token read by each replica from this environment variable (set it in the
    # Ray nodes' / pods' environment: it is never copied into the deployment config).
    auth_token_env: str = "QPO_SERVE_TOKEN"
    # Or from this file (e.g. a mounted Kubernetes secret); only the path travels in
    # the deployment config. Read per request, so rotating the file needs no restart.
    auth_token_file: Optional[str] = None
    # Serve without any token on a non-loopback host. Off: such a host without a token
    # refuses to start. On: every request is accepted and the log says so loudly.
    insecure: bool = False
    # A policy directory or a registry URI; None = models:/<registered name>@champion,
    # the version the test stage chose on dev (@latest: every new version at once).
    policy_uri: Optional[str] = None
    # Overrides of how a version is decoded; None = as its champion tags say (the test
    # phase's decoding), greedy without tags. "mbr" needs the train stage's mbr_table.json.
    decoding: Optional[Literal["greedy", "mbr"]] = None
    # mbr's belief temperature override; None = the version's tag (the dev-fitted one), or 1.
    mbr_temperature: Optional[float] = None
    # How often replicas re-resolve a registry alias (models:/<name>@latest) and swap in
    # a newly registered version; 0 = only on redeploy (a new user_config).
    registry_poll_interval_s: float = 30.0
    # /healthz reports the served policy as stale once the registry has not been read
    # successfully for this long (0 = 3 x registry_poll_interval_s).
    registry_stale_after_s: float = 0.0
    # /v1/answer answers 503 when the target LLM has not answered within this time.
    target_timeout_s: float = 120.0
    # Prompts kept per replica for repeated (normalised query, policy version, target
    # reward): a hit skips the policy. LRU; 0 = no cache. Changeable without restart.
    prompt_cache_entries: int = 4096
    # A/B: a second policy (models:/ URI or directory) served to ab_traffic_percent of
    # requests; None = every request gets policy_uri. Both changeable without restart.
    ab_policy_uri: Optional[str] = None
    ab_traffic_percent: float = 10.0
    # Record every served request (query, prompt, version) so POST /v1/feedback can
    # attach an outcome to it; off = nothing is written and /v1/feedback is 404.
    feedback: bool = True
    # Where records and feedback parts go; None = <workdir>/serving. Replicas on other
    # nodes need it on a shared file system.
    feedback_dir: Optional[str] = None
    # Feedback must carry the `receipt` its response gave (an HMAC of the request id with
    # a secret kept in feedback_dir): ids seen elsewhere cannot be given feedback.
    feedback_requires_receipt: bool = True
    # Every serving outcome (rewards, correct, gold labels) comes from a client; off =
    # `qpo serve feedback-dataset` refuses to turn them into training rows.
    train_on_client_feedback: bool = False
    # Per client (bearer-token hash, or address without a token), per replica: requests
    # per second sustained and the burst above it; 0 = no limit. Excess gets 429.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 20
    # /v1/answer calls (each spends the target's budget) per client per window, per
    # replica; 0 = no budget. Excess gets 429.
    answer_budget: int = 0
    answer_budget_window_s: float = 3600.0
    # Serve's queue cap per caller (proxy): beyond it a request gets 429 at once
    # instead of waiting; -1 = no cap. And the proxy's end-to-end timeout (408).
    max_queued_requests: int = 64
    request_timeout_s: float = 300.0
    # A body not fully received within this time is answered 408 (slow-body clients).
    body_read_timeout_s: float = 10.0
    # A replica's request journal starts a new file past this size; journals and
    # feedback older than retention_days are deleted at startup (0 = keep forever).
    journal_max_bytes: int = 64 * 1024 * 1024
    # Each replica keeps a copy of the last registry version it loaded here, and starts
    # from it when the registry is down (/healthz: stale). None = ~/.cache/qpo_ray/serve.
    last_good_dir: Optional[str] = None
    retention_days: float = 0.0
    # Feedback parts (one per outcome) are merged into one once this many accumulate,
    # keeping the latest per request and dropping rows past retention_days; 0 = never.
    feedback_compact_parts: int = 1000

    def validate(self) -> None:
        """Every field, at config load: a bad value fails here naming its key instead of
        in a replica's constructor (or, for the size limits, on the first request)."""
        def finite(x: float) -> bool:
            return math.isfinite(x)

        checks = [
            (bool(self.host.strip()) and not any(c.isspace() for c in self.host),
             f"serve.host: {self.host!r} is not a host name or address"),
            (1 <= self.port <= 65535, f"serve.port must be in 1..65535, got {self.port}"),
            (self.num_replicas >= 1, "serve.num_replicas must be >= 1"),
            (finite(self.num_cpus_per_replica) and self.num_cpus_per_replica >= 0,
             "serve.num_cpus_per_replica must be >= 0"),
            (finite(self.num_gpus_per_replica) and self.num_gpus_per_replica >= 0,
             "serve.num_gpus_per_replica must be >= 0"),
            (self.max_batch_size >= 1, "serve.max_batch_size must be >= 1"),
            (finite(self.batch_wait_timeout_s) and self.batch_wait_timeout_s >= 0,
             "serve.batch_wait_timeout_s must be >= 0"),
            (self.max_query_chars >= 1, "serve.max_query_chars must be >= 1"),
            (self.max_request_bytes >= 6 * self.max_query_chars + 1024,
             f"serve.max_request_bytes ({self.max_request_bytes}) must be >= 6 * "
             f"serve.max_query_chars + 1024 ({6 * self.max_query_chars + 1024}): a query "
             "at the length limit must fit even JSON-escaped"),
            (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.auth_token_env) is not None,
             f"serve.auth_token_env: {self.auth_token_env!r} is not an environment "
             "variable name"),
            (self.auth_token_file is None or bool(self.auth_token_file.strip()),
             "serve.auth_token_file must be a path or null"),
            (self.policy_uri is None or bool(self.policy_uri.strip()),
             "serve.policy_uri must be a models:/ URI, a directory or null"),
            (finite(self.registry_poll_interval_s) and self.registry_poll_interval_s >= 0,
             "serve.registry_poll_interval_s must be >= 0"),
            (finite(self.registry_stale_after_s) and self.registry_stale_after_s >= 0,
             "serve.registry_stale_after_s must be >= 0"),
            (finite(self.target_timeout_s) and self.target_timeout_s > 0,
             "serve.target_timeout_s must be > 0"),
            (self.mbr_temperature is None
             or (finite(self.mbr_temperature) and self.mbr_temperature > 0),
             f"serve.mbr_temperature must be > 0, got {self.mbr_temperature}"),
            (self.prompt_cache_entries >= 0, "serve.prompt_cache_entries must be >= 0"),
            (self.ab_policy_uri is None or bool(self.ab_policy_uri.strip()),
             "serve.ab_policy_uri must be a models:/ URI, a directory or null"),
            (finite(self.ab_traffic_percent) and 0 <= self.ab_traffic_percent <= 100,
             f"serve.ab_traffic_percent must be in [0, 100], got {self.ab_traffic_percent}"),
            (self.feedback_dir is None or bool(self.feedback_dir.strip()),
             "serve.feedback_dir must be a path or null"),
            (finite(self.rate_limit_per_s) and self.rate_limit_per_s >= 0,
             f"serve.rate_limit_per_s must be >= 0, got {self.rate_limit_per_s}"),
            (self.rate_limit_burst >= 1, "serve.rate_limit_burst must be >= 1"),
            (self.answer_budget >= 0, "serve.answer_budget must be >= 0"),
            (finite(self.answer_budget_window_s) and self.answer_budget_window_s > 0,
             "serve.answer_budget_window_s must be > 0"),
            (self.max_queued_requests == -1 or self.max_queued_requests >= 1,
             "serve.max_queued_requests must be -1 (no cap) or >= 1"),
            (finite(self.request_timeout_s) and self.request_timeout_s > 0,
             "serve.request_timeout_s must be > 0"),
            (finite(self.body_read_timeout_s) and self.body_read_timeout_s > 0,
             "serve.body_read_timeout_s must be > 0"),
            (self.last_good_dir is None or bool(self.last_good_dir.strip()),
             "serve.last_good_dir must be a path or null"),
            (self.journal_max_bytes >= 4096, "serve.journal_max_bytes must be >= 4096"),
            (finite(self.retention_days) and self.retention_days >= 0,
             "serve.retention_days must be >= 0 (0 = keep forever)"),
            (self.feedback_compact_parts == 0 or self.feedback_compact_parts >= 2,
             "serve.feedback_compact_parts must be 0 (never) or >= 2"),
        ]
        require_all(checks)
