"""The decoder's KV cache: the `KVCache` pytree, its default dtype and `init_cache`.

A cache is allocated by the sampler (`gmpo_jax.rollout.sampling`) and the planners at a
fixed capacity and filled by `gmpo_jax.models.transformer.Transformer`, which writes each
layer's keys and values into it during prefill and decode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gmpo_jax.infra.sharding import target_platform
from gmpo_jax.models.transformer_config import TransformerConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer at a fixed capacity S, filled left to right.

  Heads come before slots so that a decode step's dense kernel, which contracts each (row,
  head) pair's [S, head_dim] keys, reads the cache in place: stored [L, B, S, K, head_dim]
  the TPU compiler copied every layer's K and V into this order at every step (the decode
  step read about three times the bytes it needs; docs/tpu.md).

  Attributes:
    k: [L, B, K, S, head_dim] keys (after RoPE), compute dtype.
    v: [L, B, K, S, head_dim] values.
    key_mask: [B, S] bool, True where a slot holds a real (non-padding) token.
    index: int32 scalar, the number of slots written so far (the next write position).
  """

  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  index: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[3]


def default_cache_dtype(config: TransformerConfig, backend: str | None = None) -> np.dtype:
  """KV-cache storage dtype when none is asked for: bfloat16 on accelerators, else the model's.

  A decode step reads the whole live cache; on a GPU/TPU, where that read is the step's cost,
  a float32 model keeps its cache in bfloat16 (half the bytes; the scores and softmax stay
  float32). On the CPU, and for 16-bit models, the cache has the compute dtype. The learner
  rescores log-probabilities without a cache, so this affects which tokens are sampled, not
  the log-probs the objective uses.

  Args:
    config: the model config.
    backend: `gmpo_jax.infra.sharding.target_platform()` when None.

  Returns:
    bfloat16 for a float32 model on 'gpu' / 'cuda' / 'rocm' / 'tpu', else ``config.dtype``.
  """
  backend = target_platform() if backend is None else backend
  if backend in ("gpu", "cuda", "rocm", "tpu") and config.dtype == jnp.float32:
    return jnp.dtype(jnp.bfloat16)
  return config.dtype


def init_cache(config: TransformerConfig, batch: int, capacity: int, dtype: Any = None) -> KVCache:
  """An empty cache: zeros, no valid slot, index 0.

  Args:
    config: the model config.
    batch: B.
    capacity: S, the most tokens (prompt + generated, padding included) the cache holds.
    dtype: storage dtype of k/v; default `default_cache_dtype(config)` (``config.dtype`` on
      the CPU, bfloat16 for a float32 model on GPU/TPU).

  Returns:
    KVCache with k, v [L, B, K, S, head_dim], key_mask [B, S] all False, index 0.
  """
  if batch <= 0 or capacity <= 0:
    raise ValueError(f"init_cache needs batch > 0 and capacity > 0, got {batch}, {capacity}.")
  dtype = default_cache_dtype(config) if dtype is None else jnp.dtype(dtype)
  shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      key_mask=jnp.zeros((batch, capacity), bool),
      index=jnp.zeros((), jnp.int32),
  )
