"""DeepSpeed ZeRO for the policy: the engine the Ray worker drives, and the merge of its
sharded checkpoint back into a plain policy directory.

DeepSpeed joins the process group Ray Train already set up (gloo on CPUs, NCCL on
GPUs). The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so the
schedule (StepLR per epoch) and the weight decay are the same as under DDP. Gradient
clipping and bf16/fp16 are DeepSpeed's own (config keys below), with fp32 master
weights partitioned across ranks.

Under ZeRO every rank holds only its partition of the fp32 master weights (and, at
stage 3, of the parameters), so every rank saves and reports its own shard; the driver
then merges them with DeepSpeed's `zero_to_fp32` and writes the result with
`QPOPolicy.save`. The shards themselves are DeepSpeed's format (torch.save); the policy
directory users load is safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpo_ray.config import TrainingConfig
from qpo_ray.policy import QPOPolicy

DEEPSPEED_SUBDIR = "deepspeed"
CHECKPOINT_TAG = "final"


def deepspeed_config(tcfg: TrainingConfig, world_size: int) -> dict[str, Any]:
    per_worker = tcfg.batch_size_global // world_size
    return {
        "train_batch_size": per_worker * world_size,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": tcfg.grad_clip_norm,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "bf16": {"enabled": tcfg.mixed_precision == "bf16"},
        "fp16": {"enabled": tcfg.mixed_precision == "fp16"},
        # Progress is reported through Ray Train once per epoch, not DeepSpeed's log.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """Same surface as `training.TorchEngine`: step, end_epoch, save, optimizer."""

    def __init__(self, policy: QPOPolicy, tcfg: TrainingConfig, lr: float, world_size: int):
        import deepspeed

        self.policy = policy
        self.device = policy.device
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=lr,
                                           weight_decay=tcfg.weight_decay)
        # Stepped once per epoch by the loop (DeepSpeed would step a scheduler per batch).
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=tcfg.lr_step_epochs, gamma=tcfg.lr_step_gamma)
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=self.optimizer,
            config=deepspeed_config(tcfg, world_size), dist_init_required=False,
        )

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.engine(batch)
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def end_epoch(self) -> None:
        self.scheduler.step()

    def save(self, rank_dir: Path, rank: int) -> bool:
        """Collective: every rank writes its own ZeRO shard under `rank_dir`."""
        self.engine.save_checkpoint(str(rank_dir / DEEPSPEED_SUBDIR), tag=CHECKPOINT_TAG)
        return True


def consolidate_checkpoint(checkpoint_dir: Path, policy: QPOPolicy) -> None:
    """Load the fp32 weights merged from every rank's shard into `policy` (strict: a
    parameter missing from the shards is an error, not a silently stale weight)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = checkpoint_dir / DEEPSPEED_SUBDIR
    if not (ds_dir / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed checkpoint tagged {CHECKPOINT_TAG!r}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=CHECKPOINT_TAG)
    policy.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
