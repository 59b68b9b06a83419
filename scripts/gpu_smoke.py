"""The GPU paths end to end, each check printed as it passes (scripts/gpu_smoke.sh).

Full mode (a GPU machine with the project installed: Ray, vLLM, MLflow, the embedded
model): vLLM scoring inside a Ray actor agrees with the transformers backend; Ray
Train runs a step with DDP fp16 and DeepSpeed ZeRO-2 fp16 (and bf16 where the card has
it natively); the policy served on a GPU replica answers /v1/prompt.

--minimal (a GPU machine with only torch + transformers, no network): the embedded
model's architecture from its config and tokenizer files (scripts/smoke_model) with
random weights; the transformers target on the GPU in fp16 and bf16 against CPU float32
on label log-probs; the policy's training step (plain, and ZeRO-2 where DeepSpeed is
importable) and its generation on the GPU; the device helper's decisions. Without CUDA
it says what it skipped and runs the CPU half. Imports neither Ray, vLLM nor MLflow.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qpo_ray.common import device as devices  # noqa: E402

PREFIXES = ["Is the sentiment of the following movie review positive or negative?\n"
            "Review: a wonderful, moving film, the best of the year.\nAnswer:",
            "Is the sentiment of the following movie review positive or negative?\n"
            "Review: dull, ugly and far too long; I walked out.\nAnswer:"]
LABELS = [" positive", " negative"]
# Largest |log-prob| difference to CPU float32 per dtype (sums over a label's tokens).
TOLERANCE = {"float16": 0.15, "bfloat16": 0.6, "float32": 1e-3}
ROWS = {"query": [f"review {i}: {'great' if i % 2 else 'awful'} film" for i in range(8)],
        "prompt": ["Classify the review.", "Positive or negative?"] * 4,
        "reward": [float(10 * i) for i in range(8)]}


def say(status: str, name: str, detail: object = "") -> None:
    print(f"[smoke] {status:<4} {name}: {detail}", flush=True)


def cuda() -> bool:
    return devices.has_cuda()


def gpu_dtypes() -> list[str]:
    """fp16 on every GPU; bf16 only where it is native (capability >= 8.0)."""
    return ["float16"] + (["bfloat16"] if devices.bf16_supported() else [])


# -- the device helper --------------------------------------------------------------------

def check_device() -> None:
    info = devices.describe()
    say("INFO", "device helper", json.dumps(info))
    if not cuda():
        assert info["device"] == "cpu", info
        say("OK", "device decision", "no CUDA: cpu")
        say("SKIP", "compute capability / arch list", "no CUDA device")
        return
    cap = torch.cuda.get_device_capability()
    native = devices.bf16_native(cap)
    auto = devices.resolve_dtype("auto", torch.device("cuda"))
    assert auto == (torch.bfloat16 if native else torch.float16), (cap, auto)
    arch = f"sm_{cap[0]}{cap[1]}"
    archs = torch.cuda.get_arch_list()
    has_kernels = arch in archs or any(a.startswith("compute_") and a[8:] <= arch[3:]
                                       for a in archs)
    say("OK", "device decision", f"capability {cap[0]}.{cap[1]}: bf16 native={native} "
        f"(torch.cuda.is_bf16_supported()={torch.cuda.is_bf16_supported()}), auto={auto}")
    say("OK" if has_kernels else "FAIL", "torch build kernels",
        f"{arch} in {archs} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    assert has_kernels, f"this torch build has no kernels for {arch}: see docs/gpu-and-cluster.md"
    x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    assert torch.isfinite(x @ x).all()
    say("OK", "fp16 matmul on the GPU", torch.cuda.get_device_name())


# -- the model -----------------------------------------------------------------------------

def random_model(out: Path, num_layers: int = 4) -> Path:
    """The embedded model's architecture (its first `num_layers` layers) with random
    weights, from the config and tokenizer files that travel with the repository."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = REPO / "scripts" / "smoke_model"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        shutil.copy(src / name, out / name)
    with gzip.open(src / "tokenizer.json.gz", "rb") as fin, open(out / "tokenizer.json", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    config = AutoConfig.from_pretrained(out)
    config.num_hidden_layers = num_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def label_logprobs(model_dir: Path, dtype: str, backend: str = "transformers") -> list:
    from qpo_ray.backends import create_backend
    from qpo_ray.config import TargetConfig

    target = create_backend(TargetConfig(backend=backend, model=str(model_dir), dtype=dtype,
                                         use_chat_template=False))
    try:
        return [[c.logprob_sum for c in row]
                for row in target.score_continuations(PREFIXES, LABELS)]
    finally:
        target.close()


def cpu_reference(model_dir: Path) -> list:
    """float32 on the CPU, in a process that sees no GPU (the helper then decides cpu)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, "--cpu-reference", str(model_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def check_target(model_dir: Path) -> None:
    ref = cpu_reference(model_dir)
    say("OK", "transformers target, CPU float32", f"label log-probs {ref}")
    if not cuda():
        say("SKIP", "transformers target on the GPU (fp16, bf16)", "no CUDA device")
        return
    for dtype in gpu_dtypes():
        got = label_logprobs(model_dir, dtype)
        diff = max_diff(got, ref)
        assert diff < TOLERANCE[dtype], (dtype, got, ref)
        say("OK", f"transformers target, GPU {dtype}", f"max |diff| to CPU float32 {diff:.4f}"
            f" < {TOLERANCE[dtype]}")
    if not devices.bf16_supported():
        say("SKIP", "transformers target, GPU bfloat16", "no native bf16 (capability < 8.0)")


# -- the policy ----------------------------------------------------------------------------

def _policy(model_dir: Path):
    from qpo_ray.config import PolicyConfig
    from qpo_ray.policy import QPOPolicy

    torch.manual_seed(0)
    return QPOPolicy.from_backbone(PolicyConfig(backbone=str(model_dir), backbone_num_layers=2,
                                                max_query_tokens=24, max_prompt_tokens=10))


def _batch(policy):
    from qpo_ray.common.device import move
    from qpo_ray.policy import as_batch, encode_rows

    pcfg = policy.config
    encoded = encode_rows(policy.tokenizer, ROWS["query"], ROWS["prompt"], ROWS["reward"],
                          pcfg.max_query_tokens, pcfg.max_prompt_tokens)
    return move(as_batch(encoded.tensors()), policy.device)


def _steps(engine, policy, n: int = 3) -> list[float]:
    batch = _batch(policy)
    losses = [float(engine.step(batch)["loss"].detach()) for _ in range(n)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    return losses


def check_policy(model_dir: Path) -> None:
    from qpo_ray.config import TrainingConfig
    from qpo_ray.policy import generate_prompts
    from qpo_ray.training.trainer import TorchEngine

    where = "GPU" if cuda() else "CPU"
    precisions = ["no", "fp16"] + (["bf16"] if devices.bf16_supported() else []) if cuda() \
        else ["no"]
    for precision in precisions:
        policy = _policy(model_dir)
        tcfg = TrainingConfig(use_gpu=cuda(), mixed_precision=precision, batch_size_global=8)
        tcfg.validate()
        losses = _steps(TorchEngine(policy, tcfg, lr=1e-3), policy)
        say("OK", f"policy training step, {where}, mixed_precision={precision}",
            f"losses {[round(x, 3) for x in losses]} on {policy.device}")
    if not cuda():
        say("SKIP", "policy training step on the GPU (fp16, bf16)", "no CUDA device")
    check_deepspeed(model_dir)
    policy = _policy(model_dir)
    start = time.perf_counter()
    out = generate_prompts(policy, ["a gripping film", "a dull film"])
    assert len(out) == 2 and all(isinstance(p, str) for p in out), out
    say("OK", f"policy generation, {where}", f"{len(out)} prompts in "
        f"{time.perf_counter() - start:.1f} s on {policy.device}: {out[0][:40]!r}")


def check_deepspeed(model_dir: Path) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # not installed, or no accelerator it knows
        say("SKIP", "DeepSpeed ZeRO-2 step", f"deepspeed not importable ({exc})")
        return
    import torch.distributed as dist

    from qpo_ray.config import TrainingConfig
    from qpo_ray.training.deepspeed_engine import DeepSpeedEngine

    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(devices.distributed_backend(cuda()), rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        precision = "fp16" if cuda() else "no"
        policy = _policy(model_dir)
        tcfg = TrainingConfig(use_gpu=cuda(), strategy="deepspeed", zero_stage=2,
                              mixed_precision=precision, batch_size_global=8)
        tcfg.validate()
        losses = _steps(DeepSpeedEngine(policy, tcfg, lr=1e-3, world_size=1), policy)
        say("OK", f"DeepSpeed ZeRO-2 step, {'GPU' if cuda() else 'CPU'}, "
            f"mixed_precision={precision}", f"losses {[round(x, 3) for x in losses]}")
    finally:
        dist.destroy_process_group()


# -- full mode: Ray, vLLM, Serve ----------------------------------------------------------

def check_vllm_in_ray(model_dir: Path) -> None:
    import ray

    from qpo_ray.backends.vllm_backend import VLLMBackend
    from qpo_ray.config import TargetConfig

    ref = label_logprobs(model_dir, "float32")
    dtype = "float16"
    actor = ray.remote(num_gpus=0.4)(VLLMBackend).remote(TargetConfig(
        backend="vllm", model=str(model_dir), dtype=dtype, use_chat_template=False,
        max_model_len_tokens=512, gpu_memory_utilization=0.3))
    try:
        rows = ray.get(actor.score_continuations.remote(PREFIXES, LABELS), timeout=600)
        ray.get(actor.close.remote())
    finally:
        ray.kill(actor)
    got = [[c.logprob_sum for c in row] for row in rows]
    diff = max_diff(got, ref)
    assert diff < TOLERANCE[dtype], (got, ref)
    picks = [max((0, 1), key=row.__getitem__) for row in got]
    assert picks == [max((0, 1), key=row.__getitem__) for row in ref] == [0, 1], (got, ref)
    say("OK", f"vLLM {dtype} in a Ray actor vs transformers float32 on the GPU",
        f"max |diff| {diff:.4f}, same answers {picks}")


def _dataset(out: Path) -> Path:
    import pandas as pd

    from qpo_ray.data.io import write_dataset

    n = len(ROWS["query"])
    frame = pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)], "query_id": [f"q{i}" for i in range(n)],
        "query": ROWS["query"], "prompt_id": [f"m{i % 2}" for i in range(n)],
        "prompt": ROWS["prompt"], "source": "manual", "label": "0", "group": 0, "loop": 0,
        "seed": 0, "demo_ids": [[] for _ in range(n)], "reward": ROWS["reward"]})
    return write_dataset(frame, out, None)


def check_ray_train(model_dir: Path, tmp: Path) -> None:
    from qpo_ray.config import load_config
    from qpo_ray.training.trainer import train_policy

    dataset = _dataset(tmp / "smoke.parquet")
    runs = [("ddp", "fp16"), ("deepspeed", "fp16")]
    if devices.bf16_supported():
        runs += [("ddp", "bf16"), ("deepspeed", "bf16")]
    else:
        say("SKIP", "Ray Train bf16", "no native bf16 (capability < 8.0)")
    for strategy, precision in runs:
        cfg = load_config(None, {
            "seed": 0, "workdir": str(tmp / "run"),
            "policy": {"backbone": str(model_dir), "backbone_num_layers": 2,
                       "max_query_tokens": 24, "max_prompt_tokens": 10},
            "training": {"num_workers": 1, "use_gpu": True, "strategy": strategy,
                         "zero_stage": 2, "mixed_precision": precision, "batch_size_global": 8,
                         "epochs_first_loop": 1, "max_steps_per_loop": 1}})
        start = time.perf_counter()
        result = train_policy(cfg, str(dataset), str(tmp / f"{strategy}-{precision}"), 1)
        loss = result.metrics[-1]["loss"]
        assert loss == loss, result.metrics
        say("OK", f"Ray Train one step, {strategy} {precision}, GPU worker",
            f"loss {loss:.3f} in {time.perf_counter() - start:.0f} s")


def check_serve_on_gpu(model_dir: Path, tmp: Path) -> None:
    import httpx
    from ray import serve

    from qpo_ray.config import load_config
    from qpo_ray.serving.app import run_serve
    from socket import socket

    policy_dir = _policy(model_dir).save(tmp / "policy")
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, {"workdir": str(tmp / "serve"),
                             "serve": {"port": port, "num_gpus_per_replica": 0.25,
                                       "insecure": True}})
    url = run_serve(cfg, blocking=False, policy_uri=str(policy_dir), with_target=False)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                reply = httpx.post(f"{url}/v1/prompt", json={"query": "a gripping film"},
                                   timeout=60)
                if reply.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the GPU replica never answered /v1/prompt"
            time.sleep(2)
        say("OK", "policy on a GPU Serve replica answers /v1/prompt", reply.json())
    finally:
        serve.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minimal", action="store_true")
    parser.add_argument("--cpu-reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_reference:
        print(json.dumps(label_logprobs(Path(args.cpu_reference), "float32")))
        return 0
    start = time.perf_counter()
    missing = [m for m in ("ray", "vllm", "mlflow") if importlib.util.find_spec(m) is None]
    if missing and not args.minimal:
        print(f"[smoke] FAIL full mode: {', '.join(missing)} not importable (install the "
              "project: scripts/setup.sh; or run --minimal)", file=sys.stderr, flush=True)
        return 2
    check_device()
    with tempfile.TemporaryDirectory(prefix="qpo-smoke-") as tmp_name:
        tmp = Path(tmp_name)
        if args.minimal:
            model = random_model(tmp / "model")
            say("OK", "embedded architecture with random weights", f"{model}")
            check_target(model)
            check_policy(model)
        else:
            from qpo_ray.common.local_ray import init_ray
            from qpo_ray.common.models import provision_embedded

            model = provision_embedded("smollm2-135m-instruct")
            if not cuda():
                say("SKIP", "vLLM in a Ray actor, Ray Train on GPU, Serve on GPU",
                    "no CUDA device (run --minimal for the CPU half)")
                return 0
            init_ray(None)
            check_vllm_in_ray(model)
            check_ray_train(model, tmp)
            check_serve_on_gpu(model, tmp)
    say("DONE", "all checks", f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
