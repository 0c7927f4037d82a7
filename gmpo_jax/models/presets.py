"""The named models `TransformerConfig.from_name` builds, as plain data.

The values are those of each model's config.json on the Hugging Face hub ('tiny' and
'llama-100m' are this project's own from-scratch sizes). A family's shared settings are
written once (`_LLAMA`, `_QWEN2`, `_QWEN3`), a model's sizes as one row, and a model that
differs from a sibling by a field is that sibling with the field replaced, so a reader sees
what sets each model apart. ``rope_scaling`` holds the keyword arguments of a
`gmpo_jax.models.transformer_config.RopeScaling`, as the hub stores it; this module imports
nothing of the model, so the config module can read it.
"""

from __future__ import annotations

from typing import Any

# The order of a model's sizes row: V, D, F, L, H, K, head_dim, context length.
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)

_LLAMA = dict(rms_norm_eps=1e-5, tie_word_embeddings=True)
_QWEN = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
_QWEN2 = dict(_QWEN, attention_bias=True)  # biases on the q/k/v projections
_QWEN3 = dict(_QWEN, qk_norm=True)  # per-head RMSNorm on q and k


def _model(family: dict[str, Any], sizes: tuple[int, ...], **own: Any) -> dict[str, Any]:
  """A preset: its family's settings, its sizes row (in `_SIZES` order), then its own values."""
  return {**family, **dict(zip(_SIZES, sizes, strict=True)), **own}


_QWEN2_0_5B = _model(_QWEN2, (151_936, 896, 4864, 24, 14, 2, 64, 131_072))

PRESETS: dict[str, dict[str, Any]] = {
    # CPU default and tests; the vocabulary covers CharTokenizer (99 ids).
    "tiny": _model(
        dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        (128, 64, 128, 2, 4, 2, 16, 512),
    ),
    # A from-scratch Llama-style model of about 100M parameters (100.1M with tied embeddings).
    "llama-100m": _model(_LLAMA, (32_000, 768, 2048, 12, 12, 4, 64, 2048), rope_theta=10_000.0),
    "qwen2-0.5b": _QWEN2_0_5B,
    # Qwen2.5-0.5B has Qwen2-0.5B's weights' shapes and a 32K context.
    "qwen2.5-0.5b": dict(_QWEN2_0_5B, max_position_embeddings=32_768),
    "qwen2.5-1.5b": _model(_QWEN2, (151_936, 1536, 8960, 28, 12, 2, 128, 131_072)),
    # Qwen2.5-7B(-Instruct): untied embeddings, 28 query and 4 key/value heads of 128.
    "qwen2.5-7b": _model(
        _QWEN2, (152_064, 3584, 18_944, 28, 28, 4, 128, 32_768), tie_word_embeddings=False
    ),
    "qwen3-0.6b": _model(_QWEN3, (151_936, 1024, 3072, 28, 16, 8, 128, 40_960)),
    "llama-3.2-1b": _model(
        _LLAMA,
        (128_256, 2048, 8192, 16, 32, 8, 64, 131_072),
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}
