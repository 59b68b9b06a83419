"""Faster decoding on CPU: every nn.Linear of a model reads a contiguous copy of W^T.

Decoding multiplies a few rows (the batch) by each weight; MKL runs that 1.3-8x slower
on nn.Linear's layout (x @ W^T with W stored row-major) than on a stored W^T, most of
all at batch 8, which is what Serve's dynamic batching produces (benchmarks/
serve_latency.py). The copy costs the linear weights' memory once more (~210 MB for a
6-layer SmolLM2 policy) and is refreshed whenever the weight changes (an optimizer step
or a load bumps the tensor's version), so training afterwards stays correct; with
gradients on, the layer runs its usual path.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from qpo_ray.common import device as devices


def _pretransposed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return nn.functional.linear(x, self.weight, self.bias)
    version = (self.weight.data_ptr(), self.weight._version)
    if self._qpo_weight_t_version != version:
        self._qpo_weight_t = self.weight.detach().t().contiguous()
        self._qpo_weight_t_version = version
    out = x @ self._qpo_weight_t
    return out + self.bias if self.bias is not None else out


def speed_up_decoding(model: nn.Module) -> int:
    """Switch the model's linear layers to stored-W^T matmuls where that is faster
    (CPU); returns how many layers were switched (0 on GPU). Idempotent."""
    switched = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        if not devices.wants_pretransposed_weights(module.weight.device):
            continue
        if not hasattr(module, "_qpo_weight_t_version"):
            module._qpo_weight_t = None
            module._qpo_weight_t_version = None
            module.forward = types.MethodType(_pretransposed_forward, module)
        switched += 1
    return switched
