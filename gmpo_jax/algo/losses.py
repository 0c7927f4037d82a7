"""Policy objectives (token-clip PPO/GRPO, GMPO and its power means, GSPO) and their aggregation.

One concept, the family of clipped policy objectives sharing one aggregation (`_finish`).

Notation (docs/CONTRACTS.md): B sequences, T tokens; delta_t = logp_t - old_logp_t,
rho_t = exp(delta_t); A_i is the advantage of sequence i; |o_i| its number of valid
(unmasked) tokens.

Every objective takes per-token log-probs and one advantage per sequence, builds a
per-token loss (sequence-level objectives broadcast their per-sequence loss to every
valid token), optionally adds beta * KL(pi_theta || pi_ref) per token, and reduces
as `aggregate_loss` does. (Internally each row's sum is formed first, so a
broadcast sequence loss l_i enters as |o_i| l_i without a [B, T] array.) All
hyperparameters are Python values, static under `jax.jit`; the code has no Python
branch on a traced value, so any batch size works.

Conventions shared by all objectives:
  * Masked positions are replaced before any arithmetic, so padding may hold any
    value (even -inf or NaN) without reaching the loss, the gradient or the extras;
    the advantage of an all-masked row is ignored the same way.
  * Non-finite *valid* input gives NaN, never a plausible number: a valid token
    whose delta (or, with ref_logp, whose KL) is not finite, or a nonempty row
    whose advantage is not finite, makes the loss NaN, so the learner's
    non-finite guard skips the update.
  * A log-ratio entering exp is clamped above at `kl.MAX_LOG_RATIO` (= 20): past it
    the loss is constant and its gradient 0, so a huge delta gives finite values.
  * An all-masked sequence contributes 0 to the loss and the gradient, and is not
    counted as a sequence by the seq-mean modes.
  * `num_sequences` / `num_tokens` are the counts of the full (mini)batch: pass them
    when the batch is split into micro-batches or shards, and the micro-batch losses
    (and gradients) sum to the full-batch loss (and gradient). seq-mean-token-sum-norm
    requires `max_length`, so its divisor never depends on how a batch is trimmed.
  * `token_weights` [B, T] (optional, >= 0, any value on padding; e.g.
    `gmpo_jax.algo.importance.correction_weights`) multiply each valid token's loss, KL penalty included, before aggregation: a sequence
    loss l_i enters as l_i sum_t w_it. They are constants (no gradient flows into them) and
    leave the normalizers alone: `num_tokens` / `num_sequences` and |o_i| count every valid
    token whatever its weight, so a weight of 0 removes a token's loss but not its share of
    the denominator, and the loss stays linear in the weights. (slime and verl instead drop
    rejected tokens from the denominator too.) All-ones weights give exactly the unweighted
    loss and gradient; None skips the weighting altogether. For a sequence
    objective a token's weight scales only its copy of l_i: the token still enters
    l_i (its ratio is in the sequence's mean), so a weight of 0 there down-weights
    the sequence rather than removing the token from the mean.
"""

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Final, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.algo.kl import KL_ESTIMATORS, MAX_LOG_RATIO, kl_penalty

AGGREGATION_MODES: Final[tuple[str, ...]] = (
    'token-mean',
    'seq-mean-token-mean',
    'seq-mean-token-sum',
    'seq-mean-token-sum-norm',
)
CLIP_MODES: Final[tuple[str, ...]] = ('token', 'sequence', 'sequence_mean', 'none')


class LossExtras(NamedTuple):
  """Diagnostics of one loss evaluation: float32 scalars without gradient.

  Token statistics are over valid tokens and sequence statistics over sequences
  with at least one valid token; with no valid token the fractions and KLs are 0
  and the ratio statistics 1.

  Attributes:
    clip_fraction_low: fraction of tokens whose gradient the clip removed with
      the ratio below its range (A < 0).
    clip_fraction_high: same with the ratio above its range (A > 0; for the
      dual clip, A < 0 and rho > c). For sequence-level clips every token of a
      clipped sequence counts.
    ratio_min: min of the per-token ratio rho_t = exp(delta_t) (delta clamped at 20).
    ratio_mean: mean of rho_t.
    ratio_max: max of rho_t.
    approx_kl: mean of k3 between the rollout policy and the current one,
      expm1(delta_t) - delta_t, an estimate of KL(pi_old || pi_theta).
    fully_clipped_fraction: fraction of sequences whose every valid token is
      clipped (they contribute no policy gradient).
    kl: mean per-token estimate of KL(pi_theta || pi_ref); 0 without ref_logp.
  """

  clip_fraction_low: jax.Array
  clip_fraction_high: jax.Array
  ratio_min: jax.Array
  ratio_mean: jax.Array
  ratio_max: jax.Array
  approx_kl: jax.Array
  fully_clipped_fraction: jax.Array
  kl: jax.Array


def aggregate_loss(
    per_token: jax.Array,
    mask: jax.Array,
    *,
    mode: str,
    max_length: int | None = None,
    num_sequences: float | jax.Array | None = None,
    num_tokens: float | jax.Array | None = None,
) -> jax.Array:
  """Reduces a [B, T] per-token loss to a scalar over the valid tokens.

  token-mean: sum_{i,t} l_it / N_tok;  seq-mean-token-mean: sum_i (sum_t l_it / |o_i|) / N_seq;
  seq-mean-token-sum: sum_i sum_t l_it / N_seq;
  seq-mean-token-sum-norm: sum_i (sum_t l_it / max_length) / N_seq.

  token-mean is DAPO's (Yu et al. 2025, arXiv 2503.14476); seq-mean-token-mean is
  GRPO as published (Shao et al. 2024, arXiv 2402.03300); seq-mean-token-sum-norm
  divides by a constant, as Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training: A Critical Perspective", arXiv 2503.20783).

  Args:
    per_token: [B, T] float per-token loss; masked entries are ignored (any value).
    mask: [B, T] bool or float (nonzero = valid token).
    mode: one of AGGREGATION_MODES.
    max_length: the constant divisor of seq-mean-token-sum-norm (Dr.GRPO: the
      generation budget), required by that mode (a default of T would change
      with the padding of each micro-batch); an error with any other mode.
    num_sequences: N_seq, the number of sequences with >= 1 valid token in the
      full batch; defaults to the count in `mask`. Unused by token-mean.
    num_tokens: N_tok, the number of valid tokens in the full batch; defaults to
      the count in `mask`. Unused by the seq-mean modes. (Both counts are data
      about the batch, so a caller may always pass both.)

  Returns:
    float32 scalar. An all-masked row adds 0; counts are floored at 1, so an
    all-masked batch gives 0, never NaN.

  Raises:
    ValueError: unknown mode, max_length missing for seq-mean-token-sum-norm or
      given with another mode, or a non-positive max_length.
  """
  chex.assert_rank([per_token, mask], 2)
  chex.assert_equal_shape([per_token, mask])
  _check_aggregation(mode, max_length)
  valid = mask.astype(bool)
  row_sums = jnp.sum(jnp.where(valid, per_token.astype(jnp.float32), 0.0),
                     axis=-1)
  weights = _row_weights(
      _row_count(valid), mode=mode, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens)
  return jnp.sum(weights * row_sums)


def _check_aggregation(mode, max_length) -> None:
  if mode not in AGGREGATION_MODES:
    raise ValueError(
        f'Unknown loss_agg_mode {mode!r}; valid: {", ".join(AGGREGATION_MODES)}.')
  if mode == 'seq-mean-token-sum-norm':
    if max_length is None:
      raise ValueError(
          'loss_agg_mode="seq-mean-token-sum-norm" needs max_length, its constant '
          'divisor (Dr.GRPO: the generation budget); without it the divisor would '
          'be the padded length of each (micro-)batch.')
    if not max_length > 0:
      raise ValueError(f'max_length must be positive, got {max_length}.')
  elif max_length is not None:
    raise ValueError(
        f'max_length applies only to loss_agg_mode="seq-mean-token-sum-norm", '
        f'got mode {mode!r}.')


def _row_weights(lengths, *, mode, max_length, num_sequences,
                 num_tokens) -> jax.Array:
  """[B] weights w_i with aggregate = sum_i w_i sum_t l_it (see aggregate_loss).

  Aggregating through per-row sums lets a sequence-level loss l_i enter as
  |o_i| l_i, exactly its broadcast to the valid tokens, without a [B, T] array.
  """
  if mode == 'token-mean':
    count = jnp.sum(lengths) if num_tokens is None else num_tokens
    return jnp.broadcast_to(1.0 / jnp.maximum(count, 1).astype(jnp.float32),
                            lengths.shape)
  count = jnp.sum(lengths > 0) if num_sequences is None else num_sequences
  per_sequence = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  if mode == 'seq-mean-token-mean':
    return per_sequence / jnp.maximum(lengths, 1).astype(jnp.float32)
  if mode == 'seq-mean-token-sum-norm':
    per_sequence = per_sequence / float(max_length)
  return jnp.broadcast_to(per_sequence, lengths.shape)


def _check_inputs(logp, old_logp, advantages, mask, ref_logp) -> None:
  chex.assert_rank([logp, old_logp, mask, advantages], [2, 2, 2, 1])
  chex.assert_equal_shape(
      [logp, old_logp, mask] + ([] if ref_logp is None else [ref_logp]))
  chex.assert_equal_shape_prefix([logp, advantages], 1)
  chex.assert_type([logp, old_logp, advantages], float)


def _check_options(*, loss_agg_mode, max_length, ref_logp, beta,
                   kl_estimator) -> None:
  _check_aggregation(loss_agg_mode, max_length)
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(
        f'Unknown kl_estimator {kl_estimator!r}; valid: {", ".join(KL_ESTIMATORS)}.')
  if not beta >= 0:
    raise ValueError(f'beta must be >= 0, got {beta}.')
  if beta > 0 and ref_logp is None:
    raise ValueError(
        f'beta={beta} > 0 needs ref_logp (the reference policy log-probs); pass '
        'ref_logp or set beta=0.')


def _check_epsilons(epsilon_low, epsilon_high, *, ratio_space: bool) -> None:
  # In ratio space the lower bound is 1 - epsilon_low, which must stay >= 0.
  low_ok = 0 <= epsilon_low <= 1 if ratio_space else epsilon_low >= 0
  if not (low_ok and epsilon_high >= 0):
    bound = '0 <= epsilon_low <= 1' if ratio_space else 'epsilon_low >= 0'
    raise ValueError(
        f'Need {bound} and epsilon_high >= 0, got epsilon_low={epsilon_low}, '
        f'epsilon_high={epsilon_high}.')


def _row_count(flags: jax.Array) -> jax.Array:
  """Number of True entries along the last axis, [B] int32."""
  # Summed in float32, exact up to 2^24 per row: XLA:CPU reduces float32 several
  # times faster than int32 or bool, which take a slow generic path.
  if flags.shape[-1] > 2**24:
    raise ValueError(f'At most 2^24 tokens per row, got T = {flags.shape[-1]}.')
  return jnp.sum(flags, axis=-1, dtype=jnp.float32).astype(jnp.int32)


def _masked_inputs(logp, old_logp, advantages, mask):
  """(valid [B, T] bool, delta [B, T] f32, lengths [B] int32, adv [B] f32).

  delta is 0 on padding and adv 0 on all-masked rows, so garbage there (-inf,
  NaN) never reaches a sum or an exp; jnp.where also blocks its gradient. A
  valid token's non-finite delta and a nonempty row's non-finite advantage
  become NaN: the MAX_LOG_RATIO clamp and the clips would otherwise turn +-inf
  into a finite, plausible loss.
  """
  valid = mask.astype(bool)
  lengths = _row_count(valid)
  delta = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
  log_ratio = jnp.where(valid, jnp.where(jnp.isfinite(delta), delta, jnp.nan), 0.0)
  adv = advantages.astype(jnp.float32)
  adv = jnp.where(lengths > 0, jnp.where(jnp.isfinite(adv), adv, jnp.nan), 0.0)
  return valid, log_ratio, lengths, adv


def _finish(
    log_ratio: jax.Array,
    valid: jax.Array,
    lengths: jax.Array,
    low_counts: jax.Array,
    high_counts: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array | None,
    *,
    token_losses: jax.Array | None = None,
    sequence_losses: jax.Array | None = None,
    token_weights: jax.Array | None,
    beta: float,
    kl_estimator: str,
    loss_agg_mode: str,
    max_length: int | None,
    num_sequences,
    num_tokens,
) -> tuple[jax.Array, LossExtras]:
  """Weights and adds the KL penalty, aggregates, and computes the diagnostics.

  The policy loss comes per token (`token_losses` [B, T]) or per sequence
  (`sequence_losses` [B], broadcast to the row's valid tokens); low_counts /
  high_counts [B] count the valid tokens clipped on each side.
  """
  if token_weights is not None:
    chex.assert_equal_shape([token_weights, valid])
    token_weights = jax.lax.stop_gradient(
        jnp.where(valid, token_weights.astype(jnp.float32), 0.0))
  row_losses = _row_sums(valid, lengths, token_weights, token_losses=token_losses,
                         sequence_losses=sequence_losses)
  kl_rows = None
  if ref_logp is not None:
    # Zeroing both inputs on padding makes x = 0 there, where every estimator
    # is 0 (and garbage in the padding cannot leak); a non-finite valid input
    # gives NaN rather than the value of the clamped x.
    finite = jnp.isfinite(logp) & jnp.isfinite(ref_logp)
    token_kl = kl_penalty(
        jnp.where(valid & finite, logp, 0.0),
        jnp.where(valid & finite, ref_logp, 0.0), estimator=kl_estimator)
    token_kl = jnp.where(valid & ~finite, jnp.nan, token_kl)
    kl_rows = jnp.sum(token_kl, axis=-1)
    if beta > 0:
      row_losses = row_losses + beta * (
          kl_rows if token_weights is None
          else _row_sums(valid, lengths, token_weights, token_losses=token_kl))
  weights = _row_weights(
      lengths, mode=loss_agg_mode, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens)
  loss = jnp.sum(weights * row_losses)
  extras = _extras(log_ratio, valid, lengths, low_counts, high_counts, kl_rows)
  return loss, jax.tree.map(jax.lax.stop_gradient, extras)


def _row_sums(valid, lengths, token_weights, *, token_losses=None,
              sequence_losses=None) -> jax.Array:
  """[B] sum_t w_it l_it over the valid tokens (w = 1 without weights; the
  weights must be 0 on padding).

  A per-sequence loss l_i stands for l_i on each valid token: |o_i| l_i, or
  l_i sum_t w_it with weights.
  """
  if token_losses is not None:
    weighted = token_losses if token_weights is None else token_weights * token_losses
    return jnp.sum(jnp.where(valid, weighted, 0.0), axis=-1)
  if token_weights is None:
    return lengths * sequence_losses
  return jnp.sum(token_weights, axis=-1) * sequence_losses


def _extras(log_ratio, valid, lengths, low_counts, high_counts,
            kl_rows) -> LossExtras:
  num_tokens = jnp.maximum(jnp.sum(lengths), 1).astype(jnp.float32)
  nonempty = lengths > 0
  num_sequences = jnp.maximum(jnp.sum(nonempty), 1).astype(jnp.float32)
  capped = jnp.minimum(log_ratio, MAX_LOG_RATIO)  # 0 on padding
  # Two sums give both the mean ratio, 1 + mean(expm1(delta)), and the mean k3
  # between the rollout and current policies (samples from pi_old,
  # x = log pi_theta - log pi_old), mean(expm1(delta) - delta); padding adds 0.
  sum_expm1 = jnp.sum(jnp.expm1(capped))
  sum_log_ratio = jnp.sum(capped)
  any_valid = jnp.any(nonempty)
  # exp is monotone: the ratio extremes are exps of the log-ratio extremes.
  ratio_min = jnp.exp(jnp.min(jnp.where(valid, capped, MAX_LOG_RATIO)))
  ratio_max = jnp.exp(jnp.max(jnp.where(valid, capped, -jnp.inf)))
  fully_clipped = nonempty & (low_counts + high_counts == lengths)
  return LossExtras(
      clip_fraction_low=jnp.sum(low_counts) / num_tokens,
      clip_fraction_high=jnp.sum(high_counts) / num_tokens,
      ratio_min=jnp.where(any_valid, ratio_min, 1.0),
      ratio_mean=1.0 + sum_expm1 / num_tokens,
      ratio_max=jnp.where(any_valid, ratio_max, 1.0),
      approx_kl=(sum_expm1 - sum_log_ratio) / num_tokens,
      fully_clipped_fraction=jnp.sum(fully_clipped) / num_sequences,
      kl=(jnp.float32(0.0) if kl_rows is None
          else jnp.sum(kl_rows) / num_tokens),
  )


def token_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg_mode: str = 'token-mean',
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = 'k3',
    max_length: int | None = None,
    num_sequences: float | jax.Array | None = None,
    num_tokens: float | jax.Array | None = None,
    token_weights: jax.Array | None = None,
) -> tuple[jax.Array, LossExtras]:
  """PPO/GRPO clipped surrogate per token, with clip-higher and dual clip.

  l_t = -min(rho_t A, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) A); with
  dual_clip c and A < 0: l_t = min(l_t, c |A|); then + beta * KL_t, aggregated.

  Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv
  1707.06347; GRPO: Shao et al. 2024, arXiv 2402.03300; clip-higher (epsilon_high
  = 0.28): DAPO, Yu et al. 2025, arXiv 2503.14476; dual clip: Ye et al. 2020,
  "Mastering Complex Control in MOBA Games with Deep RL", arXiv 1912.09729.

  Args:
    logp: [B, T] float, log pi_theta of the sampled tokens (differentiated).
    old_logp: [B, T] float, log pi_old (the rollout policy's).
    advantages: [B] float, one advantage per sequence.
    mask: [B, T] bool or float (nonzero = valid token).
    epsilon_low: lower clip, 0 <= epsilon_low <= 1.
    epsilon_high: upper clip, >= 0.
    dual_clip: c > 1 bounding the loss of A < 0 tokens by c |A|; None: off.
    loss_agg_mode: one of AGGREGATION_MODES.
    ref_logp: [B, T] float, log pi_ref; with it, `LossExtras.kl` is reported.
    beta: KL coefficient (Python float >= 0); > 0 needs ref_logp.
    kl_estimator: 'k1', 'k2' or 'k3' (see `kl.kl_penalty`).
    max_length, num_sequences, num_tokens: see `aggregate_loss`.
    token_weights: [B, T] float >= 0, per-token loss weights (see the module
      docstring); None: unweighted.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; all-masked rows contribute 0; rho is computed from delta clamped
    at 20, so a huge delta gives a finite loss and gradient.

  Raises:
    ValueError: bad epsilons, dual_clip <= 1, or the options errors of
      `aggregate_loss` and beta/ref_logp/kl_estimator.
  """
  _check_inputs(logp, old_logp, advantages, mask, ref_logp)
  _check_options(loss_agg_mode=loss_agg_mode, max_length=max_length,
                 ref_logp=ref_logp, beta=beta, kl_estimator=kl_estimator)
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=True)
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f'dual_clip must be > 1 (or None), got {dual_clip}.')
  valid, log_ratio, lengths, row_adv = _masked_inputs(
      logp, old_logp, advantages, mask)
  ratio = jnp.exp(jnp.minimum(log_ratio, MAX_LOG_RATIO))
  adv = row_adv[:, None]
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
  # The clipped branch is the larger loss (and constant in logp) exactly when
  # the ratio has left the range on the side the advantage pushes it to: high
  # for A > 0, low for A < 0. Padding has ratio 1 and is never counted.
  positive, negative = row_adv > 0, row_adv < 0
  clipped_counts = _row_count(jnp.where(
      positive[:, None], ratio > 1.0 + epsilon_high,
      negative[:, None] & (ratio < 1.0 - epsilon_low)))
  low_counts = jnp.where(negative, clipped_counts, 0)
  high_counts = jnp.where(positive, clipped_counts, 0)
  if dual_clip is not None:
    # c > 1 >= 1 - epsilon_low, so the bound c|A| binds exactly where rho > c.
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, -dual_clip * adv),
                          per_token)
    high_counts = high_counts + _row_count(negative[:, None] & (ratio > dual_clip))
  return _finish(
      log_ratio, valid, lengths, low_counts, high_counts, logp, ref_logp,
      token_losses=per_token, token_weights=token_weights, beta=beta,
      kl_estimator=kl_estimator,
      loss_agg_mode=loss_agg_mode, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens)


def _one_sided_clip(x, positive, negative, *, epsilon_low, epsilon_high):
  """GMPO's clip in log space: (x~, clipped), for x of any shape.

  x~ = min(x, clip(x, -epsilon_low, epsilon_high)) where A > 0 and max(...)
  elsewhere; `clipped` marks where the clip holds x~ constant (x above the range
  for A > 0, below it for A < 0). `positive` / `negative` broadcast against x.
  """
  bounded = jnp.clip(x, -epsilon_low, epsilon_high)
  clipped_x = jnp.where(positive, jnp.minimum(x, bounded),
                        jnp.maximum(x, bounded))
  clipped = jnp.where(positive, x > epsilon_high,
                      negative & (x < -epsilon_low))
  return clipped_x, clipped


def _log_power_mean(x, valid, lengths, *, p: float):
  """log M_p per row, M_p = (mean_t e^{p x_t})^{1/p} over the valid x; [B] f32.

  p = 0 is the limit, mean_t x_t (x must be 0 on padding). For p != 0, with c
  the valid x that maximizes p x:
  log M_p = c + log1p(mean_t expm1(p (x_t - c))) / p. Every p (x_t - c) <= 0,
  so nothing overflows for any |p x|; the sum has terms of one sign (no
  cancellation) and expm1 / log1p keep full precision as p -> 0. An all-masked
  row gives 0.
  """
  denominator = jnp.maximum(lengths, 1).astype(jnp.float32)
  if p == 0:
    return jnp.sum(x, axis=-1) / denominator
  pc = jnp.max(jnp.where(valid, p * x, -jnp.inf), axis=-1)
  # A shift, so a constant for autodiff; 0 for rows with no valid (or a NaN) x.
  pc = jax.lax.stop_gradient(jnp.where(jnp.isfinite(pc), pc, 0.0))
  terms = jnp.where(valid, jnp.expm1(p * x - pc[:, None]), 0.0)
  return (pc + jnp.log1p(jnp.sum(terms, axis=-1) / denominator)) / p


def geometric_mean_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float = 0.4,
    epsilon_high: float = 0.4,
    clip_mode: str = 'token',
    loss_agg_mode: str = 'seq-mean-token-mean',
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = 'k3',
    max_length: int | None = None,
    num_sequences: float | jax.Array | None = None,
    num_tokens: float | jax.Array | None = None,
    token_weights: jax.Array | None = None,
) -> tuple[jax.Array, LossExtras]:
  """GMPO: the geometric mean of the clipped token ratios, times the advantage.

  l_i = -sgn(A_i) prod_{t valid} |min(rho_t A_i, clip(rho_t, e^-epsilon_low,
  e^epsilon_high) A_i)|^(1/|o_i|) = -A_i exp(mean_t delta~_t), with
  delta~_t = min(delta_t, clip(delta_t, -epsilon_low, epsilon_high)) if A_i > 0,
  max(...) if A_i < 0; broadcast to the valid tokens, + beta * KL_t, aggregated.

  Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673. This
  is `power_mean_loss` at p = 0 (the same code), which documents the clip modes,
  the numerics and the degenerate cases.

  The clip is one-sided, as in PPO: for A > 0 only a ratio above e^epsilon_high is
  clipped, for A < 0 only one below e^-epsilon_low; the gradient flows through
  every other valid token. clip_mode='sequence' is the paper's sequence-level
  ablation (the clip acts on prod_t rho_t, i.e. on sum_t delta_t, before the
  1/|o_i| root), 'sequence_mean' clips the mean log-ratio instead, and 'none'
  does not clip (then GMPO equals GSPO without clipping). Defaults: epsilon 0.4
  (clip range (e^-0.4, e^0.4)), no KL, seq-mean-token-mean (the mean of l_i over
  sequences).

  Args:
    logp: [B, T] float, log pi_theta of the sampled tokens (differentiated).
    old_logp: [B, T] float, log pi_old (the rollout policy's).
    advantages: [B] float, one advantage per sequence.
    mask: [B, T] bool or float (nonzero = valid token).
    epsilon_low, epsilon_high, clip_mode, loss_agg_mode, ref_logp, beta,
      kl_estimator, max_length, num_sequences, num_tokens, token_weights: as
      `power_mean_loss`.

  Returns:
    (loss, extras): float32 scalar and LossExtras, as `power_mean_loss`.

  Raises:
    ValueError: as `power_mean_loss`.
  """
  return power_mean_loss(
      logp, old_logp, advantages, mask, p=0.0, epsilon_low=epsilon_low,
      epsilon_high=epsilon_high, clip_mode=clip_mode,
      loss_agg_mode=loss_agg_mode, ref_logp=ref_logp, beta=beta,
      kl_estimator=kl_estimator, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens,
      token_weights=token_weights)


def power_mean_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    p: float,
    epsilon_low: float = 0.4,
    epsilon_high: float = 0.4,
    clip_mode: str = 'token',
    loss_agg_mode: str = 'seq-mean-token-mean',
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = 'k3',
    max_length: int | None = None,
    num_sequences: float | jax.Array | None = None,
    num_tokens: float | jax.Array | None = None,
    token_weights: jax.Array | None = None,
) -> tuple[jax.Array, LossExtras]:
  """The power mean of the clipped token ratios, times the advantage.

  l_i = -A_i M_p,  M_p = (mean_t exp(p delta~_t))^(1/p)  (M_0 = exp(mean_t delta~_t)),
  delta~_t clipped in log space on the side chosen by sgn(A_i), exactly as in
  `geometric_mean_loss`; broadcast to the valid tokens, + beta * KL_t, aggregated.

  p = 0 is GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv
  2507.20673; `geometric_mean_loss` is this function at p = 0), p = 1 the
  arithmetic mean of the clipped token ratios (GRPO's per-sequence mean with
  GMPO's log-space clip), p = -1 their harmonic mean (the GMPO authors' HMPO,
  `train_zero_math_hmpo.py` in github.com/callsys/GMPO). Power-mean policy
  optimization with a fixed p: Zhao et al. 2026, "One Ring to Rule Them All:
  Unifying Group-Based RL via Dynamic Power-Mean Geometry" (PMPO), arXiv
  2601.22521 (its adaptive p is not implemented). M_p grows with p, so the
  gradient concentrates on the tokens with the largest ratios for p > 0 (token
  t weighs rho_t^p / sum_s rho_s^p) and on the smallest for p < 0.

  Clip modes (`epsilon_*` are unused with 'none'):
    * 'token': delta~_t = min(delta_t, clip(delta_t, -epsilon_low,
      epsilon_high)) if A > 0, max(...) if A < 0 (one-sided, as in PPO; GMPO).
    * 'sequence': the GMPO paper's sequence-level clip ablation, which clips the
      product of the token ratios, prod_t rho_t = pi_theta(o) / pi_old(o),
      instead of each ratio, and takes the 1/|o| root after the clip:
      l = -A r~^(1/|o|), r~ = min(prod_t rho_t, clip(prod_t rho_t,
      e^-epsilon_low, e^epsilon_high)) if A > 0, max(...) if A < 0; i.e. the
      one-sided clip applied in log space to sum_t delta_t before dividing by |o|
      (for p != 0 to |o| log M_p, the log of M_p^|o|). This is what the official
      code's `gmpo_seqclip` ablation runs (github.com/callsys/GMPO,
      train_zero_math_gmpo.py: the clamp acts on the masked sum of the log-ratios,
      then divides by the length). delta = [.3, .3], A = 1, epsilon 0.4:
      sum 0.6 -> 0.4, loss -e^0.2 = -1.2214.
    * 'sequence_mean': the one-sided clip applied to log M_p (for p = 0 the mean
      log-ratio), a GSPO-like clip in log space; not the paper's ablation. The
      example above gives -e^0.3 = -1.3499 (unclipped).
    * 'none': no clip (at p = 0, GSPO without clipping).

  Numerics: log M_p is computed in log space with a shift (see
  `_log_power_mean`), so any finite delta and any p give finite values, and
  p -> 0 is continuous (p = 1e-7 matches p = 0 to float32 rounding). log M_p is
  clamped above at 20 before the exp (only the unclipped side of A < 0, or
  clip_mode='none', can get there): past it the loss of the sequence is
  -A e^20 and its gradient 0.

  Args:
    logp: [B, T] float, log pi_theta of the sampled tokens (differentiated).
    old_logp: [B, T] float, log pi_old (the rollout policy's).
    advantages: [B] float, one advantage per sequence.
    mask: [B, T] bool or float (nonzero = valid token).
    p: the power, a finite Python float (static).
    epsilon_low: lower clip of the log-ratio, >= 0.
    epsilon_high: upper clip of the log-ratio, >= 0.
    clip_mode: one of CLIP_MODES: 'token', 'sequence', 'sequence_mean', 'none'.
    loss_agg_mode: one of AGGREGATION_MODES (applied to the broadcast l_i).
    ref_logp: [B, T] float, log pi_ref; with it, `LossExtras.kl` is reported.
    beta: KL coefficient (Python float >= 0); > 0 needs ref_logp.
    kl_estimator: 'k1', 'k2' or 'k3' (see `kl.kl_penalty`).
    max_length, num_sequences, num_tokens: see `aggregate_loss`.
    token_weights: [B, T] float >= 0, per-token loss weights (see the module
      docstring); None: unweighted.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; an all-masked sequence contributes 0 whatever its advantage holds.
    For the sequence clips every valid token of a clipped sequence counts as
    clipped.

  Raises:
    ValueError: non-finite p, unknown clip_mode, negative epsilons, or the
      options errors of `aggregate_loss` and beta/ref_logp/kl_estimator.
  """
  _check_inputs(logp, old_logp, advantages, mask, ref_logp)
  _check_options(loss_agg_mode=loss_agg_mode, max_length=max_length,
                 ref_logp=ref_logp, beta=beta, kl_estimator=kl_estimator)
  if clip_mode not in CLIP_MODES:
    raise ValueError(
        f'Unknown clip_mode {clip_mode!r}; valid: {", ".join(CLIP_MODES)}.')
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=False)
  if not np.isfinite(p):
    raise ValueError(f'p must be a finite number, got {p}.')
  valid, log_ratio, lengths, adv = _masked_inputs(
      logp, old_logp, advantages, mask)
  positive, negative = adv > 0, adv < 0
  clip = functools.partial(_one_sided_clip, epsilon_low=epsilon_low,
                           epsilon_high=epsilon_high)
  if clip_mode == 'token':
    # Padding has log_ratio 0, which clipping keeps at 0: it adds nothing and
    # is never counted as clipped.
    clipped_log_ratio, clipped = clip(log_ratio, positive[:, None],
                                      negative[:, None])
    log_mean = _log_power_mean(clipped_log_ratio, valid, lengths, p=p)
    clipped_counts = _row_count(clipped)
  else:
    log_mean = _log_power_mean(log_ratio, valid, lengths, p=p)
    clipped_counts = jnp.zeros_like(lengths)
    if clip_mode != 'none':
      # 'sequence' clips |o| log M_p (sum_t delta_t at p = 0), 'sequence_mean'
      # log M_p itself.
      size = (jnp.maximum(lengths, 1).astype(jnp.float32)
              if clip_mode == 'sequence' else 1.0)
      clipped_total, clipped = clip(log_mean * size, positive, negative)
      log_mean = clipped_total / size
      clipped_counts = jnp.where(clipped, lengths, 0)
  low_counts = jnp.where(negative, clipped_counts, 0)
  high_counts = jnp.where(positive, clipped_counts, 0)
  # adv is 0 on rows without a valid token.
  sequence_loss = -adv * jnp.exp(jnp.minimum(log_mean, MAX_LOG_RATIO))
  return _finish(
      log_ratio, valid, lengths, low_counts, high_counts, logp, ref_logp,
      sequence_losses=sequence_loss, token_weights=token_weights, beta=beta,
      kl_estimator=kl_estimator,
      loss_agg_mode=loss_agg_mode, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens)


def gspo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    loss_agg_mode: str = 'seq-mean-token-mean',
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = 'k3',
    max_length: int | None = None,
    num_sequences: float | jax.Array | None = None,
    num_tokens: float | jax.Array | None = None,
    token_weights: jax.Array | None = None,
) -> tuple[jax.Array, LossExtras]:
  """GSPO: PPO clipping of the sequence ratio (the geometric mean of rho_t).

  s_i = exp(mean_t delta_t);  l_i = -min(s_i A_i, clip(s_i, 1 - epsilon_low,
  1 + epsilon_high) A_i); broadcast to the valid tokens, + beta * KL_t, aggregated.

  Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071
  (the sequence-level objective, not GSPO-token). Defaults are the paper's
  clip range 3e-4 / 4e-4. The mean log-ratio is clamped above at 20 before the
  exp, so a huge delta gives a finite loss and gradient.

  Args:
    logp: [B, T] float, log pi_theta of the sampled tokens (differentiated).
    old_logp: [B, T] float, log pi_old (the rollout policy's).
    advantages: [B] float, one advantage per sequence.
    mask: [B, T] bool or float (nonzero = valid token).
    epsilon_low: lower clip of s, 0 <= epsilon_low <= 1.
    epsilon_high: upper clip of s, >= 0.
    loss_agg_mode: one of AGGREGATION_MODES (applied to the broadcast l_i).
    ref_logp: [B, T] float, log pi_ref; with it, `LossExtras.kl` is reported.
    beta: KL coefficient (Python float >= 0); > 0 needs ref_logp.
    kl_estimator: 'k1', 'k2' or 'k3' (see `kl.kl_penalty`).
    max_length, num_sequences, num_tokens: see `aggregate_loss`.
    token_weights: [B, T] float >= 0, per-token loss weights (see the module
      docstring); None: unweighted.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; an all-masked sequence contributes 0. Clip fractions count every
    valid token of a clipped sequence.

  Raises:
    ValueError: bad epsilons, or the options errors of `aggregate_loss` and
      beta/ref_logp/kl_estimator.
  """
  _check_inputs(logp, old_logp, advantages, mask, ref_logp)
  _check_options(loss_agg_mode=loss_agg_mode, max_length=max_length,
                 ref_logp=ref_logp, beta=beta, kl_estimator=kl_estimator)
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=True)
  valid, log_ratio, lengths, adv = _masked_inputs(
      logp, old_logp, advantages, mask)
  ratio = jnp.exp(jnp.minimum(_log_power_mean(log_ratio, valid, lengths, p=0.0),
                              MAX_LOG_RATIO))
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  sequence_loss = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
  high_counts = jnp.where((adv > 0) & (ratio > 1.0 + epsilon_high), lengths, 0)
  low_counts = jnp.where((adv < 0) & (ratio < 1.0 - epsilon_low), lengths, 0)
  return _finish(
      log_ratio, valid, lengths, low_counts, high_counts, logp, ref_logp,
      sequence_losses=sequence_loss, token_weights=token_weights, beta=beta,
      kl_estimator=kl_estimator,
      loss_agg_mode=loss_agg_mode, max_length=max_length,
      num_sequences=num_sequences, num_tokens=num_tokens)


POLICY_LOSSES: Final[Mapping[str, Callable[..., tuple[jax.Array, LossExtras]]]] = (
    types.MappingProxyType({
        'token_clip': token_clip_loss,
        'geometric': geometric_mean_loss,
        'gspo': gspo_loss,
        'power_mean': power_mean_loss,
    }))

# Per-batch data, not hyperparameters: binding them once would go stale.
_PER_BATCH_ARGUMENTS: Final[frozenset[str]] = frozenset(
    {'ref_logp', 'num_sequences', 'num_tokens', 'token_weights'})


def get_policy_loss(
    name: str, **hyperparameters
) -> Callable[..., tuple[jax.Array, LossExtras]]:
  """Looks up a policy objective by name and binds its hyperparameters.

  Args:
    name: a key of POLICY_LOSSES ('token_clip', 'geometric', 'gspo',
      'power_mean').
    **hyperparameters: keyword-only options of that objective (e.g.
      epsilon_low, clip_mode, loss_agg_mode, beta; 'power_mean' needs p); not
      ref_logp, num_sequences, num_tokens or token_weights, which change with
      every batch.

  Returns:
    fn(logp, old_logp, advantages, mask, *, ref_logp=None, num_sequences=None,
    num_tokens=None, token_weights=None) -> (loss, LossExtras). Values are validated at the first call.

  Raises:
    ValueError: unknown name or hyperparameter, or a missing required one (the
      message lists the valid ones).
  """
  if name not in POLICY_LOSSES:
    raise ValueError(
        f'Unknown policy loss {name!r}; valid: {", ".join(POLICY_LOSSES)}.')
  fn = POLICY_LOSSES[name]
  options = [
      p for p in inspect.signature(fn).parameters.values()
      if p.kind is inspect.Parameter.KEYWORD_ONLY
      and p.name not in _PER_BATCH_ARGUMENTS
  ]
  allowed = [p.name for p in options]
  unknown = sorted(set(hyperparameters) - set(allowed))
  if unknown:
    raise ValueError(
        f'Unknown hyperparameter(s) {", ".join(unknown)} for policy loss '
        f'{name!r}; valid: {", ".join(allowed)}.')
  missing = [p.name for p in options
             if p.default is inspect.Parameter.empty and p.name not in hyperparameters]
  if missing:
    raise ValueError(
        f'Policy loss {name!r} needs hyperparameter(s) {", ".join(missing)}.')
  return functools.partial(fn, **hyperparameters)
