"""The query summary: a second, probe-sized path from the query to the policy's inputs.

Why: fine-tuned end to end on a few hundred queries, the policy memorises which prompt
each training query had and learns nothing that carries to new queries (docs/experiments.md: the
query-specific correlation stays at ~0 on dev, even when every training row is the
query's best prompt). A review's sentiment does read linearly from the backbone's
middle layers. So the summary reads the query with the backbone's first
`policy.query_summary.layers` *pretrained* layers (frozen, never saved: rebuilt from
`policy.backbone`), mean-pools them over the query's tokens, keeps the top
`policy.query_summary.dims` principal components of the training queries (whitened), and a
linear adapter maps those few numbers to one vector added to every `[R | q]` input.
Trained alone (training.summary.epochs, the backbone frozen), the adapter can only
steer the policy by directions that are shared across queries, much as a ridge probe.

State saved with the policy's heads: the centring vector, the projection, the adapter
and whether the projection was fitted (an unfitted summary adds nothing).
"""

from __future__ import annotations

import logging
import torch
from torch import nn

from qpo_ray.common.models import cut_config, resolve_model


class QuerySummary(nn.Module):
    def __init__(self, backbone: str, num_layers: int, dims: int, hidden: int):
        super().__init__()
        self.backbone, self.num_layers, self.dims = backbone, num_layers, dims
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("proj", torch.zeros(hidden, dims))
        self.register_buffer("fitted", torch.zeros(()))
        self.adapter = nn.Linear(dims, hidden)
        # Zero: a fresh summary leaves the policy exactly as it was.
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        # A plain list, not a submodule: the reader is pretrained and frozen, so it is
        # neither saved with the policy nor seen by optimizers or DDP.
        self._reader: list[nn.Module] = []

    def _read_model(self, device: torch.device) -> nn.Module:
        if not self._reader:
            from transformers import AutoModel

            path = resolve_model(self.backbone)
            config = cut_config(path, self.num_layers, "policy.query_summary.layers")
            # The checkpoint's deeper layers are expected to go unused: no warning table.
            report = logging.getLogger("transformers.modeling_utils")
            level = report.level
            report.setLevel(logging.ERROR)
            try:
                model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32)
            finally:
                report.setLevel(level)
            self._reader.append(model.eval().requires_grad_(False))
        reader = self._reader[0]
        if reader.device != device:
            reader.to(device)
        return reader

    @torch.no_grad()
    def read(self, query_ids: torch.Tensor, query_mask: torch.Tensor,
             batch_size: int = 64) -> torch.Tensor:
        """(B, hidden) float32: the reader's last state, mean-pooled over real tokens."""
        reader = self._read_model(query_ids.device)
        out = []
        for i in range(0, len(query_ids), batch_size):
            ids, mask = query_ids[i:i + batch_size], query_mask[i:i + batch_size].long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding
            hidden = reader(input_ids=ids, attention_mask=mask,
                            position_ids=positions).last_hidden_state.float()
            weight = mask.unsqueeze(-1).float()
            out.append((hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0))
        return torch.cat(out)

    @torch.no_grad()
    def fit(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        """Centre, scale and project onto the whitened top principal components of these
        (distinct, training) queries."""
        feats = self.read(query_ids, query_mask)
        if len(feats) <= self.dims:
            raise ValueError(f"query summary: needs more than policy.query_summary.dims="
                             f"{self.dims} distinct training queries, got {len(feats)}")
        mean, scale = feats.mean(0), feats.std(0) + 1e-6
        _, singular, vt = torch.linalg.svd((feats - mean) / scale, full_matrices=False)
        spread = singular[:self.dims] / (len(feats) - 1) ** 0.5
        self.mean.copy_(mean)
        self.proj.copy_(vt[:self.dims].T / scale.unsqueeze(1) / spread.unsqueeze(0))
        self.fitted.fill_(1.0)

    def forward(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the vector added to each `[R | q]` input (zeros until fitted)."""
        if not bool(self.fitted):
            return torch.zeros(len(query_ids), self.mean.shape[0], device=query_ids.device)
        z = (self.read(query_ids, query_mask) - self.mean) @ self.proj
        return self.adapter(z.to(self.adapter.weight.dtype))

