"""What the target needs before any work starts, checked once and named by its config key:
a model or tokenizer that loads (a local path, the Hugging Face cache, or the hub: a
typo, a gated repo and an offline machine each get one line), and an OpenAI-compatible
endpoint that serves `target.model` and, for label tasks, echoes prompt log-probs.

`target.base_url` may end in `/v1` (the OpenAI SDK's and `vllm serve`'s convention) or
not: `api_root` strips it and requests name the `/v1/...` path themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qpo_ray.common.errors import ConfigError


def api_root(base_url: str) -> str:
    """`http://host:8000/v1/` and `http://host:8000` -> `http://host:8000`."""
    root = base_url.strip().rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def auth_headers(cfg) -> dict[str, str]:
    key = os.environ.get(cfg.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def hub_error(exc: BaseException, model: str) -> str:
    """One line for a failed Hugging Face load (no traceback, no URL noise)."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return (f"{model!r} is a gated repository: accept its licence on the hub and set "
                "HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"{model!r} is not a repository on the Hugging Face hub (a typo? a private "
                "one needs HF_TOKEN)")
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return (f"{model!r} is neither a local checkpoint nor in the Hugging Face cache, and "
                "the hub cannot be reached (offline, or HF_HUB_OFFLINE=1)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{model!r} could not be loaded ({type(exc).__name__}: {first[:200]})"


def _hub_load_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (OSError, errors.EntryNotFoundError, errors.HfHubHTTPError)


def check_model(model: str, key: str, file: str = "config.json") -> str:
    """The resolved path or hub id of `model`; a missing path, or a hub id whose `file`
    cannot be had (not a repo, gated, offline and not cached), fails naming `key`. Online,
    a hub model (file config.json) is fetched whole here, once, on the driver, into the
    cache the workers read (HF_HOME): a gated or missing model fails now, not mid-run."""
    from qpo_ray.common.models import fetch_hub_model, resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if Path(path).exists():
        return path
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    online = os.environ.get("HF_HUB_OFFLINE") != "1"
    try:
        if isinstance(try_to_load_from_cache(path, file), str):
            return path  # cached: no request (the hub client retries ~20 s when offline)
        if online and file == "config.json":
            fetch_hub_model(path)
        else:
            hf_hub_download(path, file)  # a small file: the repo exists and may be read
    except (_hub_load_errors() + (ValueError,)) as exc:  # ValueError: not a valid repo id
        reason = hub_error(exc, model)
        raise ConfigError(f"{key}: {model!r} could not be fetched from the Hugging Face Hub: "
                          f"{reason}" if online else f"{key}: {reason}") from None
    return path


def tokenizer_key(cfg) -> tuple[str, str]:
    """(name, config key) of the target's tokenizer: target.tokenizer, else target.model."""
    if cfg.tokenizer:
        return cfg.tokenizer, "target.tokenizer"
    return cfg.model, "target.model"


def load_tokenizer(cfg):
    """The target's Hugging Face tokenizer; a failure names the key it came from (and,
    for target.model, says that target.tokenizer can name another)."""
    name, key = tokenizer_key(cfg)
    hint = ("" if key == "target.tokenizer" else
            " (set target.tokenizer to the Hugging Face id or path of the served model's "
            "tokenizer when target.model is a served name)")
    try:
        path = check_model(name, key, file="tokenizer_config.json")
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint}") from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (_hub_load_errors() + (ValueError,)) as exc:
        raise ConfigError(f"{key}: {hub_error(exc, name)}{hint}") from None


def check_endpoint(cfg, labels: bool = False) -> None:
    """One round trip to an OpenAI-compatible server: GET /v1/models lists
    target.model; with `labels`, a one-token completions request with echo + logprobs
    returns the prompt's log-probs and offsets (label scoring reads nothing else)."""
    import httpx

    if not cfg.base_url:
        raise ConfigError("target.base_url is required for target.backend=openai")
    root = api_root(cfg.base_url)
    url = root + "/v1/models"
    try:
        response = httpx.get(url, headers=auth_headers(cfg),
                             timeout=min(5.0, cfg.request_timeout_s))
    except httpx.HTTPError as exc:
        raise ConfigError(f"target.base_url: cannot reach {url} ({type(exc).__name__})") from None
    _check_status(response, url, cfg)
    try:
        served = [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"target.base_url: {url} did not answer a model list; is it an "
                          "OpenAI-compatible server?") from None
    if cfg.model not in served:
        raise ConfigError(f"target.model: {cfg.model!r} is not served by {root} (it serves "
                          f"{served[:10]}); set target.model to the served name")
    if labels:
        _check_echo(cfg, root)


def _check_status(response: Any, url: str, cfg) -> None:
    if response.status_code in (401, 403):
        raise ConfigError(f"target.base_url: {url} refused the API key (HTTP "
                          f"{response.status_code}); set the variable named by "
                          f"target.api_key_env ({cfg.api_key_env})")
    if response.status_code >= 400:
        raise ConfigError(f"target.base_url: {url} answered HTTP {response.status_code}; "
                          "is it an OpenAI-compatible server? (with or without /v1)")


def _check_echo(cfg, root: str) -> None:
    import httpx

    url = root + "/v1/completions"
    need = ("label tasks score each label word from the prompt's echoed log-probs: "
            "the server must support echo + logprobs on /v1/completions (vllm serve does)")
    body = {"model": cfg.model, "prompt": "Answer: yes", "max_tokens": 1, "temperature": 0.0,
            "echo": True, "logprobs": 0}
    try:
        response = httpx.post(url, json=body, headers=auth_headers(cfg),
                              timeout=cfg.request_timeout_s)
    except httpx.HTTPError as exc:
        raise ConfigError(f"target.base_url: cannot reach {url} ({type(exc).__name__})") from None
    if response.status_code in (401, 403):
        _check_status(response, url, cfg)
    if response.status_code >= 400:
        raise ConfigError(f"target.base_url: {url} refused echo + logprobs (HTTP "
                          f"{response.status_code}: {response.text[:120]}); {need}")
    try:
        logprobs = response.json()["choices"][0].get("logprobs") or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        logprobs = {}
    if not logprobs.get("text_offset") or not logprobs.get("token_logprobs"):
        raise ConfigError(f"target.base_url: {url} answered without the prompt's log-probs; "
                          f"{need}")
