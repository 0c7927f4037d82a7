"""Decoder-only transformer (Llama / Qwen2 / Qwen3 family) in Flax NNX, with a KV cache.

One block: h = x + Attn(RMSNorm(x)); y = h + SwiGLU(RMSNorm(h)). The blocks are created
stacked on a leading ``layers`` axis (``nnx.vmap``) and run with one ``jax.lax.scan``, so
compile time does not grow with depth; the KV cache is stacked on the same axis.

Papers: "Attention Is All You Need" (Vaswani et al. 2017, arXiv 1706.03762); "Root Mean
Square Layer Normalization" (Zhang & Sennrich 2019, arXiv 1910.07467); "RoFormer: Enhanced
Transformer with Rotary Position Embedding" (Su et al. 2021, arXiv 2104.09864); "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints" (Ainslie
et al. 2023, arXiv 2305.13245); "GLU Variants Improve Transformer" (Shazeer 2020, arXiv
2002.05202); "The Llama 3 Herd of Models" (arXiv 2407.21783, RoPE frequency scaling);
"Qwen2 Technical Report" (arXiv 2407.10671, q/k/v bias); "Qwen3 Technical Report" (arXiv
2505.09388, per-head q/k RMSNorm).

Attention runs through `gmpo_jax.models.attention` (``TransformerConfig.attention_impl``): by default
a blockwise flash-style kernel on the CPU, cuDNN on GPUs (16-bit), splash on TPUs, so neither
the training step nor a prefill holds a [B, H, T, T] score matrix; a single decode step uses
the dense kernel (its scores are [B, H, 1, S]).

The rotary embedding uses the "rotate half" pairing (dimension i with i + head_dim/2) that
Hugging Face checkpoints are stored for, so their weights load without permutation.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``layers``) as ``out_sharding`` metadata, created with
``eager_sharding=False`` so the model builds without a mesh; a sharding module maps the
names to mesh axes with ``nnx.get_partition_spec`` under ``nnx.logical_axis_rules``.
Traced under ``jax.set_mesh``, the hidden states are pinned to the batch axes after the
embedding and at the top of every layer (``gmpo_jax.infra.sharding.constrain_to_batch_axes``).

The hyperparameters live in `gmpo_jax.models.transformer_config` (named presets in
`gmpo_jax.models.presets`) and the cache in `gmpo_jax.models.kv_cache`; their public names are
importable from here too. One concept: the decoder's layers and its forward pass, hence its
length.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gmpo_jax.infra.sharding import constrain_to_batch_axes, target_platform
from gmpo_jax.models import attention as attention_lib
from gmpo_jax.models.kv_cache import (  # noqa: F401 - re-exported where they lived
    KVCache,
    default_cache_dtype,
    init_cache,
)
from gmpo_jax.models.quantization import weight_value
from gmpo_jax.models.transformer_config import (  # noqa: F401 - re-exported where they lived
    REMAT_POLICIES,
    RopeScaling,
    TransformerConfig,
    matmul_precision,
)

# The outputs of a block's weight matmuls, named (`jax.ad_checkpoint.checkpoint_name`, an
# identity outside `jax.checkpoint`) so that remat='projections' keeps exactly these.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# On the CPU a scan over at most this many layers is unrolled (`default_layer_unroll`).
CPU_UNROLLED_LAYERS = 8


def default_layer_unroll(backend: str, num_layers: int) -> int:
  """Layers per layer-scan iteration without a cache when the config leaves `layer_unroll` unset.

  XLA:CPU runs a scanned block's backward through stacked residuals (zero-filled buffers,
  dynamic slices, transposed copies for the weight-gradient matmuls) that an unrolled block
  does not need: on the 4-layer 3.3M-parameter Llama of `benchmarks/e2e_peer.py` unrolling cut
  the update's kernel time by about a quarter. Compile time grows with the unrolled layers, so
  deep models and accelerators keep one compiled block.

  Args:
    backend: the target platform (`gmpo_jax.infra.sharding.target_platform()`).
    num_layers: L.

  Returns:
    L on 'cpu' when L <= CPU_UNROLLED_LAYERS, else 1.
  """
  return num_layers if backend == "cpu" and num_layers <= CPU_UNROLLED_LAYERS else 1


def remat_layer(layer, policy: str):
  """`layer` rematerialized under a `TransformerConfig.remat` policy (see there).

  `prevent_cse=False`: the layer runs inside `jax.lax.scan`, which already keeps XLA from
  merging the recomputation with the forward pass (`jax.checkpoint`'s documentation).

  Args:
    layer: the layer scan's body, (carry, xs) -> (carry, ys).
    policy: one of `REMAT_POLICIES`.

  Returns:
    The body with the same values; under differentiation it saves only what `policy` keeps.
  """
  if policy == "none":
    return layer
  if policy == "full":
    return jax.checkpoint(layer, prevent_cse=False)
  return jax.checkpoint(
      layer, prevent_cse=False, policy=jax.checkpoint_policies.save_only_these_names(*PROJECTIONS)
  )


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
  """y = scale · x / sqrt(mean(x²) + ε) over the last axis.

  RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467). The statistics are computed in
  float32 and the normalized value is cast back to x's dtype before the scale, as in the
  Hugging Face Llama/Qwen implementations.

  Args:
    x: [..., N] activations.
    scale: [N] weights.
    eps: ε > 0, so an all-zero row maps to zeros (finite).

  Returns:
    [..., N] in x's dtype.
  """
  chex.assert_rank(scale, 1)
  chex.assert_axis_dimension(x, -1, scale.shape[0])
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: TransformerConfig) -> np.ndarray:
  """θ_i = rope_theta^(−2i/head_dim), i < head_dim/2, then the config's rope_scaling.

  RoFormer (Su et al. 2021, arXiv 2104.09864); llama3 scaling from "The Llama 3 Herd of
  Models" (arXiv 2407.21783), see `RopeScaling`.

  Args:
    config: the model config (static).

  Returns:
    [head_dim/2] float32 NumPy array (computed in float64).
  """
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta**exponents)
  scaling = config.rope_scaling
  if scaling is not None:
    if scaling.rope_type == "linear":
      inv_freq = inv_freq / scaling.factor
    else:
      context = scaling.original_max_position_embeddings
      wavelength = 2 * math.pi / inv_freq
      scaled = np.where(
          wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
      )
      smooth = (context / wavelength - scaling.low_freq_factor) / (
          scaling.high_freq_factor - scaling.low_freq_factor
      )
      smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
      medium = (wavelength >= context / scaling.high_freq_factor) & (
          wavelength <= context / scaling.low_freq_factor
      )
      inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """x·cos(pθ) + rotate_half(x)·sin(pθ), rotate_half([x₁, x₂]) = [−x₂, x₁].

  RoFormer (Su et al. 2021, arXiv 2104.09864) with the "rotate half" pairing of dimension
  i with i + head_dim/2 (the layout of Hugging Face Llama/Qwen checkpoints). Computed in
  float32, returned in x's dtype.

  Args:
    x: [B, T, N, head_dim] queries or keys.
    positions: [B, T] int32 positions p (may be negative for left padding; finite).
    inv_freq: [head_dim/2] float32 θ.

  Returns:
    [B, T, N, head_dim] in x's dtype.
  """
  chex.assert_rank([x, positions, inv_freq], [4, 2, 1])
  chex.assert_axis_dimension(x, 3, 2 * inv_freq.shape[0])
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq.astype(jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# The dense reference kernel, under its historical name.
grouped_query_attention = attention_lib.dense_attention


def contract(x: jax.Array, w: jax.Array, *, axes: int, precision: jax.lax.Precision) -> jax.Array:
  """x · w over the last `axes` axes of x and the first `axes` of w, as one 2-D matmul.

  [..., K1..Kn] · [K1..Kn, O...] -> [..., O...] through [M, K] @ [K, O] with the leading axes
  (batch and time) flattened into M, a free reshape in row-major layout. Why not the einsum:
  the transpose of a dot_general that keeps B and T apart contracts over both in the weight
  gradient, and XLA:CPU writes a transposed copy of the [B, T, F] cotangent for it; the 2-D
  form's weight gradient is a plain [K, M] @ [M, O]. Same values; on the 4-layer Llama of
  `benchmarks/e2e_peer.py` the MLP alone in this form cut value-and-grad time by 18%.
  """
  lead, inner, out = x.shape[:-axes], x.shape[x.ndim - axes :], w.shape[axes:]
  chex.assert_equal(inner, w.shape[:axes])
  y = jnp.matmul(
      x.reshape(math.prod(lead), math.prod(inner)),
      w.reshape(math.prod(inner), math.prod(out)),
      precision=precision,
  )
  return y.reshape(*lead, *out)


def linear(
    module: nnx.Module,
    name: str,
    x: jax.Array,
    *,
    axes: int,
    dtype: Any,
    precision: jax.lax.Precision,
) -> jax.Array:
  """x · W for the weight `module.<name>`, plus the low-rank update of a LoRA adapter
  `module.<name>_lora` when one is attached (`gmpo_jax.models.lora`): computed as
  scale · (x · A) · B, never as a merged weight, so the base stays as stored (quantized or not)
  and its gradient is never formed."""
  y = contract(x, weight_value(getattr(module, name), dtype), axes=axes, precision=precision)
  adapter = getattr(module, f"{name}_lora", None)
  if adapter is not None:
    y = y + adapter(x, dtype=dtype, precision=precision)
  return y


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str) -> nnx.Param:
  """A parameter with logical axis names; `eager_sharding=False` so no mesh is needed."""
  if init == "normal":
    # Llama/Qwen's initializer_range.
    value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale [N] (see `rms_norm`)."""

  def __init__(self, size: int, axis_name: str, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, (size,), (axis_name,), config.param_dtype, "ones")
    self.eps = config.rms_norm_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], eps=self.eps)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k/v bias and per-head q/k norm."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd, pd = (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.param_dtype,
    )
    self.config = config
    self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, "normal")
    self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, "normal")
    self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, "normal")
    self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, "normal")
    if config.attention_bias:
      self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros")
      self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, "zeros")
      self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, "zeros")
    if config.qk_norm:
      self.q_norm = RMSNorm(hd, "head_dim", config, rngs=rngs)
      self.k_norm = RMSNorm(hd, "head_dim", config, rngs=rngs)

  def _project(self, x: jax.Array, name: str) -> jax.Array:
    dtype = self.config.dtype
    y = linear(self, f"{name}_proj", x, axes=1, dtype=dtype, precision=self.config.matmul_precision)
    if self.config.attention_bias:
      y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
    return checkpoint_name(y, f"{name}_proj")

  def qkv(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
    """Rotated queries [B,T,H,hd], rotated keys and values [B,T,K,hd]."""
    q, k, v = self._project(x, "q"), self._project(x, "k"), self._project(x, "v")
    if self.config.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

  def output(self, attended: jax.Array) -> jax.Array:
    return checkpoint_name(
        linear(
            self,
            "o_proj",
            attended,
            axes=2,
            dtype=self.config.dtype,
            precision=self.config.matmul_precision,
        ),
        "o_proj",
    )


class MLP(nnx.Module):
  """SwiGLU: down(silu(x W_gate) ⊙ x W_up) (Shazeer 2020, arXiv 2002.05202)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    d, f, pd = config.hidden_size, config.intermediate_size, config.param_dtype
    self.dtype, self.precision = config.dtype, config.matmul_precision
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd, "normal")
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd, "normal")
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd, "normal")

  def __call__(self, x: jax.Array) -> jax.Array:
    matmul = functools.partial(linear, self, axes=1, dtype=self.dtype, precision=self.precision)
    gate = checkpoint_name(matmul("gate_proj", x), "gate_proj")
    up = checkpoint_name(matmul("up_proj", x), "up_proj")
    return checkpoint_name(matmul("down_proj", jax.nn.silu(gate) * up), "down_proj")


class Block(nnx.Module):
  """Pre-norm decoder block: h = x + Attn(norm(x)), y = h + MLP(norm(h))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, "embed", config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, "embed", config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring and docs/CONTRACTS.md.

  Parameters (logical axes in brackets): embedding [vocab, embed]; blocks, each stacked
  on a leading [layers] axis: attn_norm.scale [embed], attn.{q,k,v}_proj
  [embed, heads|kv_heads, head_dim], attn.o_proj [heads, head_dim, embed], optional
  attn.{q,k,v}_bias and attn.{q,k}_norm.scale, mlp_norm.scale, mlp.{gate,up}_proj
  [embed, mlp], mlp.down_proj [mlp, embed]; final_norm.scale [embed]; lm_head
  [embed, vocab] when untied. Initialization: N(0, 0.02²) weights, unit norm scales, zero
  biases. To build on an accelerator without a host copy, wrap the constructor in
  `nnx.jit`; to build without computing, `nnx.eval_shape`.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedding = _param(
        rngs,
        (config.vocab_size, config.hidden_size),
        ("vocab", "embed"),
        config.param_dtype,
        "normal",
    )

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        axis_size=config.num_layers,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def make_blocks(layer_rngs: nnx.Rngs) -> Block:
      return Block(config, rngs=layer_rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(config.hidden_size, "embed", config, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(
          rngs,
          (config.hidden_size, config.vocab_size),
          ("embed", "vocab"),
          config.param_dtype,
          "normal",
      )

  def __call__(
      self,
      tokens: jax.Array,
      positions: jax.Array,
      *,
      key_mask: jax.Array | None = None,
      cache: KVCache | None = None,
      read_slots: int | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states of a chunk of tokens, optionally extending a KV cache.

    Without a cache, query t attends to keys s ≤ t with key_mask[b, s]. With a cache, the
    chunk's keys/values are written to slots [index, index + T), key_mask is merged into
    cache.key_mask there, and query t (slot index + t) attends to valid slots ≤ index + t.

    Args:
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 RoPE positions, padding-aware: cumsum(mask) − 1 for a
        left-padded prompt, then last position + 1 per decode step.
      key_mask: [B, T] bool, False at padding; default all True.
      cache: KVCache with capacity S ≥ index + T, or None.
      read_slots: with a cache, attend to its first `read_slots` slots only (static; at least
        index + T, which the caller guarantees under jit): a decode step early in a long
        completion then reads the live part of the cache, not all S slots. None: all S.

    Returns:
      (hidden [B, T, D] in config.dtype, the updated cache with index += T, or None).
      Hidden states at padding positions are finite but meaningless.

    Raises:
      AssertionError: wrong ranks, shapes or dtypes (chex).
      ValueError: outside jit, a token id outside [0, V) or a chunk that does not fit in
        the cache. Under jit neither can be checked: ids are clipped to [0, V) and the
        caller must ensure index + T ≤ S (XLA clamps out-of-range cache writes).
    """
    config = self.config
    chex.assert_rank([tokens, positions], 2)
    chex.assert_type([tokens, positions], int)
    chex.assert_equal_shape([tokens, positions])
    batch, length = tokens.shape
    if key_mask is None:
      key_mask = jnp.ones((batch, length), bool)
    chex.assert_type(key_mask, bool)
    chex.assert_shape(key_mask, (batch, length))

    if not isinstance(tokens, jax.core.Tracer):
      host_tokens = np.asarray(tokens)  # NumPy: no traced op even inside an outer jit
      low, high = int(host_tokens.min()), int(host_tokens.max())
      if low < 0 or high >= config.vocab_size:
        raise ValueError(f"Token ids must lie in [0, {config.vocab_size}), got [{low}, {high}].")
    if cache is not None:
      chex.assert_shape(cache.key_mask, (batch, cache.capacity))
      chex.assert_shape(
          [cache.k, cache.v],
          (config.num_layers, batch, config.num_kv_heads, cache.capacity, config.head_dim),
      )
      if length > cache.capacity:
        raise ValueError(f"A chunk of {length} tokens cannot fit a cache of {cache.capacity}.")
      read_slots = cache.capacity if read_slots is None else read_slots
      if not length <= read_slots <= cache.capacity:
        raise ValueError(
            f"read_slots={read_slots} must lie in [{length}, {cache.capacity}] "
            f"(the chunk's {length} tokens, the cache's capacity)."
        )
      # Under jit the index is traced and the caller guarantees the fit (see Raises).
      if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + length > read_slots:
        raise ValueError(
            f"Cache overflow: index {int(cache.index)} + {length} new tokens > "
            f"{read_slots} slots (capacity {cache.capacity})."
        )
    elif read_slots is not None:
      raise ValueError("read_slots applies to a call with a cache.")

    # Under jit ids cannot be checked; clip instead of jnp.take's default NaN fill.
    x = jnp.take(self.embedding[...], tokens, axis=0, mode="clip").astype(config.dtype)
    # Under a mesh, keep activations split over the batch axes (a no-op without one).
    x = constrain_to_batch_axes(x)
    inv_freq = jnp.asarray(rope_inverse_frequencies(config))
    if cache is None:
      attended_mask, offset = key_mask, 0
      layers_k = layers_v = index = None
    else:
      index = offset = cache.index
      new_key_mask = jax.lax.dynamic_update_slice(cache.key_mask, key_mask, (0, index))
      attended_mask = new_key_mask[:, :read_slots]
      layers_k, layers_v = cache.k, cache.v
    # The platform of the mesh the call is traced under: a TPU program compiled on a CPU host
    # gets the TPU kernels.
    backend = target_platform()
    impl = attention_lib.resolve_impl(
        config.attention_impl,
        backend=backend,
        dtype=config.dtype,
        num_queries=length,
        cached=cache is not None,
    )
    attend = functools.partial(
        attention_lib.causal_attention,
        key_mask=attended_mask,
        impl=impl,
        query_offset=offset,
        block_size=config.attention_block_size or attention_lib.default_block_size(backend),
        precision=config.matmul_precision,
    )
    # The dense kernel's masks are built once and shared by the layers.
    if impl != "xla":
      dense_masks = None
    elif cache is None:
      dense_masks = attention_lib.causal_padding_mask(attended_mask, length)
    else:
      # Over the cache: its slots before the chunk; over the chunk: causal and padded.
      before_chunk = jnp.arange(read_slots) < index
      dense_masks = (
          attention_lib.causal_padding_mask(attended_mask, length, offset) & before_chunk,
          attention_lib.causal_padding_mask(key_mask, length),
      )

    graphdef, block_state = nnx.split(self.blocks)

    def layer(h, xs):
      # With a cache, the layer reads its [B, K, S, head_dim] slices of the stacked cache in
      # place (a slice the dot fuses, not a scanned-over copy); the chunk's keys and values
      # leave as the scan's outputs and are written after it.
      state, layer_index = xs
      h = constrain_to_batch_axes(h)
      block = nnx.merge(graphdef, state)
      q, k, v = block.attn.qkv(block.attn_norm(h), positions, inv_freq)
      if cache is None:
        attended = attend(q, k, v, dense_mask=dense_masks)
        written = None
      else:
        cached_k, cached_v = (
            stacked[layer_index, :, :, :read_slots].astype(q.dtype)
            for stacked in (layers_k, layers_v)
        )
        if impl == "xla":
          attended = attention_lib.cached_dense_attention(
              q,
              cached_k,
              cached_v,
              dense_masks[0],
              k,
              v,
              dense_masks[1],
              precision=config.matmul_precision,
          )
        else:
          # A prefill kernel takes all keys in one array: the chunk written into a copy of
          # the layer's slice, slot-major (one copy per layer per prefill).
          k_all, v_all = (
              jnp.swapaxes(
                  jax.lax.dynamic_update_slice(cached, jnp.swapaxes(new, 1, 2), (0, 0, index, 0)),
                  1,
                  2,
              )
              for cached, new in ((cached_k, k), (cached_v, v))
          )
          attended = attend(q, k_all, v_all)
        written = tuple(jnp.swapaxes(new, 1, 2).astype(cache.k.dtype) for new in (k, v))
      h = h + block.attn.output(attended)
      h = h + block.mlp(block.mlp_norm(h))
      return h, written

    layer = remat_layer(layer, config.remat)
    # Unrolling pays in the backward pass; on the CPU an unrolled decode ran 1.18x slower.
    unroll = config.layer_unroll or (
        1 if cache is not None else default_layer_unroll(backend, config.num_layers)
    )
    x, written = jax.lax.scan(
        layer,
        x,
        (block_state, jnp.arange(config.num_layers)),
        unroll=min(unroll, config.num_layers),
    )
    if cache is not None:
      # One write of every layer's chunk: [L, B, K, T, head_dim] at slot `index`.
      layers_k, layers_v = (
          jax.lax.dynamic_update_slice(stacked, new, (0, 0, 0, index, 0))
          for stacked, new in ((layers_k, written[0]), (layers_v, written[1]))
      )
    hidden = self.final_norm(x)
    if cache is None:
      return hidden, None
    return hidden, KVCache(k=layers_k, v=layers_v, key_mask=new_key_mask, index=index + length)

  def unembed_matrix(self) -> jax.Array:
    """[D, V] output projection in config.dtype (tied: the embedding transposed)."""
    if self.config.tie_word_embeddings:
      return self.embedding[...].T.astype(self.config.dtype)
    return self.lm_head[...].astype(self.config.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """logits = hidden · W_unembed, accumulated and returned in float32.

    Args:
      hidden: [B, T, D] final-norm hidden states.

    Returns:
      [B, T, V] float32.
    """
    chex.assert_rank(hidden, 3)
    chex.assert_axis_dimension(hidden, 2, self.config.hidden_size)
    return jnp.einsum(
        "btd,dv->btv",
        hidden.astype(self.config.dtype),
        self.unembed_matrix(),
        precision=self.config.matmul_precision,
        preferred_element_type=jnp.float32,
    )
