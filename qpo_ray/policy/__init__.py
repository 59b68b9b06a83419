"""The QPO policy model (reward-conditioned prompt generator), its batching and generation.

Core module: torch and transformers only, never Ray, MLflow, vLLM or DeepSpeed.
"""

from qpo_ray.policy.batching import REWARD_SCALE, EncodedRows, as_batch, encode_rows, training_rows
from qpo_ray.policy.generation import embed_queries, generate_prompts
from qpo_ray.policy.model import QPOPolicy

__all__ = [
    "QPOPolicy", "generate_prompts", "embed_queries", "encode_rows", "training_rows",
    "as_batch", "EncodedRows", "REWARD_SCALE",
]
