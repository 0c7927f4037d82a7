"""Per-token log-probabilities without materializing the [B, T, V] logits.

The policy-gradient objectives (GRPO, GMPO, GSPO) only need log π(o_t | o_<t) of the sampled
token, but the naive route `log_softmax(hidden @ unembed)` builds a [B, T, V] float32 array:
at V = 151936 and T = 2048 that is 1.2 GB per sequence before the backward pass doubles it.
Here the sequence is cut into chunks; each chunk is projected to the vocabulary, reduced in
float32 (logsumexp) and discarded. A custom VJP recomputes the logits block by block over the
vocabulary in the backward pass, so value and gradient both need O(B · chunk_size · V) extra
memory.

All logits in this codebase (training log-probs here, sampling in `gmpo_jax.rollout.sampling`) come
from `project_logits`, so the sampler's log-probs and the learner's agree to float32 rounding
(METHODS.md: GMPO exponentiates a sum of per-token log-ratios, so a drift between the two
accumulates over the sequence).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from gmpo_jax.models.transformer import matmul_precision

DEFAULT_CHUNK_SIZE = 256


class TokenLogprobs(NamedTuple):
  """Per-token outputs of `token_logprobs(..., with_entropy=True)`.

  Attributes:
    logp: [B, T] float32, log π(targets[b, t] | hidden[b, t]).
    entropy: [B, T] float32, entropy of π(· | hidden[b, t]) in nats.
  """

  logp: jax.Array
  entropy: jax.Array


def project_logits(
    hidden: jax.Array,
    unembed: jax.Array,
    *,
    temperature: float = 1.0,
    precision: jax.lax.Precision | None = None,
) -> jax.Array:
  """Vocabulary logits in float32: z = (h · W) / τ.

  The matrix product runs in the dtype of `hidden` (the model's compute dtype; `unembed` is
  cast to it, as Flax does with parameters) at the model's matmul precision for that dtype
  (`gmpo_jax.models.transformer.matmul_precision`: HIGHEST for float32), and accumulates in
  float32.

  Args:
    hidden: [..., D] final hidden states (any float dtype).
    unembed: [D, V] output projection (`Transformer.unembed_matrix()`).
    temperature: τ > 0, a Python float.
    precision: override of the matmul precision; None = the model's rule for hidden.dtype.

  Returns:
    [..., V] float32 logits.
  """
  chex.assert_rank(unembed, 2)
  chex.assert_axis_dimension(hidden, -1, unembed.shape[0])
  _check_temperature(temperature)
  if precision is None:
    precision = matmul_precision(hidden.dtype)
  logits = jnp.einsum(
      '...d,dv->...v',
      hidden,
      unembed.astype(hidden.dtype),
      precision=precision,
      preferred_element_type=jnp.float32,
  )
  return logits if temperature == 1.0 else logits * (1.0 / temperature)


def token_logprobs(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> jax.Array | TokenLogprobs:
  """Chunked log π(y_t | h_t) = z_{t, y_t} − logsumexp_v z_{t, v},  z_t = (h_t · W) / τ.

  The softmax policy over a vocabulary as used by GRPO (Shao et al. 2024, "DeepSeekMath",
  arXiv 2402.03300) and GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization",
  arXiv 2507.20673); the optional entropy is H_t = −Σ_v p_{t,v} log p_{t,v}.

  The forward pass splits T into n = ceil(T / chunk_size) chunks of C = ceil(T / n) <=
  chunk_size tokens (T is zero-padded internally to n · C, fewer than n extra positions rather
  than up to chunk_size − 1); each chunk's [B, C, V] float32 logits live only inside one step of a
  `lax.scan`. The backward pass (a custom VJP) recomputes the logits in n vocabulary blocks of
  [B, T, V / n], so both passes need a few times B · chunk_size · V · 4 bytes of scratch plus a
  float32 [B, T, D] accumulator, never a [B, T, V] or an extra [D, V] array. Reductions are
  in float32 whatever the dtype of `hidden`. Differentiable with respect to `hidden` and
  `unembed` (reverse mode).

  Args:
    hidden: [B, T, D] hidden states after the final norm (any float dtype).
    unembed: [D, V] output projection.
    targets: [B, T] integer token ids whose log-probabilities are wanted.
    chunk_size: tokens per chunk along T (a Python int > 0); memory scales with B · chunk_size.
    with_entropy: also return the per-token entropy (one more pass over each chunk).
    temperature: τ > 0 (Python float): the policy is softmax(z / τ), the distribution a sampler
      at temperature τ draws from before any top-k / top-p truncation.

  Returns:
    logp [B, T] float32, or `TokenLogprobs(logp, entropy)` when `with_entropy`.
    A target outside [0, V) has probability zero: its logp is −inf (its gradient is finite).
    T = 0 gives empty [B, 0] arrays.
  """
  chex.assert_rank([hidden, unembed, targets], [3, 2, 2])
  chex.assert_equal_shape_prefix([hidden, targets], 2)
  chex.assert_axis_dimension(unembed, 0, hidden.shape[-1])
  chex.assert_type([hidden, unembed, targets], [float, float, int])
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f'chunk_size must be a positive Python int, got {chunk_size!r}')
  _check_temperature(temperature)

  batch, length, _ = hidden.shape
  vocab = unembed.shape[1]
  num_chunks = max(-(-length // chunk_size), 1)
  chunk = max(-(-length // num_chunks), 1)
  padded = num_chunks * chunk
  in_vocab = (targets >= 0) & (targets < vocab)
  outputs = _chunked_logprobs(
      with_entropy,
      float(temperature),
      chunk,
      jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0))),
      unembed,
      jnp.pad(jnp.where(in_vocab, targets, 0).astype(jnp.int32), ((0, 0), (0, padded - length))),
  )
  logp = jnp.where(in_vocab, outputs[0][:, :length], -jnp.inf)
  if with_entropy:
    return TokenLogprobs(logp=logp, entropy=outputs[1][:, :length])
  return logp


def _check_temperature(temperature: Any) -> None:
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f'temperature must be a positive Python float, got {temperature!r}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_logprobs(with_entropy, temperature, chunk_size, hidden, unembed, targets):
  outputs, _ = _chunked_logprobs_fwd(
      with_entropy, temperature, chunk_size, hidden, unembed, targets
  )
  return outputs


def _chunked_logprobs_fwd(with_entropy, temperature, chunk_size, hidden, unembed, targets):
  """Scan over T chunks: hidden [B, T, D] (T a multiple of chunk_size) -> [B, T] outputs."""
  batch, length, dim = hidden.shape
  num_chunks = length // chunk_size
  # Chunk-major [n, B, C, ...]: B stays a batch axis inside every chunk, so a data-parallel
  # sharding of B is untouched by the chunking.
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, dim).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
  unembed_c = unembed.astype(hidden.dtype)  # once here, not once per chunk

  def body(_, chunk):
    h, y = chunk
    logits = project_logits(h, unembed_c, temperature=temperature)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - log_normalizer
    if not with_entropy:
      return None, (logp, log_normalizer)
    # −Σ p log p, not lse − Σ p z, which cancels two large terms when logits are large.
    log_probs = logits - log_normalizer[..., None]
    return None, (logp, log_normalizer, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))

  _, outs = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  outs = tuple(x.swapaxes(0, 1).reshape(batch, length) for x in outs)
  logp, log_normalizer, entropy = outs if with_entropy else outs + (None,)
  outputs = (logp, entropy) if with_entropy else (logp,)
  # Besides the inputs, only O(B·T) residuals: the log-normalizer (and entropy) let the
  # backward pass rebuild probabilities from recomputed logits without another reduction.
  return outputs, (hidden, unembed, targets, log_normalizer, entropy)


def _chunked_logprobs_bwd(with_entropy, temperature, chunk_size, residuals, cotangents):
  """Scan over vocabulary blocks, accumulating only the small [B, T, D] hidden gradient.

  The forward pass scans over T; scanning over T here too would accumulate a float32 [D, V]
  unembedding gradient (0.5 GiB for Qwen2-0.5B) on top of the output. Over vocabulary
  blocks, each block of columns of dW is final when computed and is written in place. With
  as many blocks as the forward has chunks, a block's logits [B, T, V/n] have the size of a
  forward chunk's [B, chunk_size, V].
  """
  hidden, unembed, targets, log_normalizer, entropy = residuals
  compute_dtype = hidden.dtype
  dim, vocab = unembed.shape
  num_blocks = max(hidden.shape[1] // chunk_size, 1)
  block = -(-vocab // num_blocks)
  unembed_c = unembed.astype(compute_dtype)
  precision = matmul_precision(compute_dtype)

  def body(carry, i):
    grad_hidden, grad_unembed = carry
    # The last block is shifted left to stay inside [0, V); columns an earlier block already
    # covered are masked out of both gradients.
    start = jnp.minimum(i * block, vocab - block)
    columns = start + jnp.arange(block, dtype=jnp.int32)
    fresh = columns >= i * block
    w = jax.lax.dynamic_slice_in_dim(unembed_c, start, block, axis=1)
    log_probs = project_logits(hidden, w, temperature=temperature) - log_normalizer[..., None]
    probs = jnp.exp(log_probs)
    # d logp_y / dz = onehot(y) − p;   d H / dz = −p ⊙ (log p + H).
    is_target = (columns == targets[..., None]).astype(jnp.float32)
    grad_logits = cotangents[0][..., None] * (is_target - probs)
    if with_entropy:
      grad_logits = grad_logits - cotangents[1][..., None] * probs * (
          log_probs + entropy[..., None]
      )
    # z = (h · W) / τ: the 1/τ factor goes once onto the shared cotangent.
    grad_logits = jnp.where(fresh, grad_logits * (1.0 / temperature), 0.0).astype(compute_dtype)
    # The projection's gradient at the projection's precision (see `project_logits`).
    grad_hidden = grad_hidden + jnp.einsum(
        'btv,dv->btd', grad_logits, w, precision=precision, preferred_element_type=jnp.float32
    )
    grad_w = jnp.einsum(
        'btd,btv->dv', hidden, grad_logits, precision=precision, preferred_element_type=jnp.float32
    ).astype(unembed.dtype)
    previous = jax.lax.dynamic_slice_in_dim(grad_unembed, start, block, axis=1)
    grad_unembed = jax.lax.dynamic_update_slice_in_dim(
        grad_unembed, jnp.where(fresh, grad_w, previous), start, axis=1
    )
    return (grad_hidden, grad_unembed), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros((dim, vocab), unembed.dtype))
  (grad_hidden, grad_unembed), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
  return grad_hidden.astype(compute_dtype), grad_unembed, None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def positions_from_mask(key_mask: jax.Array) -> jax.Array:
  """RoPE positions of a padded batch: position_t = (Σ_{s ≤ t} mask_s) − 1, 0 on padding.

  Args:
    key_mask: [B, T] bool, True on real tokens (left, right or interior padding).

  Returns:
    [B, T] int32; real tokens are numbered 0, 1, ... in order, padding gets 0.
  """
  chex.assert_rank(key_mask, 2)
  chex.assert_type(key_mask, bool)
  return jnp.maximum(jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1, 0)


def sequence_logprobs(
    model: Any,
    tokens: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> jax.Array | TokenLogprobs:
  """logp[b, t] = log π_θ(tokens[b, t] | tokens[b, :t]) under softmax(z / τ), chunked.

  One forward pass of the policy (Zhao et al. 2025, "Geometric-Mean Policy Optimization",
  arXiv 2507.20673, needs these per-token log-probs for δ_t = log π_θ − log π_old).

  Args:
    model: a `gmpo_jax.models.transformer.Transformer` (or anything with its call signature
      and `unembed_matrix()`).
    tokens: [B, T] int32 prompt followed by completion.
    positions: [B, T] int32 RoPE positions (see `positions_from_mask`).
    key_mask: [B, T] bool, True on real tokens.
    chunk_size: tokens per chunk along T for `token_logprobs`.
    temperature: τ > 0; use the sampler's temperature so that these log-probs and the
      sampler's `SampleOutput.policy_logprobs` describe the same policy.
    with_entropy: also return the per-token entropy at the same alignment.

  Returns:
    logp [B, T] float32 aligned with `tokens` (or `TokenLogprobs`). Entries are 0 at t = 0
    and wherever the token or its predecessor is padding (so the first real token of every
    row, which has no context, gets 0); a row with no real token is all zeros.
  """
  chex.assert_rank([tokens, positions, key_mask], 2)
  chex.assert_equal_shape([tokens, positions, key_mask])
  chex.assert_type([tokens, positions, key_mask], [int, int, bool])
  hidden, _ = model(tokens, positions, key_mask=key_mask)
  out = token_logprobs(
      hidden[:, :-1],
      model.unembed_matrix(),
      tokens[:, 1:],
      chunk_size=chunk_size,
      with_entropy=with_entropy,
      temperature=temperature,
  )
  has_context = key_mask[:, 1:] & key_mask[:, :-1]

  def align(x):
    return jnp.pad(jnp.where(has_context, x, 0.0), ((0, 0), (1, 0)))

  if with_entropy:
    return TokenLogprobs(logp=align(out.logp), entropy=align(out.entropy))
  return align(out)


def split_model_logprobs(
    graphdef: nnx.GraphDef,
    state: Any,
    tokens: jax.Array,
    key_mask: jax.Array,
    *,
    chunk_size: int,
    temperature: float,
) -> jax.Array:
  """`sequence_logprobs` of the model `nnx.merge(graphdef, state)`, positions from `key_mask`.

  The form a jitted program takes the policy in (a static graph, an array state), shared by the
  rollout backend's rescoring and the learner's log-prob program so that both score alike.

  Args:
    graphdef: the model's graph (`nnx.split`).
    state: its parameters.
    tokens: [B, T] int32.
    key_mask: [B, T] bool, True on real tokens; the RoPE positions are
      `positions_from_mask(key_mask)`.
    chunk_size: tokens per chunk along T.
    temperature: τ > 0, the sampler's.

  Returns:
    logp [B, T] float32, aligned as `sequence_logprobs` aligns it.
  """
  return sequence_logprobs(
      nnx.merge(graphdef, state),
      tokens,
      positions_from_mask(key_mask),
      key_mask,
      chunk_size=chunk_size,
      temperature=temperature,
  )
