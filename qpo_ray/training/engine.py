"""What every training engine (DDP's `training.TorchEngine`, `training_deepspeed.
DeepSpeedEngine`) sets up the same way: AdamW with the configured weight decay and the
reference code's StepLR, stepped once per epoch by the training loop (DeepSpeed would
step a scheduler it owns per batch, so it is never handed this one)."""

from __future__ import annotations

import torch

from qpo_ray.config import TrainingConfig
from qpo_ray.policy import QPOPolicy


class EngineBase:
    """The optimizer and schedule of one training run; subclasses add `step` and `save`."""

    def __init__(self, policy: QPOPolicy, tcfg: TrainingConfig, lr: float):
        self.policy = policy
        self.device = policy.device
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=lr,
                                           weight_decay=tcfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=tcfg.lr_step_epochs, gamma=tcfg.lr_step_gamma)

    def end_epoch(self) -> None:
        self.scheduler.step()
