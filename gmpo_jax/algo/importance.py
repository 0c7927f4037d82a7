"""Importance correction of the policy loss for samples the learner's policy did not draw.

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization", arXiv
2110.00641) separates two policies that plain PPO identifies: the *proximal* policy that the
clipped ratio is taken against, and the *behaviour* policy that sampled the tokens. Here the
proximal policy is the learner's rescoring at update time (`old_logp`, so the clip keeps
meaning what it means on-policy) and the behaviour policy is the sampler's own log-probs
(`Rollout.policy_logprobs`): a different engine, dtype or kernel, or parameters some updates
old. The correction weighs each token's loss by

    w_t = pi_prox(o_t) / pi_behav(o_t) = exp(log pi_prox - log pi_behav),

made safe in one of four ways (`IS_CORRECTIONS`), with a cap c > 1:

* 'token_tis': min(w_t, c) per token. Truncated importance sampling, as Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training" (fengyao.notion.site/
  off-policy-rl), apply it to the vLLM-sampler / FSDP-learner mismatch.
* 'sequence_tis': min(w_i, c) with w_i = exp(mean_t log w_t), the geometric mean of the
  sequence's token ratios, on every token of the sequence.
* 'token_mask': 1 where w_t lies in [1/c, c], else 0: the token leaves the loss.
* 'sequence_mask': 1 on the whole sequence where w_i lies in [1/c, c], else 0.

The masked forms are the masked importance sampling (MIS) of Liu, Li et al. 2025, "When Speed
Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch"
(yingru.notion.site), whose sequence form on the geometric mean is the one verl adopted
(Geo-MIS). ms-swift offers the same four choices (token or sequence, truncate or mask, a
threshold of 2 by default) as `rollout_importance_sampling_mode`.

The behaviour log-probs are the untruncated temperature-scaled policy of the sampler, the same
distribution the learner scores; top-k / top-p truncation is not part of the ratio.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import chex
import jax
import jax.numpy as jnp

IS_CORRECTIONS: Final[tuple[str, ...]] = (
    'token_tis',
    'sequence_tis',
    'token_mask',
    'sequence_mask',
)


class ImportanceStats(NamedTuple):
  """Diagnostics of the applied weights over the valid tokens (float32 scalars).

  With no valid token the weight statistics are 1 and the fraction 0; a non-finite log-ratio
  on a valid token makes them NaN (and the loss too).

  Attributes:
    weight_mean: mean of the applied weight (a sequence weight counts once per token).
    weight_max: max of the applied weight.
    masked_fraction: fraction of valid tokens whose weight the mask set to 0 (0 for TIS).
  """

  weight_mean: jax.Array
  weight_max: jax.Array
  masked_fraction: jax.Array


def correction_weights(
    prox_logp: jax.Array, behav_logp: jax.Array, mask: jax.Array, *, mode: str, cap: float
) -> tuple[jax.Array, ImportanceStats]:
  """Per-token importance weights of `mode`, and their statistics.

  log w_t = prox_logp_t - behav_logp_t; token forms use w_t, sequence forms
  w_i = exp(mean_{t valid} log w_t); TIS gives min(w, cap), the masks 1[1/cap <= w <= cap].

  Args:
    prox_logp: [B, T] float, log-probs under the proximal policy (the learner's rescoring).
    behav_logp: [B, T] float, log-probs under the behaviour policy (the sampler's).
    mask: [B, T] bool or float (nonzero = valid token).
    mode: one of IS_CORRECTIONS.
    cap: c > 1 (Python float).

  Returns:
    (weights [B, T] float32 >= 0, without gradient, 0 on padding; `ImportanceStats`). Padding
    may hold anything. A valid token with a non-finite log-ratio gets weight NaN (and, for the
    sequence forms, its whole sequence), so the loss it multiplies is NaN and the learner
    skips the update instead of silently dropping or capping the token. A huge finite ratio
    is capped (TIS) or masked; an all-masked row has no weight to apply.

  Raises:
    ValueError: unknown mode or cap <= 1.
  """
  chex.assert_rank([prox_logp, behav_logp, mask], 2)
  chex.assert_equal_shape([prox_logp, behav_logp, mask])
  if mode not in IS_CORRECTIONS:
    raise ValueError(f'Unknown importance correction {mode!r}; valid: {", ".join(IS_CORRECTIONS)}.')
  if not cap > 1:
    raise ValueError(f'The importance-weight cap must be > 1, got {cap}.')
  valid = mask.astype(bool)
  delta = prox_logp.astype(jnp.float32) - behav_logp.astype(jnp.float32)
  log_w = jnp.where(valid, jnp.where(jnp.isfinite(delta), delta, jnp.nan), 0.0)
  if mode.startswith('sequence'):
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.float32)
    log_w = jnp.broadcast_to(
        (jnp.sum(log_w, axis=-1) / jnp.maximum(lengths, 1.0))[:, None], log_w.shape
    )
  if mode.endswith('tis'):
    weights = jnp.minimum(jnp.exp(log_w), cap)  # exp may overflow to inf: capped
    dropped = jnp.zeros_like(valid)
  else:
    kept = jnp.abs(log_w) <= jnp.log(cap)
    weights = jnp.where(jnp.isnan(log_w), jnp.nan, kept.astype(jnp.float32))
    dropped = valid & ~kept & ~jnp.isnan(log_w)
  weights = jax.lax.stop_gradient(jnp.where(valid, weights, 0.0))
  num_tokens = jnp.sum(valid, dtype=jnp.float32)
  any_valid = num_tokens > 0
  count = jnp.maximum(num_tokens, 1.0)
  stats = ImportanceStats(
      weight_mean=jnp.where(any_valid, jnp.sum(weights) / count, 1.0),
      weight_max=jnp.where(any_valid, jnp.max(jnp.where(valid, weights, -jnp.inf)), 1.0),
      masked_fraction=jnp.sum(dropped, dtype=jnp.float32) / count,
  )
  return weights, stats
