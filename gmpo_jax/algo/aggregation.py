"""Aggregation of a policy objective, applied once for every objective: KL penalty,
importance weights, the reduction over tokens and sequences, and the diagnostics.

One concept: turning an objective's per-token or per-sequence terms into the scalar loss.
An objective (`gmpo_jax.algo.losses`) is written as a function of the masked inputs that
returns its `ObjectiveTerms`; `policy_objective` makes it a public loss with the shared
signature, so the aggregation, KL and weighting options live here and nowhere else.

Notation (docs/CONTRACTS.md): B sequences, T tokens; delta_t = logp_t - old_logp_t,
rho_t = exp(delta_t); A_i is the advantage of sequence i; |o_i| its number of valid
(unmasked) tokens.

An objective's terms are a per-token loss (sequence-level objectives give a
per-sequence loss, broadcast to every valid token); beta * KL(pi_theta || pi_ref)
is optionally added per token, and the result reduced as `aggregate_loss` does.
(Internally each row's sum is formed first, so a broadcast sequence loss l_i
enters as |o_i| l_i without a [B, T] array.) All hyperparameters are Python
values, static under `jax.jit`; the code has no Python branch on a traced value,
so any batch size works.

Conventions shared by all objectives:
  * Masked positions are replaced before any arithmetic, so padding may hold any
    value (even -inf or NaN) without reaching the loss, the gradient or the extras;
    the advantage of an all-masked row is ignored the same way.
  * Non-finite *valid* input gives NaN, never a plausible number: a valid token
    whose delta (or, with ref_logp, whose KL) is not finite, or a nonempty row
    whose advantage is not finite, makes the loss NaN, so the learner's
    non-finite guard skips the update.
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

import inspect
from collections.abc import Callable
from typing import Final, NamedTuple

import chex
import jax
import jax.numpy as jnp

from gmpo_jax.algo.kl import KL_ESTIMATORS, MAX_LOG_RATIO, kl_penalty

AGGREGATION_MODES: Final[tuple[str, ...]] = (
    'token-mean',
    'seq-mean-token-mean',
    'seq-mean-token-sum',
    'seq-mean-token-sum-norm',
)


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


class MaskedInputs(NamedTuple):
  """An objective's inputs with the padding neutralized (see `_masked_inputs`).

  Attributes:
    valid: [B, T] bool, the valid tokens.
    log_ratio: [B, T] float32 delta_t, 0 on padding, NaN where a valid delta is
      not finite.
    lengths: [B] int32 |o_i|.
    advantages: [B] float32, 0 on all-masked rows, NaN where a nonempty row's
      advantage is not finite.
  """

  valid: jax.Array
  log_ratio: jax.Array
  lengths: jax.Array
  advantages: jax.Array


class ObjectiveTerms(NamedTuple):
  """What an objective computes before aggregation: exactly one of `token_losses`
  ([B, T], any value on padding) and `sequence_losses` ([B], broadcast to the row's
  valid tokens), and low_counts / high_counts [B] int32, the valid tokens clipped on
  each side (see `LossExtras`)."""

  low_counts: jax.Array
  high_counts: jax.Array
  token_losses: jax.Array | None = None
  sequence_losses: jax.Array | None = None


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
  row_sums = jnp.sum(jnp.where(valid, per_token.astype(jnp.float32), 0.0), axis=-1)
  weights = _row_weights(
      row_count(valid),
      mode=mode,
      max_length=max_length,
      num_sequences=num_sequences,
      num_tokens=num_tokens,
  )
  return jnp.sum(weights * row_sums)


def _check_aggregation(mode, max_length) -> None:
  if mode not in AGGREGATION_MODES:
    raise ValueError(f'Unknown loss_agg_mode {mode!r}; valid: {", ".join(AGGREGATION_MODES)}.')
  if mode == 'seq-mean-token-sum-norm':
    if max_length is None:
      raise ValueError(
          'loss_agg_mode="seq-mean-token-sum-norm" needs max_length, its constant '
          'divisor (Dr.GRPO: the generation budget); without it the divisor would '
          'be the padded length of each (micro-)batch.'
      )
    if not max_length > 0:
      raise ValueError(f'max_length must be positive, got {max_length}.')
  elif max_length is not None:
    raise ValueError(
        f'max_length applies only to loss_agg_mode="seq-mean-token-sum-norm", '
        f'got mode {mode!r}.'
    )


def _row_weights(lengths, *, mode, max_length, num_sequences, num_tokens) -> jax.Array:
  """[B] weights w_i with aggregate = sum_i w_i sum_t l_it (see aggregate_loss).

  Aggregating through per-row sums lets a sequence-level loss l_i enter as
  |o_i| l_i, exactly its broadcast to the valid tokens, without a [B, T] array.
  """
  if mode == 'token-mean':
    count = jnp.sum(lengths) if num_tokens is None else num_tokens
    return jnp.broadcast_to(1.0 / jnp.maximum(count, 1).astype(jnp.float32), lengths.shape)
  count = jnp.sum(lengths > 0) if num_sequences is None else num_sequences
  per_sequence = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  if mode == 'seq-mean-token-mean':
    return per_sequence / jnp.maximum(lengths, 1).astype(jnp.float32)
  if mode == 'seq-mean-token-sum-norm':
    per_sequence = per_sequence / float(max_length)
  return jnp.broadcast_to(per_sequence, lengths.shape)


def _check_inputs(logp, old_logp, advantages, mask, ref_logp) -> None:
  chex.assert_rank([logp, old_logp, mask, advantages], [2, 2, 2, 1])
  chex.assert_equal_shape([logp, old_logp, mask] + ([] if ref_logp is None else [ref_logp]))
  chex.assert_equal_shape_prefix([logp, advantages], 1)
  chex.assert_type([logp, old_logp, advantages], float)


def _check_options(*, loss_agg_mode, max_length, ref_logp, beta, kl_estimator) -> None:
  _check_aggregation(loss_agg_mode, max_length)
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f'Unknown kl_estimator {kl_estimator!r}; valid: {", ".join(KL_ESTIMATORS)}.')
  if not beta >= 0:
    raise ValueError(f'beta must be >= 0, got {beta}.')
  if beta > 0 and ref_logp is None:
    raise ValueError(
        f'beta={beta} > 0 needs ref_logp (the reference policy log-probs); pass '
        'ref_logp or set beta=0.'
    )


def row_count(flags: jax.Array) -> jax.Array:
  """Number of True entries along the last axis, [B] int32."""
  # Summed in float32, exact up to 2^24 per row: XLA:CPU reduces float32 several
  # times faster than int32 or bool, which take a slow generic path.
  if flags.shape[-1] > 2**24:
    raise ValueError(f'At most 2^24 tokens per row, got T = {flags.shape[-1]}.')
  return jnp.sum(flags, axis=-1, dtype=jnp.float32).astype(jnp.int32)


def _masked_inputs(logp, old_logp, advantages, mask) -> MaskedInputs:
  """The inputs with padding neutralized.

  delta is 0 on padding and adv 0 on all-masked rows, so garbage there (-inf,
  NaN) never reaches a sum or an exp; jnp.where also blocks its gradient. A
  valid token's non-finite delta and a nonempty row's non-finite advantage
  become NaN: the MAX_LOG_RATIO clamp and the clips would otherwise turn +-inf
  into a finite, plausible loss.
  """
  valid = mask.astype(bool)
  lengths = row_count(valid)
  delta = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
  log_ratio = jnp.where(valid, jnp.where(jnp.isfinite(delta), delta, jnp.nan), 0.0)
  adv = advantages.astype(jnp.float32)
  adv = jnp.where(lengths > 0, jnp.where(jnp.isfinite(adv), adv, jnp.nan), 0.0)
  return MaskedInputs(valid, log_ratio, lengths, adv)


def _aggregate_terms(
    inputs: MaskedInputs,
    terms: ObjectiveTerms,
    logp: jax.Array,
    ref_logp: jax.Array | None,
    *,
    token_weights: jax.Array | None,
    beta: float,
    kl_estimator: str,
    loss_agg_mode: str,
    max_length: int | None,
    num_sequences,
    num_tokens,
) -> tuple[jax.Array, LossExtras]:
  """Weights and adds the KL penalty, aggregates, and computes the diagnostics."""
  valid, log_ratio, lengths, _ = inputs
  if token_weights is not None:
    chex.assert_equal_shape([token_weights, valid])
    token_weights = jax.lax.stop_gradient(jnp.where(valid, token_weights.astype(jnp.float32), 0.0))
  row_losses = _row_sums(
      valid,
      lengths,
      token_weights,
      token_losses=terms.token_losses,
      sequence_losses=terms.sequence_losses,
  )
  kl_rows = None
  if ref_logp is not None:
    # Zeroing both inputs on padding makes x = 0 there, where every estimator
    # is 0 (and garbage in the padding cannot leak); a non-finite valid input
    # gives NaN rather than the value of the clamped x.
    finite = jnp.isfinite(logp) & jnp.isfinite(ref_logp)
    token_kl = kl_penalty(
        jnp.where(valid & finite, logp, 0.0),
        jnp.where(valid & finite, ref_logp, 0.0),
        estimator=kl_estimator,
    )
    token_kl = jnp.where(valid & ~finite, jnp.nan, token_kl)
    kl_rows = jnp.sum(token_kl, axis=-1)
    if beta > 0:
      row_losses = row_losses + beta * (
          kl_rows
          if token_weights is None
          else _row_sums(valid, lengths, token_weights, token_losses=token_kl)
      )
  weights = _row_weights(
      lengths,
      mode=loss_agg_mode,
      max_length=max_length,
      num_sequences=num_sequences,
      num_tokens=num_tokens,
  )
  loss = jnp.sum(weights * row_losses)
  extras = _extras(log_ratio, valid, lengths, terms.low_counts, terms.high_counts, kl_rows)
  return loss, jax.tree.map(jax.lax.stop_gradient, extras)


def _row_sums(
    valid, lengths, token_weights, *, token_losses=None, sequence_losses=None
) -> jax.Array:
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


def _extras(log_ratio, valid, lengths, low_counts, high_counts, kl_rows) -> LossExtras:
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
      kl=(jnp.float32(0.0) if kl_rows is None else jnp.sum(kl_rows) / num_tokens),
  )


def policy_objective(
    *, loss_agg_mode: str
) -> Callable[[Callable[..., ObjectiveTerms]], Callable[..., tuple[jax.Array, LossExtras]]]:
  """Makes a public objective from `terms_fn(inputs: MaskedInputs, **hyperparameters)
  -> ObjectiveTerms`, with `loss_agg_mode` its default aggregation.

  The objective is `fn(logp, old_logp, advantages, mask, *, <the hyperparameters of
  terms_fn>, loss_agg_mode, ref_logp=None, beta=0.0, kl_estimator='k3',
  max_length=None, num_sequences=None, num_tokens=None, token_weights=None)
  -> (loss, LossExtras)`, with terms_fn's name and docstring; `fn.terms` is terms_fn.
  It checks the inputs and these options, masks the inputs, and applies the
  aggregation, KL penalty and token weights to terms_fn's terms (see the module
  docstring for the conventions). Its arguments:

    logp: [B, T] float, log pi_theta of the sampled tokens (differentiated).
    old_logp: [B, T] float, log pi_old (the rollout policy's).
    advantages: [B] float, one advantage per sequence.
    mask: [B, T] bool or float (nonzero = valid token).
    loss_agg_mode: one of AGGREGATION_MODES (a sequence loss is broadcast first).
    ref_logp: [B, T] float, log pi_ref; with it, `LossExtras.kl` is reported.
    beta: KL coefficient (Python float >= 0); > 0 needs ref_logp.
    kl_estimator: 'k1', 'k2' or 'k3' (see `kl.kl_penalty`).
    max_length, num_sequences, num_tokens: see `aggregate_loss`.
    token_weights: [B, T] float >= 0, per-token loss weights (see the module
      docstring); None: unweighted.

  It returns a float32 scalar and `LossExtras` (no gradient through the extras), and
  raises ValueError for the errors of `aggregate_loss`'s options, an unknown
  kl_estimator, beta < 0, or beta > 0 without ref_logp, before terms_fn's own checks.
  """
  default_agg_mode = loss_agg_mode

  def decorate(terms_fn):
    def objective(
        logp: jax.Array,
        old_logp: jax.Array,
        advantages: jax.Array,
        mask: jax.Array,
        *,
        loss_agg_mode: str = default_agg_mode,
        ref_logp: jax.Array | None = None,
        beta: float = 0.0,
        kl_estimator: str = 'k3',
        max_length: int | None = None,
        num_sequences: float | jax.Array | None = None,
        num_tokens: float | jax.Array | None = None,
        token_weights: jax.Array | None = None,
        **hyperparameters,
    ) -> tuple[jax.Array, LossExtras]:
      _check_inputs(logp, old_logp, advantages, mask, ref_logp)
      _check_options(
          loss_agg_mode=loss_agg_mode,
          max_length=max_length,
          ref_logp=ref_logp,
          beta=beta,
          kl_estimator=kl_estimator,
      )
      inputs = _masked_inputs(logp, old_logp, advantages, mask)
      return _aggregate_terms(
          inputs,
          terms_fn(inputs, **hyperparameters),
          logp,
          ref_logp,
          token_weights=token_weights,
          beta=beta,
          kl_estimator=kl_estimator,
          loss_agg_mode=loss_agg_mode,
          max_length=max_length,
          num_sequences=num_sequences,
          num_tokens=num_tokens,
      )

    # The signature callers see (and `get_policy_loss` reads): the objective's own
    # hyperparameters in place of **hyperparameters, before the shared options.
    shared = inspect.signature(objective)
    own = [
        q
        for q in inspect.signature(terms_fn).parameters.values()
        if q.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    positional = [
        q for q in shared.parameters.values() if q.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    options = [q for q in shared.parameters.values() if q.kind is inspect.Parameter.KEYWORD_ONLY]
    objective.__signature__ = shared.replace(parameters=positional + own + options)
    objective.__name__ = objective.__qualname__ = terms_fn.__name__
    objective.__doc__ = terms_fn.__doc__
    objective.__module__ = terms_fn.__module__
    objective.terms = terms_fn
    return objective

  return decorate
