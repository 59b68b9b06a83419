"""DeepSpeed ZeRO for the policy: the engine the Ray worker drives, and the merge of its
sharded checkpoint back into a plain policy directory.

DeepSpeed joins the process group Ray Train already set up (gloo on CPUs, NCCL on
GPUs). The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so the
schedule (StepLR per epoch) and the weight decay are the same as under DDP. Gradient
clipping and bf16/fp16 are DeepSpeed's own (config keys below), with fp32 master
weights partitioned across ranks.

Under ZeRO every rank holds only its partition of the fp32 master weights (and, at
stage 3, of the parameters), so every rank saves and reports its own shard; the driver
then merges them (DeepSpeed's `zero_to_fp32` arithmetic, but shards read with torch's
weights-only unpickler, see `load_shard`) and writes the result with `QPOPolicy.save`.
The shards themselves are DeepSpeed's format (torch.save); the policy directory users
load is safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpo_ray.config import TrainingConfig
from qpo_ray.common.device import autocast_dtype, get_device
from qpo_ray.training.engine import EngineBase
from qpo_ray.policy import QPOPolicy

DEEPSPEED_SUBDIR = "deepspeed"
CHECKPOINT_TAG = "final"


def deepspeed_config(tcfg: TrainingConfig, world_size: int) -> dict[str, Any]:
    per_worker = tcfg.batch_size_global // world_size
    # On CPU workers DeepSpeed trains in float32 ("auto" included; bf16/fp16 are refused
    # there when the config loads).
    amp = autocast_dtype(tcfg.mixed_precision, get_device()) if tcfg.use_gpu else None
    return {
        "train_batch_size": per_worker * world_size,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": tcfg.grad_clip_norm,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "bf16": {"enabled": amp == torch.bfloat16},
        "fp16": {"enabled": amp == torch.float16},
        # Progress is reported through Ray Train once per epoch, not DeepSpeed's log.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(EngineBase):
    """Same surface as `training.TorchEngine`: step, end_epoch, save, optimizer."""

    def __init__(self, policy: QPOPolicy, tcfg: TrainingConfig, lr: float, world_size: int):
        import deepspeed

        super().__init__(policy, tcfg, lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=self.optimizer,
            config=deepspeed_config(tcfg, world_size), dist_init_required=False,
        )

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.engine(batch)
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def save(self, rank_dir: Path, rank: int) -> bool:
        """Collective: every rank writes its own ZeRO shard under `rank_dir`."""
        self.engine.save_checkpoint(str(rank_dir / DEEPSPEED_SUBDIR), tag=CHECKPOINT_TAG)
        return True


# The only non-tensor types DeepSpeed pickles into ZeRO shards (0.19: ZeRO stage enum,
# the fp16 loss scalers, the fragment map of the optimizer's flat buffers). Loading
# allows exactly these besides tensors and plain containers; anything else in a shard
# (a crafted or foreign file) fails naming the global instead of running code.
_SHARD_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def load_shard(path: str | Path) -> dict[str, Any]:
    """One DeepSpeed shard file, with torch's weights-only unpickler (never pickle's
    arbitrary object construction)."""
    import importlib
    import pickle

    allowed = []
    for spec in _SHARD_GLOBALS:
        module, name = spec.split(":")
        allowed.append(getattr(importlib.import_module(module), name))
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: not a plain DeepSpeed shard, refusing to unpickle "
                             f"it: {exc}") from exc


def consolidate_checkpoint(checkpoint_dir: Path, policy: QPOPolicy) -> None:
    """Load the fp32 weights merged from every rank's shard into `policy` (strict: a
    parameter missing from the shards is an error, not a silently stale weight).

    DeepSpeed's `zero_to_fp32` loads shards with `weights_only=False`; here they are read
    with `load_shard` and only DeepSpeed's merge arithmetic (pure tensor code) is reused."""
    from deepspeed.checkpoint import constants as c
    from deepspeed.utils import zero_to_fp32 as z

    ds_dir = checkpoint_dir / DEEPSPEED_SUBDIR
    tag_dir = ds_dir / CHECKPOINT_TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed checkpoint tagged {CHECKPOINT_TAG!r}")
    model_states = []
    for path in z.get_model_state_files(str(tag_dir)):
        sd = load_shard(path)
        buffer_names = sd[c.BUFFER_NAMES]
        model_states.append(z.zero_model_state(
            buffers={k: v.float() if v.is_floating_point() else v
                     for k, v in sd["module"].items() if k in buffer_names},
            param_shapes=sd[c.PARAM_SHAPES],
            shared_params=[[k, v] for k, v in sd["shared_params"].items()],
            ds_version=sd.get(c.DS_VERSION),
            frozen_param_shapes=sd.get(c.FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(c.FROZEN_PARAM_FRAGMENTS)))
    optim = [load_shard(p)[c.OPTIMIZER_STATE_DICT] for p in z.get_optim_files(str(tag_dir))]
    stage = int(optim[0][c.ZERO_STAGE])
    world_size = optim[0][c.PARTITION_COUNT]
    world_size = max(world_size) if isinstance(world_size, list) else int(world_size)
    if world_size != len(optim):
        raise ValueError(f"{tag_dir}: {len(optim)} optimizer shards for a world of {world_size}")
    if stage <= 2:
        groups = [o[c.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
        state = z._get_fp32_state_dict_from_zero2_checkpoint(
            world_size, groups, model_states, False, optim[0].get(c.PARAM_ALIGNMENT_PADDINGS))
    else:
        groups = [o[c.FP32_FLAT_GROUPS] for o in optim]
        state = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, groups, model_states,
                                                            False)
    state = z.to_torch_tensor(state)
    policy.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
