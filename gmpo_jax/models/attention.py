"""Causal grouped-query attention over a padded batch, with four interchangeable kernels.

One concept: causal grouped-query attention, one contract behind four kernels and the rule that
picks one, hence its length.

Every kernel computes, for query t of row b sitting at cache slot o + t (o = ``query_offset``,
0 without a cache),

    out[b, t, h] = Σ_s softmax_s(q[b,t,h] · k[b,s,h//G] / sqrt(head_dim) | allowed) v[b,s,h//G],
    allowed(b, t, s) = (s ≤ o + t) ∧ key_mask[b, s],

("Attention Is All You Need", arXiv 1706.03762; grouped-query heads, G = H / K, from Ainslie
et al. 2023, arXiv 2305.13245). They differ in memory and in where they run:

  * ``xla``: `dense_attention`, the reference: one float32 [B, H, T, S] score matrix
    (quadratic memory, and its autodiff saves the probabilities of that size).
  * ``blockwise``: `blockwise_attention`, flash-style in pure JAX ("FlashAttention", Dao et
    al. 2022, arXiv 2205.14135; "FlashAttention-2", Dao 2023, arXiv 2307.08691): an online
    softmax over key blocks inside a loop over query blocks, skipping the key blocks above
    the causal diagonal, with a custom VJP that recomputes each block's scores, so neither
    pass holds more than one [B, H, block, block] score tile. Any backend.
  * ``cudnn``: `jax.nn.dot_product_attention(implementation='cudnn')` (fused flash attention
    on NVIDIA GPUs; float16 / bfloat16 only).
  * ``splash``: the Pallas TPU splash-attention kernel
    (`jax.experimental.pallas.ops.tpu.splash_attention`); TPU only, run per device inside
    `jax.shard_map` on a mesh (XLA cannot partition a Mosaic kernel).

`resolve_impl` turns ``'auto'`` into one of these for a target platform, dtype and shape; the
model asks for the platform of the mesh it is traced under (`gmpo_jax.infra.sharding.target_platform`),
so a TPU program compiled from a CPU host gets the TPU kernels.

Rows with no allowed key (a query at a left-padding position) are finite and meaningless:
`dense_attention` and `blockwise_attention` both return the mean of v over all S keys there
(what a softmax over S equal masked scores gives); cuDNN and splash return other finite
values. No real token has such a row, and a padding position's output never reaches a real
token (padding keys are masked), so the kernels agree on everything that is used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gmpo_jax.infra import sharding

Impl = Literal["auto", "xla", "blockwise", "cudnn", "splash"]
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
DEFAULT_BLOCK_SIZE = 512
CPU_BLOCK_SIZE = 64

# Masked scores: a finite floor instead of −inf, so a query with no allowed key gets a finite
# softmax rather than NaN (uniform over its S keys).
MASK_VALUE = float(np.finfo(np.float32).min)


def _check_qkv(q, k, v, key_mask):
  chex.assert_rank([q, k, v, key_mask], [4, 4, 4, 2])
  chex.assert_equal_shape([k, v])
  chex.assert_type(key_mask, bool)
  batch, _, num_heads, head_dim = q.shape
  chex.assert_shape(k, (batch, None, None, head_dim))
  chex.assert_shape(key_mask, k.shape[:2])
  if num_heads % k.shape[2]:
    raise ValueError(f"{num_heads} query heads is not a multiple of {k.shape[2]} kv heads.")


def _accumulation_dtype(x):
  """float32 for 16- and 32-bit inputs; float64 inputs (gradient checks) stay float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def causal_padding_mask(
    key_mask: jax.Array, num_queries: int, query_offset: jax.Array | int = 0
) -> jax.Array:
  """allowed[b, t, s] = (s ≤ query_offset + t) ∧ key_mask[b, s].

  Args:
    key_mask: [B, S] bool, True on real tokens / written cache slots.
    num_queries: T.
    query_offset: int32 scalar o, the slot of query 0 (0 without a cache).

  Returns:
    [B, T, S] bool.
  """
  chex.assert_rank(key_mask, 2)
  slots = jnp.arange(key_mask.shape[1])
  query_slots = query_offset + jnp.arange(num_queries)
  return (slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    precision: jax.lax.Precision = jax.lax.Precision.DEFAULT,
) -> jax.Array:
  """softmax(q kᵀ / sqrt(head_dim) masked) v, each query head reading key head h // (H/K).

  The reference kernel (module docstring). Scores and softmax in float32; the probabilities
  are cast to v's dtype for the value product. K/V are not repeated: the queries are viewed
  as [B, T, K, G, head_dim].

  Args:
    q: [B, T, H, head_dim] queries.
    k: [B, S, K, head_dim] keys, H % K == 0.
    v: values, shaped as k.
    mask: [B, T, S] bool, True where query t may attend to key s (any pattern).
    precision: matmul precision of both products.

  Returns:
    [B, T, H, head_dim] in q's dtype. A query row with no True in its mask attends
    uniformly to all S keys (finite, meaningless): only padding positions have such rows.
  """
  chex.assert_rank([q, k, v, mask], [4, 4, 4, 3])
  chex.assert_equal_shape([k, v])
  grouped = _group_queries(q, k.shape[2])
  chex.assert_shape(mask, (q.shape[0], q.shape[1], k.shape[1]))
  probs = _masked_softmax(_scores(grouped, k, "bskd", precision), mask)
  return _ungroup(_weighted_values(probs, v, "bskd", precision), q)


def cached_dense_attention(
    q: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    cache_mask: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_mask: jax.Array,
    *,
    precision: jax.lax.Precision = jax.lax.Precision.DEFAULT,
) -> jax.Array:
  """`dense_attention` over a read-only KV cache followed by the chunk's own keys.

  The softmax runs over the concatenation [cache slots ; chunk keys]; only the [.., S + T]
  scores are concatenated, never the keys: the cache is read in place (a slice of the
  stacked cache) and written after the layers, so a decode step neither copies nor
  re-lays-out the cache (a cache carried through the layer scan and updated there made the
  TPU compiler keep it in a write-friendly layout and copy every layer's slice at every
  step).

  Args:
    q: [B, T, H, head_dim] queries of the chunk.
    cache_k: [B, K, S, head_dim] the cache's keys before this chunk (kv heads major).
    cache_v: values, shaped as cache_k.
    cache_mask: [B, T, S] bool, True where query t may attend to cache slot s (slots the
      chunk is about to overwrite must be False).
    k: [B, T, K, head_dim] the chunk's keys; v: its values.
    chunk_mask: [B, T, T] bool, True where query t may attend to chunk key t'.
    precision: matmul precision of the products.

  Returns:
    [B, T, H, head_dim] in q's dtype; equal to `dense_attention` over the cache with the
    chunk written into it, up to the order of the floating-point sums.
  """
  chex.assert_rank([q, cache_k, cache_v, cache_mask, k, v, chunk_mask], [4, 4, 4, 3, 4, 4, 3])
  chex.assert_equal_shape([cache_k, cache_v])
  chex.assert_equal_shape([k, v])
  batch, length = q.shape[:2]
  chex.assert_shape(cache_mask, (batch, length, cache_k.shape[2]))
  chex.assert_shape(chunk_mask, (batch, length, length))
  grouped = _group_queries(q, cache_k.shape[1])
  scores = jnp.concatenate(
      [_scores(grouped, cache_k, "bksd", precision), _scores(grouped, k, "bskd", precision)],
      axis=-1,
  )
  probs = _masked_softmax(scores, jnp.concatenate([cache_mask, chunk_mask], axis=-1))
  num_slots = cache_k.shape[2]
  out = _weighted_values(probs[..., :num_slots], cache_v, "bksd", precision) + _weighted_values(
      probs[..., num_slots:], v, "bskd", precision
  )
  return _ungroup(out, q)


def _group_queries(q, num_kv_heads):
  """[B, T, H, head_dim] -> [B, T, K, G, head_dim]: query head h reads key head h // G."""
  batch, length, num_heads, head_dim = q.shape
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} kv heads.")
  return q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)


def _ungroup(out, q):
  return out.reshape(q.shape).astype(q.dtype)


def _scores(grouped, k, kv, precision):
  """[B, K, G, T, S] scaled scores in the accumulation dtype; `kv` is k's einsum layout."""
  scores = jnp.einsum(
      f"btkgd,{kv}->bkgts",
      grouped,
      k,
      precision=precision,
      preferred_element_type=_accumulation_dtype(grouped),
  )
  return scores * (grouped.shape[-1] ** -0.5)


def _masked_softmax(scores, mask):
  """Softmax over the keys of [B, K, G, T, S] scores where the [B, T, S] mask allows."""
  return jax.nn.softmax(jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE), axis=-1)


def _weighted_values(probs, v, kv, precision):
  """[B, T, K, G, head_dim]: probabilities (cast to v's dtype) times values."""
  return jnp.einsum(
      f"bkgts,{kv}->btkgd",
      probs.astype(v.dtype),
      v,
      precision=precision,
      preferred_element_type=_accumulation_dtype(probs),
  )


# ----------------------------------------------------------------------------------------
# Blockwise (flash-style) attention in pure JAX.


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    query_offset: jax.Array | int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    precision: jax.lax.Precision = jax.lax.Precision.DEFAULT,
) -> jax.Array:
  """Causal, key-masked GQA attention without a [T, S] array, in value and gradient.

  Online softmax (Milakov & Gimelshein 2018, arXiv 1805.02867) as in FlashAttention-2 (Dao
  2023, arXiv 2307.08691): for query block Q_i and key blocks K_j, j = 0 … last block at or
  before the diagonal,
      m ← max(m, rowmax S_ij),  ℓ ← ℓ·e^{m_old − m} + rowsum P_ij,  A ← A·e^{m_old − m} + P_ij V_j,
  with S_ij = Q_i K_jᵀ / sqrt(head_dim) and P_ij = e^{S_ij − m} on allowed entries, 0 elsewhere;
  out = A / ℓ. The custom VJP saves only out and log-sum-exp L = m + log ℓ ([B, H, T] float32)
  and recomputes P_ij = e^{S_ij − L} block by block:
      dV_j += P_ijᵀ dO_i,  dS_ij = P_ij ⊙ (dO_i V_jᵀ − rowsum(dO_i ⊙ O_i)),
      dQ_i += dS_ij K_j / sqrt(d),  dK_j += dS_ijᵀ Q_i / sqrt(d).
  Scratch memory is O(B · H · block²) for the tiles plus O(B · (T + S) · H · head_dim) for the
  gradient accumulators. Grouped-query heads read their shared K/V block directly (queries
  viewed as [B, K, G, block, head_dim]); K/V are never repeated.

  Args:
    q: [B, T, H, head_dim] queries.
    k: [B, S, K, head_dim] keys, H % K == 0.
    v: [B, S, K, head_dim] values.
    key_mask: [B, S] bool, True on keys that may be attended to.
    query_offset: int32 scalar o (may be traced): query t sits at key slot o + t and attends
      to slots s ≤ o + t. 0 for self-attention over the chunk (S = T).
    block_size: query and key block length (Python int > 0); T and S are zero-padded to a
      multiple internally, and a length shorter than it is one block.
    precision: matmul precision of all products.

  Returns:
    [B, T, H, head_dim] in q's dtype; scores, softmax statistics and accumulators are float32
    (float64 for float64 inputs).
    A query with no allowed key gets the mean of v over the S keys (as `dense_attention`).
    Differentiable in q, k, v (reverse mode).
  """
  _check_qkv(q, k, v, key_mask)
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive Python int, got {block_size!r}.")
  batch, length, num_heads, head_dim = q.shape
  keys, num_kv_heads = k.shape[1], k.shape[2]
  if length == 0 or keys == 0:
    return jnp.zeros_like(q)
  # Block sizes: a length that fits in one block is that block (no padding needed).
  tiling = _Tiling(min(block_size, length), min(block_size, keys), precision)
  offset = jnp.asarray(query_offset, jnp.int32)
  q5 = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  out = _flash(tiling, q5, k, v, key_mask, offset)
  return out.reshape(q.shape)


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """Static part of a blockwise call (a hashable non-differentiable argument)."""

  block_q: int
  block_k: int
  precision: jax.lax.Precision


def _pad_to(x, axis, multiple, value=0):
  size = x.shape[axis]
  padded = -(-size // multiple) * multiple
  if padded == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padded - size)
  return jnp.pad(x, widths, constant_values=value)


def _query_blocks(x, block):
  """[B, T, ...] -> [n, B, block, ...], T zero-padded to a multiple of block."""
  x = _pad_to(x, 1, block)
  x = x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblock(x, length):
  """[n, B, block, ...] -> [B, n·block, ...][:, :length]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _num_key_blocks(tiling, offset, i, num_key_blocks):
  """Key blocks that query block i reaches: those holding a slot ≤ offset + last query."""
  last_slot = offset + (i + 1) * tiling.block_q - 1
  return jnp.clip(last_slot // tiling.block_k + 1, 1, num_key_blocks)


def _tile(tiling, q_i, k, v, key_mask, offset, i, j):
  """Scores and allowed-mask of query block i against key block j.

  Returns (scores [B, K, G, bq, bk] in the accumulation dtype, MASK_VALUE where not allowed,
  allowed [B, 1, 1, bq, bk], k_j [B, bk, K, d], v_j)."""
  bq, bk = tiling.block_q, tiling.block_k
  acc = _accumulation_dtype(q_i)
  k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
  v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
  valid = jax.lax.dynamic_slice_in_dim(key_mask, j * bk, bk, axis=1)
  query_slots = offset + i * bq + jnp.arange(bq)
  key_slots = j * bk + jnp.arange(bk)
  allowed = (key_slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]
  allowed = allowed[:, None, None]
  scores = jnp.einsum(
      "bqkgd,bskd->bkgqs", q_i, k_j, precision=tiling.precision, preferred_element_type=acc
  )
  scores = jnp.where(allowed, scores * (q_i.shape[-1] ** -0.5), MASK_VALUE)
  return scores, allowed, k_j, v_j


def _mean_values(v, keys):
  """[B, K, 1, 1, d] mean of v over its first `keys` slots (for fully-masked rows)."""
  mean = jnp.sum(v[:, :keys].astype(_accumulation_dtype(v)), axis=1) / keys
  return mean[:, :, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiling, q, k, v, key_mask, offset):
  return _flash_fwd(tiling, q, k, v, key_mask, offset)[0]


def _flash_fwd(tiling, q, k, v, key_mask, offset):
  """q [B, T, K, G, d], k/v [B, S, K, d] -> out [B, T, K, G, d] and residuals."""
  length, keys = q.shape[1], k.shape[1]
  bq, bk = tiling.block_q, tiling.block_k
  k_pad, v_pad = _pad_to(k, 1, bk), _pad_to(v, 1, bk)
  mask_pad = _pad_to(key_mask, 1, bk, False)
  num_key_blocks = k_pad.shape[1] // bk
  mean_v = _mean_values(v, keys)
  acc = _accumulation_dtype(q)

  def query_block(_, xs):
    i, q_i = xs
    batch, _, num_kv, groups, dim = q_i.shape

    def key_block(j, carry):
      m, l, total = carry
      scores, allowed, _, v_j = _tile(tiling, q_i, k_pad, v_pad, mask_pad, offset, i, j)
      m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
      p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum(
          "bkgqs,bskd->bkgqd",
          p.astype(v.dtype),
          v_j,
          precision=tiling.precision,
          preferred_element_type=acc,
      )
      return m_new, l, total * correction[..., None] + pv

    stats_shape = (batch, num_kv, groups, bq)
    init = (
        jnp.full(stats_shape, MASK_VALUE, acc),
        jnp.zeros(stats_shape, acc),
        jnp.zeros(stats_shape + (dim,), acc),
    )
    m, l, total = jax.lax.fori_loop(
        0, _num_key_blocks(tiling, offset, i, num_key_blocks), key_block, init
    )
    has_key = l > 0
    out = jnp.where(has_key[..., None], total / jnp.where(has_key, l, 1.0)[..., None], mean_v)
    # +inf for rows without an allowed key: the backward's e^{S − L} is then exactly 0 there.
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), jnp.inf)
    return None, (jnp.moveaxis(out, 3, 1).astype(q.dtype), lse)

  q_blocks = _query_blocks(q, bq)
  _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(q_blocks.shape[0]), q_blocks))
  out = _unblock(out, length)
  return out, (q, k, v, key_mask, offset, out, lse)


def _flash_bwd(tiling, residuals, d_out):
  q, k, v, key_mask, offset, out, lse = residuals
  length, keys = q.shape[1], k.shape[1]
  bq, bk = tiling.block_q, tiling.block_k
  k_pad, v_pad = _pad_to(k, 1, bk), _pad_to(v, 1, bk)
  mask_pad = _pad_to(key_mask, 1, bk, False)
  num_key_blocks = k_pad.shape[1] // bk
  scale = q.shape[-1] ** -0.5
  precision = tiling.precision
  acc = _accumulation_dtype(q)
  d_out = d_out.astype(q.dtype)
  # δ = rowsum(dO ⊙ O), [n, B, K, G, bq] in the accumulation dtype, like lse.
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)
  delta = jnp.moveaxis(_query_blocks(delta, bq), 2, -1)

  def query_block(carry, xs):
    i, q_i, do_i, lse_i, delta_i = xs

    def key_block(j, inner):
      dq_i, dk, dv = inner
      scores, allowed, k_j, v_j = _tile(tiling, q_i, k_pad, v_pad, mask_pad, offset, i, j)
      p = jnp.where(allowed, jnp.exp(scores - lse_i[..., None]), 0.0)
      dv_j = jnp.einsum(
          "bkgqs,bqkgd->bskd",
          p.astype(do_i.dtype),
          do_i,
          precision=precision,
          preferred_element_type=acc,
      )
      dp = jnp.einsum(
          "bqkgd,bskd->bkgqs", do_i, v_j, precision=precision, preferred_element_type=acc
      )
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
      dq_i = dq_i + jnp.einsum(
          "bkgqs,bskd->bqkgd", ds, k_j, precision=precision, preferred_element_type=acc
      )
      dk_j = jnp.einsum(
          "bkgqs,bqkgd->bskd", ds, q_i, precision=precision, preferred_element_type=acc
      )
      start = j * bk
      dk = jax.lax.dynamic_update_slice_in_dim(
          dk, jax.lax.dynamic_slice_in_dim(dk, start, bk, axis=1) + dk_j, start, axis=1
      )
      dv = jax.lax.dynamic_update_slice_in_dim(
          dv, jax.lax.dynamic_slice_in_dim(dv, start, bk, axis=1) + dv_j, start, axis=1
      )
      return dq_i, dk, dv

    dk, dv = carry
    dq_i = jnp.zeros(q_i.shape, acc)
    dq_i, dk, dv = jax.lax.fori_loop(
        0, _num_key_blocks(tiling, offset, i, num_key_blocks), key_block, (dq_i, dk, dv)
    )
    return (dk, dv), dq_i

  q_blocks = _query_blocks(q, bq)
  xs = (jnp.arange(q_blocks.shape[0]), q_blocks, _query_blocks(d_out, bq), lse, delta)
  zeros = jnp.zeros(k_pad.shape, acc)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), xs)
  # Rows without an allowed key returned mean_s v: each of the S values gets 1/S of their dO.
  no_key = jnp.isinf(_unblock(jnp.moveaxis(lse, -1, 2), length))  # [B, T, K, G]
  d_mean = jnp.sum(jnp.where(no_key[..., None], d_out.astype(acc), 0.0), axis=(1, 3))
  dv = dv[:, :keys] + (d_mean / keys)[:, None]
  return (
      _unblock(dq, length).astype(q.dtype),
      dk[:, :keys].astype(k.dtype),
      dv.astype(v.dtype),
      None,
      None,
  )


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------
# Vendor kernels.


def _compact_order(key_mask):
  """Per row, a stable permutation putting the real tokens first, and its inverse."""
  order = jnp.argsort(~key_mask, axis=1, stable=True)
  return order, jnp.argsort(order, axis=1)


def _take(x, index):
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    implementation: Literal["cudnn", "xla"] | None = "cudnn",
) -> jax.Array:
  """Causal self-attention over a padded chunk through `jax.nn.dot_product_attention`.

  cuDNN's fused kernel takes a causal flag and per-row valid lengths, not an arbitrary key
  mask. Attention is equivariant under a permutation of the tokens that keeps the real ones
  in order, so each row's real tokens are moved to the front (stable sort of the mask), the
  kernel runs with ``is_causal=True`` and ``key_value_seq_lengths`` = the row's real-token
  count, and the outputs are moved back. A real query then sees exactly the real keys at or
  before it. Linear extra memory (two gathers).

  Args:
    q: [B, T, H, head_dim] queries (float16 / bfloat16 for cuDNN).
    k: [B, T, K, head_dim] keys of the same chunk (no cache: S = T).
    v: [B, T, K, head_dim] values.
    key_mask: [B, T] bool, True on real tokens.
    implementation: passed to `jax.nn.dot_product_attention`; 'xla' runs the same
      permutation logic on any backend (tests).

  Returns:
    [B, T, H, head_dim] in q's dtype; padding queries get finite, meaningless values
    (a row with no real token attends to its first slot).

  Raises:
    ValueError: implementation 'cudnn' with a dtype cuDNN's flash attention lacks.
  """
  _check_qkv(q, k, v, key_mask)
  chex.assert_equal_shape_prefix([q, k], 2)
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"cuDNN flash attention needs float16 or bfloat16 inputs, got {q.dtype}; use "
        "attention_impl='blockwise' (or 'auto') for float32."
    )
  order, inverse = _compact_order(key_mask)
  lengths = jnp.maximum(jnp.sum(key_mask, axis=1, dtype=jnp.int32), 1)
  out = jax.nn.dot_product_attention(
      _take(q, order),
      _take(k, order),
      _take(v, order),
      is_causal=True,
      key_value_seq_lengths=lengths,
      implementation=implementation,
  )
  return _take(out, inverse).astype(q.dtype)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    interpret: bool = False,
) -> jax.Array:
  """Causal self-attention over a padded chunk with the Pallas TPU splash-attention kernel.

  The padding mask becomes segment ids (1 on real tokens, 0 on padding) under a causal
  mask: a real query sees the real keys at or before it, a padding query the padding keys at
  or before it (itself at least, so no row is empty). K/V heads are shared natively (the
  kernel's grouped-query layout, K/V never repeated). T is padded up to a multiple of 128
  with padding tokens.

  A Mosaic kernel cannot be partitioned by XLA, so under a mesh (`jax.set_mesh`) the call
  runs inside `jax.shard_map` over the mesh's Auto axes: rows split over data x fsdp and heads
  over tensor, each where it divides (B by data·fsdp, K by tensor; otherwise that dimension is
  replicated and every device of the axis computes it), as the model's activations and
  q/k/v projections are laid out (`gmpo_jax.infra.sharding`). Every device then runs the kernel on
  its own rows and heads; attention mixes neither, so no collective is needed.

  Args:
    q: [B, T, H, head_dim] queries.
    k: [B, T, K, head_dim] keys of the same chunk (no cache: S = T).
    v: [B, T, K, head_dim] values.
    key_mask: [B, T] bool, True on real tokens.
    block_size: the kernel's query / key block length (clipped to the padded length).
    interpret: run the kernel in the Pallas interpreter (any backend; slow; tests).

  Returns:
    [B, T, H, head_dim] in q's dtype; padding queries get finite, meaningless values.

  Raises:
    ValueError: without ``interpret``, when the target platform
      (`gmpo_jax.infra.sharding.target_platform`) is not TPU.
  """
  _check_qkv(q, k, v, key_mask)
  chex.assert_equal_shape_prefix([q, k], 2)
  platform = sharding.target_platform()
  if not interpret and platform != "tpu":
    raise ValueError(
        f"attention_impl='splash' runs only on TPU (the target platform is {platform!r});"
        " use 'auto', 'blockwise' or 'xla'."
    )
  kernel = functools.partial(_splash_on_device, block_size=block_size, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  manual = frozenset(mesh.auto_axes)
  if not manual:
    return kernel(q, k, v, key_mask)
  batch_axes = tuple(a for a in sharding.BATCH_AXES if a in manual)
  if q.shape[0] % int(np.prod([mesh.shape[a] for a in batch_axes])):
    batch_axes = ()
  head_axis = "tensor" if "tensor" in manual and k.shape[2] % mesh.shape["tensor"] == 0 else None
  heads = P(batch_axes or None, None, head_axis, None)
  rows = P(batch_axes or None, None)
  # check_vma=False: the kernel's pallas_call declares outputs without a varying-axes type.
  return jax.shard_map(
      kernel,
      mesh=mesh,
      in_specs=(heads, heads, heads, rows),
      out_specs=heads,
      axis_names=manual,
      check_vma=False,
  )(q, k, v, key_mask)


def _splash_on_device(q, k, v, key_mask, *, block_size, interpret):
  """`splash_attention` on one device's rows and heads (shapes as there)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  length, num_heads, head_dim = q.shape[1:]
  padded = -(-length // 128) * 128
  block = min(-(-block_size // 128) * 128, padded)
  while padded % block:
    block -= 128
  mask = splash_mask.MultiHeadMask(
      [splash_mask.CausalMask((padded, padded)) for _ in range(num_heads)]
  )
  sizes = splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
  )
  kernel = splash.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  segments = _pad_to(key_mask, 1, 128, False).astype(jnp.int32)
  # The kernel does not scale the scores; head-major [H, T, d] per row.
  q_heads = jnp.swapaxes(_pad_to(q * jnp.asarray(head_dim**-0.5, q.dtype), 1, 128), 1, 2)
  k_heads, v_heads = (jnp.swapaxes(_pad_to(x, 1, 128), 1, 2) for x in (k, v))

  def one_row(q_row, k_row, v_row, segment_row):
    return kernel(q_row, k_row, v_row, segment_ids=splash.SegmentIds(q=segment_row, kv=segment_row))

  out = jax.vmap(one_row)(q_heads, k_heads, v_heads, segments)
  return jnp.swapaxes(out, 1, 2)[:, :length].astype(q.dtype)


# ----------------------------------------------------------------------------------------
# Selection.


def default_block_size(backend: str) -> int:
  """Block length for 'blockwise' / 'splash' when the config leaves it unset.

  64 on CPU, where small float32 tiles stay in cache (fastest of 64–512 for the tiny config
  at every T from 128 to 4096, BENCHMARKS.md "Attention memory"); 512 elsewhere (fewer loop
  steps on accelerators; the splash kernel's usual tile).
  """
  return CPU_BLOCK_SIZE if backend == "cpu" else DEFAULT_BLOCK_SIZE


def resolve_impl(impl: str, *, backend: str, dtype, num_queries: int, cached: bool) -> str:
  """The kernel an attention call uses: ``impl`` itself, or the choice for ``'auto'``.

  ``'auto'`` without a cache: splash on TPU; cuDNN on GPU for float16 / bfloat16 (blockwise
  for float32, which cuDNN's flash kernel lacks); blockwise on CPU (as fast as dense or
  faster from T = 64 up, with linear memory; BENCHMARKS.md). With a cache the vendor kernels
  do not apply (their causal mask cannot start at a traced cache index): a single decode
  step (T = 1) uses the dense kernel, whose [B, H, 1, S] scores are linear in S, and a longer
  chunk (prefill) uses blockwise unless ``impl`` is ``'xla'``.

  Args:
    impl: one of `IMPLEMENTATIONS`.
    backend: 'cpu', 'gpu' / 'cuda' / 'rocm' or 'tpu': the platform the program is compiled
      for (`gmpo_jax.infra.sharding.target_platform()`, the context mesh's), which differs from
      `jax.default_backend()` when a CPU host compiles for a TPU topology.
    dtype: the compute dtype of q, k, v.
    num_queries: T, the chunk length (static).
    cached: whether the call extends a KV cache.

  Returns:
    'xla', 'blockwise', 'cudnn' or 'splash'.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention_impl {impl!r}; known: {IMPLEMENTATIONS}.")
  if cached:
    return "xla" if num_queries == 1 or impl == "xla" else "blockwise"
  if impl != "auto":
    return impl
  if backend == "tpu":
    return "splash"
  if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "blockwise"


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    impl: str,
    query_offset: jax.Array | int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    precision: jax.lax.Precision = jax.lax.Precision.DEFAULT,
    dense_mask: jax.Array | None = None,
) -> jax.Array:
  """Causal padded GQA attention with a resolved kernel (see `resolve_impl`).

  Args:
    q: [B, T, H, head_dim]; k, v: [B, S, K, head_dim]; key_mask: [B, S] bool.
    impl: 'xla', 'blockwise', 'cudnn' or 'splash' (already resolved; the last two need
      query_offset = 0 and S = T).
    query_offset: slot of query 0 (module docstring).
    block_size: block length of 'blockwise' and 'splash'.
    precision: matmul precision ('xla', 'blockwise').
    dense_mask: [B, T, S] `causal_padding_mask(key_mask, T, query_offset)` for 'xla', when
      the caller shares one across layers; built here otherwise.

  Returns:
    [B, T, H, head_dim] in q's dtype.
  """
  if impl == "xla":
    if dense_mask is None:
      dense_mask = causal_padding_mask(key_mask, q.shape[1], query_offset)
    return dense_attention(q, k, v, dense_mask, precision=precision)
  if impl == "blockwise":
    return blockwise_attention(
        q, k, v, key_mask, query_offset=query_offset, block_size=block_size, precision=precision
    )
  if impl == "cudnn":
    return cudnn_attention(q, k, v, key_mask)
  if impl == "splash":
    return splash_attention(q, k, v, key_mask, block_size=block_size)
  raise ValueError(f"Unresolved attention implementation {impl!r}.")


__all__ = [
    "CPU_BLOCK_SIZE",
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "blockwise_attention",
    "causal_attention",
    "causal_padding_mask",
    "cudnn_attention",
    "cached_dense_attention",
    "default_block_size",
    "dense_attention",
    "resolve_impl",
    "splash_attention",
]
