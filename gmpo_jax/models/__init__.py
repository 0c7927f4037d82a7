"""Policy models: the decoder-only transformer and the Hugging Face checkpoint importer."""

from gmpo_jax.models.hf_import import load_hf_checkpoint
from gmpo_jax.models.transformer import (
    KVCache,
    RopeScaling,
    Transformer,
    TransformerConfig,
    init_cache,
)

__all__ = [
    "KVCache", "RopeScaling", "Transformer", "TransformerConfig", "init_cache",
    "load_hf_checkpoint",
]
