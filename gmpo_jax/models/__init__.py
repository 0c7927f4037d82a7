"""Policy models: the decoder-only transformer, and its Hugging Face checkpoint import and
export."""

from gmpo_jax.models.hf_export import export_hf
from gmpo_jax.models.hf_import import load_hf_checkpoint
from gmpo_jax.models.transformer import (
    KVCache,
    RopeScaling,
    Transformer,
    TransformerConfig,
    init_cache,
)

__all__ = [
    "KVCache",
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "export_hf",
    "init_cache",
    "load_hf_checkpoint",
]
