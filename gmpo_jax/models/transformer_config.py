"""The decoder's hyperparameters: `TransformerConfig`, its RoPE scaling and dtype rules.

Kept apart from the model (`gmpo_jax.models.transformer`) because the experiment config,
the planners and the checkpoint readers need the hyperparameters without the layers. The
config reads a Hugging Face ``config.json`` (`TransformerConfig.from_hf_config`) or a named
preset (`TransformerConfig.from_name`, values in `gmpo_jax.models.presets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.models import attention as attention_lib
from gmpo_jax.models.presets import PRESETS

_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "projections")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency rescaling for context extension, as stored in HF ``rope_scaling``.

  ``linear``: θ_i ← θ_i / factor. ``llama3`` (Llama 3.1 / 3.2, arXiv 2407.21783): with
  wavelength λ_i = 2π/θ_i, λ_lo = L₀/low_freq_factor, λ_hi = L₀/high_freq_factor
  (L₀ = original_max_position_embeddings): θ_i unchanged if λ_i < λ_hi, θ_i/factor if
  λ_i > λ_lo, otherwise (1 − s)θ_i/factor + sθ_i with s = (L₀/λ_i − low)/(high − low).
  """

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
          f"Unsupported RoPE scaling type {self.rope_type!r}; supported: 'linear', 'llama3' "
          "(and no scaling)."
      )
    if not self.factor > 0:
      raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}.")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
          "llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
          f"{self.high_freq_factor} <= {self.low_freq_factor}."
      )


def _canonical_dtype(name: str, value: Any) -> np.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError as err:
    raise ValueError(f"{name}={value!r} is not a dtype; use one of {_SUPPORTED_DTYPES}.") from err
  if dtype.name not in _SUPPORTED_DTYPES:
    raise ValueError(f"{name}={value!r} is not supported; use one of {_SUPPORTED_DTYPES}.")
  return dtype


def matmul_precision(dtype: Any) -> jax.lax.Precision:
  """The matmul precision of a compute dtype: HIGHEST for float32, DEFAULT otherwise.

  On GPUs/TPUs the default runs float32 matmuls in TF32/bfloat16 passes (errors ~1e-3 in the
  logits), and log-prob ratios need float32. Every matmul of the model and of the logits
  projection (`gmpo_jax.models.logprobs.project_logits`) uses this rule.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the decoder; frozen and hashable, so it can be a static jit argument.

  Attributes:
    vocab_size: V.
    hidden_size: D.
    intermediate_size: SwiGLU width F.
    num_layers: L.
    num_heads: query heads H.
    num_kv_heads: key/value heads K (H % K == 0; K = H is multi-head attention).
    head_dim: per-head width (Qwen3 has H·head_dim ≠ D).
    rope_theta: RoPE base b, θ_i = b^(−2i/head_dim).
    rms_norm_eps: ε inside every RMSNorm.
    tie_word_embeddings: the output projection is the embedding matrix transposed.
    attention_bias: biases on the q/k/v projections (Qwen2); o_proj never has one.
    qk_norm: per-head RMSNorm over head_dim on q and k before RoPE (Qwen3).
    param_dtype: storage dtype of the parameters.
    dtype: compute dtype (activations, KV cache by default); norms, attention softmax and
      logits are computed in float32 regardless.
    max_position_embeddings: the longest context the model was trained for (informational).
    remat: what each layer keeps for the backward pass, one of `REMAT_POLICIES`
      (`jax.checkpoint` on the layer scan's body; "Training Deep Nets with Sublinear Memory
      Cost", Chen et al. 2016, arXiv 1604.06174): 'none' keeps every intermediate the
      backward reads; 'full' only the layer's input, recomputing the whole block (one more
      forward pass of the blocks; least memory); 'projections' the outputs of the block's
      seven weight matmuls (`PROJECTIONS`), recomputing norms, RoPE, attention and the
      SwiGLU product. Changes no value.
    rope_scaling: optional RoPE frequency rescaling (llama-3.2-1b uses 'llama3').
    attention_impl: attention kernel, one of `gmpo_jax.models.attention.IMPLEMENTATIONS`: 'auto'
      (per backend, dtype and length: `gmpo_jax.models.attention.resolve_impl`), 'xla' (dense
      [B, H, T, S] scores, the reference), 'blockwise' (flash-style pure JAX, no T×S array
      in value or gradient), 'cudnn' (GPU, float16/bfloat16) or 'splash' (TPU). A single
      decode step always uses the dense kernel; the vendor kernels do not extend a cache.
    attention_block_size: query/key block length of 'blockwise' and 'splash'; None = per
      backend (`gmpo_jax.models.attention.default_block_size`: 64 on CPU, 512 elsewhere).
    layer_unroll: layers per iteration of the layer scan (`jax.lax.scan`'s `unroll`). None:
      with a cache (prefill, decode) one layer at a time, without one (the learner's forward
      and backward) `default_layer_unroll` for the backend. Changes no value.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  qk_norm: bool = False
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  max_position_embeddings: int = 2048
  remat: str = "none"
  rope_scaling: RopeScaling | None = None
  attention_impl: str = "auto"
  attention_block_size: int | None = None
  layer_unroll: int | None = None

  def __post_init__(self):
    # Every int field is a size or a count, so positive; an optional one may be None.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type != "int" and (field.type != "int | None" or value is None):
        continue
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TransformerConfig.{field.name} must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
      )
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")
    if not self.rope_theta > 1.0:
      raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}.")
    if not self.rms_norm_eps > 0.0:
      raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}.")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}.")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(
          f"attention_impl={self.attention_impl!r} is not one of "
          f"{attention_lib.IMPLEMENTATIONS}."
      )
    object.__setattr__(self, "param_dtype", _canonical_dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _canonical_dtype("dtype", self.dtype))

  @property
  def matmul_precision(self) -> jax.lax.Precision:
    """`matmul_precision(self.dtype)`: HIGHEST for float32 compute."""
    return matmul_precision(self.dtype)

  @classmethod
  def from_name(cls, name: str) -> TransformerConfig:
    """The published hyperparameters of a named model; `dataclasses.replace` to override.

    Args:
      name: a key of `gmpo_jax.models.presets.PRESETS`: 'tiny', 'llama-100m', 'qwen2-0.5b',
        'qwen2.5-0.5b', 'qwen2.5-1.5b', 'qwen2.5-7b', 'qwen3-0.6b', 'llama-3.2-1b'.

    Returns:
      The config (float32 parameters and compute; remat off).
    """
    if name not in PRESETS:
      raise ValueError(f"Unknown model name {name!r}; known: {sorted(PRESETS)}.")
    preset = dict(PRESETS[name])
    if "rope_scaling" in preset:
      preset["rope_scaling"] = RopeScaling(**preset["rope_scaling"])
    return cls(**preset)

  @classmethod
  def from_hf_config(cls, hf_config: dict[str, Any]) -> TransformerConfig:
    """Reads a Hugging Face ``config.json`` dict (model_type llama, qwen2 or qwen3).

    Accepts both the transformers-5 keys (``rope_parameters``, ``dtype``) and the older
    top-level ``rope_theta`` / ``rope_scaling`` / ``torch_dtype``. The checkpoint dtype
    becomes ``param_dtype`` and ``dtype``; override with `dataclasses.replace`.

    Args:
      hf_config: the parsed config.json.

    Returns:
      The matching config.

    Raises:
      ValueError: an unsupported model_type, RoPE scaling type, sliding-window attention,
        o_proj / MLP biases, or a non-SiLU activation.
    """
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "qwen2", "qwen3"):
      raise ValueError(
          f"Unsupported model_type {model_type!r}; supported: 'llama', 'qwen2', 'qwen3'."
      )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"Only the SiLU (SwiGLU) MLP is supported, config has hidden_act={act!r}.")
    if hf_config.get("mlp_bias", False):
      raise ValueError("MLP biases (mlp_bias=True) are not supported.")
    layer_types = set(hf_config.get("layer_types") or ["full_attention"])
    if hf_config.get("use_sliding_window", False) or layer_types != {"full_attention"}:
      raise ValueError("Sliding-window attention (use_sliding_window=True) is not supported.")
    # Llama and Qwen3 put `attention_bias` on q, k, v AND o_proj; only Qwen2's q/k/v-only
    # bias is supported.
    if model_type in ("llama", "qwen3") and hf_config.get("attention_bias", False):
      raise ValueError(
          f"{model_type} with attention_bias=True (which includes an o_proj bias) is not supported."
      )
    if hf_config.get("pretraining_tp", 1) not in (1, None):
      raise ValueError("pretraining_tp != 1 is not supported.")

    rope = dict(hf_config.get("rope_parameters") or {})
    legacy_scaling = hf_config.get("rope_scaling")
    if legacy_scaling:
      rope = {**legacy_scaling, **rope}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("partial_rotary_factor != 1 is not supported.")
    if rope_type == "default":
      rope_scaling = None
    elif rope_type in ("linear", "llama3"):
      fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
      rope_scaling = RopeScaling(rope_type=rope_type, **{k: rope[k] for k in fields if k in rope})
    else:
      raise ValueError(
          f"Unsupported RoPE scaling type {rope_type!r}; supported: 'default', 'linear', 'llama3'."
      )

    num_heads = hf_config["num_attention_heads"]
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return cls(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        param_dtype=dtype,
        dtype=dtype,
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rope_scaling=rope_scaling,
    )
