"""Target-LLM backends, chosen by name; each adapter module is imported only when
asked for, so `import qpo_ray` never pulls in vllm."""

from __future__ import annotations

import importlib

from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend, Usage

# name -> "module:Class"; the module is imported lazily by create_backend.
BACKENDS: dict[str, str] = {
    "vllm": "qpo_ray.backends.vllm_backend:VLLMBackend",
    "transformers": "qpo_ray.backends.hf_backend:HFBackend",
    "openai": "qpo_ray.backends.openai_backend:OpenAIBackend",
}


def backend_class(name: str) -> type[TargetBackend]:
    if name not in BACKENDS:
        raise ValueError(f"target.backend: unknown backend {name!r} (known: {sorted(BACKENDS)})")
    module_name, cls_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def create_backend(target_config) -> TargetBackend:
    """Build the engine described by a `TargetConfig`."""
    return backend_class(target_config.backend)(target_config)


__all__ = ["BACKENDS", "ContinuationScore", "Generation", "TargetBackend", "Usage",
           "backend_class", "create_backend"]
