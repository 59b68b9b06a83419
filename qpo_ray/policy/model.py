"""The QPO policy: a causal LM conditioned on a target reward (paper section 2.2, A.3).

Input ``[R | q tokens | p tokens]`` in fixed slots (see `batching`):

- R is not a token: `reward_embed` (a linear layer) maps reward / 100 to one hidden
  vector that takes position 0;
- a segment ("timestep") embedding, index 0/1/2 for reward/query/prompt positions, is
  added to every input vector, and a LayerNorm normalises the stacked input embeddings
  (as in the reference code);
- `reward_head` reads the hidden state at position 0 and predicts the input reward
  (MSE, training only);
- loss = NLL(prompt tokens | R, q) + lambda * MSE, lambda = `reward_loss_weight`;
- optionally a query summary (`policy.query_summary.layers`, qpo_ray.policy.summary)
  adds one vector, read from the query by frozen pretrained layers, to every `[R | q]`
  input; `train_only_summary` freezes all but it for the summary phase of training.

The backbone is any Hugging Face causal LM (GPT-2, Llama-style, ...), optionally cut
to its first `backbone_num_layers` layers. Language-model logits are computed only at
the positions that predict real prompt tokens: the vocabulary projection is most of the
cost of a small backbone, and query positions carry no loss.

The SFT ablation (`mode == "sft"`) is this same model fed a constant reward of 100 with
the reward loss switched off; `batching.training_rows` picks its best-prompt rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qpo_ray.common.atomic import atomic_dir
from qpo_ray.config import PolicyConfig, section_from_dict
from qpo_ray.common.device import get_device
from qpo_ray.common.errors import ConfigError
from qpo_ray.common.models import cut_config, resolve_model
from qpo_ray.policy.batching import REWARD_SCALE, position_ids_from_mask, trim_padding
from qpo_ray.policy.mbr import UtilityTable, load_table, save_table
from qpo_ray.policy.summary import QuerySummary

FORMAT_VERSION = 1
POLICY_FILE = "qpo_policy.json"
HEADS_FILE = "qpo_heads.safetensors"
# Segment indices of the three input parts.
SEG_REWARD, SEG_QUERY, SEG_PROMPT = 0, 1, 2


class QPOPolicy(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, config: PolicyConfig):
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ValueError(f"policy backbone {config.backbone!r}: its tokenizer has no EOS token")
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.reward_embed = nn.Linear(1, hidden)
        self.segment_embed = nn.Embedding(3, hidden)
        self.embed_ln = nn.LayerNorm(hidden)
        self.reward_head = nn.Linear(hidden, 1)
        self.query_summary = (QuerySummary(config.backbone, config.query_summary.num_layers,
                                           config.query_summary.dims, hidden)
                              if config.query_summary.num_layers else None)
        # mbr decoding's table, when the policy directory has one (the train stage writes
        # it from Step 0): saved and loaded with the policy, so Serve can decode by it.
        self.mbr_table: Optional[UtilityTable] = None

    # ----- construction, save, load -------------------------------------------------
    @classmethod
    def from_backbone(cls, cfg: PolicyConfig, device: torch.device | None = None) -> "QPOPolicy":
        """A fresh policy: pretrained backbone (cut to `cfg.backbone_num_layers`) + new heads."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(cfg.backbone)
        config = cut_config(path, cfg.backbone_num_layers, "policy.backbone_num_layers")
        # Cutting layers makes transformers warn with a table of the checkpoint's unused
        # layers on every build; those are expected, so only missing weights are reported.
        report = logging.getLogger("transformers.modeling_utils")
        level = report.level
        if cfg.backbone_num_layers is not None:
            report.setLevel(logging.ERROR)
        try:
            backbone, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=torch.float32, output_loading_info=True)
        finally:
            report.setLevel(level)
        if info.get("missing_keys"):
            logging.getLogger(__name__).warning(
                "policy backbone %s: weights not in the checkpoint (newly initialised): %s",
                path, sorted(info["missing_keys"]))
        policy = cls(backbone, AutoTokenizer.from_pretrained(path), cfg)
        policy._init_heads()
        return policy.to(device or get_device())

    def _init_heads(self) -> None:
        # The LayerNorm outputs unit-variance vectors; scaling its gain to the backbone's
        # own embedding scale keeps the pretrained layers' inputs at the size they know.
        with torch.no_grad():
            scale = self.backbone.get_input_embeddings().weight.float().std()
            self.embed_ln.weight.fill_(scale.item())
            nn.init.normal_(self.segment_embed.weight, std=0.02)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save(self, directory: str | Path) -> Path:
        """Backbone + tokenizer via save_pretrained, heads as safetensors, config as JSON.

        Written into a temporary sibling and swapped in whole (qpo_ray.common.atomic): a reader
        (Serve, a resumed run) or a crash mid-save sees the old policy or the new one,
        never a mixture. An existing directory is replaced, so it must be a policy."""
        out = Path(directory)
        if out.is_dir() and any(out.iterdir()) and not (out / POLICY_FILE).exists():
            raise ValueError(f"{out} is not empty and not a policy directory: refusing to "
                             "replace it with a policy")
        with atomic_dir(out) as tmp:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            heads = {k: v.detach().cpu().contiguous() for k, v in self.heads_state_dict().items()}
            save_file(heads, str(tmp / HEADS_FILE))
            meta = {"format_version": FORMAT_VERSION, "policy": dataclasses.asdict(self.config)}
            (tmp / POLICY_FILE).write_text(json.dumps(meta, indent=2))
            if self.mbr_table is not None:
                save_table(self.mbr_table, tmp)
        return out

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | None = None) -> "QPOPolicy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(directory)
        meta_path = src / POLICY_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{src} is not a QPO policy directory (no {POLICY_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r} "
                             f"is not {FORMAT_VERSION}")
        try:  # the policy section as it was saved (older flat keys migrated)
            config = section_from_dict(PolicyConfig, meta["policy"], "policy")
        except ConfigError as exc:
            raise ValueError(f"{meta_path}: {exc}") from exc
        # A policy is safetensors only (save writes nothing else): pickled weights
        # (pytorch_model.bin) can run code when loaded, and a policy may come from a registry.
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

        if not any((src / n).exists() for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise ValueError(f"{src}: no {SAFE_WEIGHTS_NAME} backbone weights"
                             + (f" (found {', '.join(pickles)})" if pickles else "")
                             + "; a QPO policy is loaded from safetensors only, never from "
                             "pickled weights: re-save it with QPOPolicy.save")
        backbone = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                        use_safetensors=True)
        policy = cls(backbone, AutoTokenizer.from_pretrained(src), config)
        result = policy.load_state_dict(load_file(str(src / HEADS_FILE)), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{src / HEADS_FILE}: missing {missing}, unexpected "
                             f"{result.unexpected_keys}")
        policy.mbr_table = load_table(src)
        return policy.to(device or get_device())

    # ----- embeddings ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.reward_embed.weight.device

    def reward_input(self, reward: torch.Tensor) -> torch.Tensor:
        """Reward on the 0-1 scale the model reads; SFT ignores the reward (constant 1)."""
        if self.config.mode == "sft":
            return torch.ones_like(reward, dtype=torch.float32)
        return reward.float() / REWARD_SCALE

    def _segment(self, index: int) -> torch.Tensor:
        return self.segment_embed.weight[index]

    def embed_prefix(self, reward: torch.Tensor, query_ids: torch.Tensor,
                     query_mask: torch.Tensor) -> torch.Tensor:
        """(B,) rewards on the 0-100 scale + (B, Q) left-padded query ids and their mask
        -> (B, 1+Q, H) input vectors."""
        r = self.reward_embed(self.reward_input(reward).unsqueeze(-1).to(self.reward_embed.weight.dtype))
        r = r.unsqueeze(1) + self._segment(SEG_REWARD)
        q = self.backbone.get_input_embeddings()(query_ids) + self._segment(SEG_QUERY)
        prefix = self.embed_ln(torch.cat([r, q], dim=1))
        if self.query_summary is None:
            return prefix
        return prefix + self.query_summary(query_ids, query_mask).unsqueeze(1).to(prefix.dtype)

    def train_only_summary(self) -> None:
        """Freeze all but the query summary's adapter and the small input/reward parts
        the paper's policy adds to its backbone (the summary phase of training)."""
        if self.query_summary is None:
            raise ConfigError("training.summary.epochs: the policy has no query summary "
                              "(policy.query_summary.enable: false)")
        self.requires_grad_(False)
        for part in (self.query_summary.adapter, self.reward_embed, self.segment_embed,
                     self.embed_ln, self.reward_head):
            part.requires_grad_(True)

    def embed_prompt_tokens(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        p = self.backbone.get_input_embeddings()(prompt_ids) + self._segment(SEG_PROMPT)
        return self.embed_ln(p)

    def run_backbone(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, past_key_values=None, use_cache: bool = False):
        """The backbone without its LM head (hidden states + the KV cache)."""
        return self.backbone.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
        )

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_output_embeddings()(hidden)

    # ----- training ------------------------------------------------------------------
    def prompt_logits_and_reward(self, batch: dict[str, torch.Tensor]):
        """(logits at the N real prompt tokens (N, V), their targets (N,), r_hat (B,)).

        The hidden state at slot t predicts the token at slot t + 1, so the P prompt
        slots Q+1 .. Q+P are predicted from slots Q .. Q+P-1; only rows whose target is
        a real (unpadded) prompt token go through the LM head.
        """
        q_ids, q_mask = trim_padding(batch["query_ids"], batch["query_mask"], "left")
        p_ids, p_mask = trim_padding(batch["prompt_ids"], batch["prompt_mask"], "right")
        num_q, num_p = q_ids.shape[1], p_ids.shape[1]
        embeds = torch.cat([self.embed_prefix(batch["reward"], q_ids, q_mask),
                            self.embed_prompt_tokens(p_ids)], dim=1)
        ones = torch.ones_like(q_mask[:, :1])
        mask = torch.cat([ones, q_mask, p_mask], dim=1)
        hidden = self.run_backbone(embeds, mask, position_ids_from_mask(mask)).last_hidden_state
        valid = p_mask.bool()
        logits = self.lm_logits(hidden[:, num_q:num_q + num_p][valid])
        r_hat = self.reward_head(hidden[:, 0]).squeeze(-1)
        return logits, p_ids[valid], r_hat

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (the `forward` so DDP/DeepSpeed wrappers can call it)."""
        logits, targets, r_hat = self.prompt_logits_and_reward(batch)
        prompt_loss = F.cross_entropy(logits.float(), targets)
        target = self.reward_input(batch["reward"])
        reward_loss = F.mse_loss(r_hat.float(), target)
        weight = 0.0 if self.config.mode == "sft" else self.config.reward_loss_weight
        return {
            "loss": prompt_loss + weight * reward_loss,
            "prompt_loss": prompt_loss,
            "reward_loss": reward_loss,
            # On the dataset's 0-100 scale, for humans.
            "reward_mae": (r_hat.float() - target).abs().mean().detach() * REWARD_SCALE,
        }

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self(batch)
