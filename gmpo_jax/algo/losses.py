"""Policy objectives (token-clip PPO/GRPO, GMPO and its power means, GSPO): their terms.

One concept, the family of clipped policy objectives. Each is written as the loss of
the masked inputs (`aggregation.MaskedInputs`), per token or per sequence, and
`aggregation.policy_objective` makes it the public loss: it adds the options every
objective shares (loss_agg_mode, ref_logp, beta, kl_estimator, max_length,
num_sequences, num_tokens, token_weights; documented there) and applies them once,
with the conventions of `gmpo_jax.algo.aggregation` (masking, non-finite input,
micro-batch counts, weights).

Notation (docs/CONTRACTS.md): B sequences, T tokens; delta_t = logp_t - old_logp_t,
rho_t = exp(delta_t); A_i is the advantage of sequence i; |o_i| its number of valid
(unmasked) tokens. A log-ratio entering exp is clamped above at `kl.MAX_LOG_RATIO`
(= 20): past it the loss is constant and its gradient 0, so a huge delta gives
finite values.
"""

import functools
from collections.abc import Callable
from typing import Final

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.algo import registry
from gmpo_jax.algo.aggregation import (
    LossExtras,
    MaskedInputs,
    ObjectiveTerms,
    policy_objective,
    row_count,
)
from gmpo_jax.algo.kl import MAX_LOG_RATIO

# Per-batch data, not hyperparameters: binding them once would go stale.
_PER_BATCH_ARGUMENTS: Final[frozenset[str]] = frozenset(
    {'ref_logp', 'num_sequences', 'num_tokens', 'token_weights'}
)

# Filled by `@POLICY_LOSSES.register(name)` below; frozen after the last objective.
POLICY_LOSSES: Final[registry.Registry[Callable[..., tuple[jax.Array, LossExtras]]]] = (
    registry.Registry('policy loss', per_call=_PER_BATCH_ARGUMENTS)
)

CLIP_MODES: Final[tuple[str, ...]] = ('token', 'sequence', 'sequence_mean', 'none')


def _check_epsilons(epsilon_low, epsilon_high, *, ratio_space: bool) -> None:
  # In ratio space the lower bound is 1 - epsilon_low, which must stay >= 0.
  low_ok = 0 <= epsilon_low <= 1 if ratio_space else epsilon_low >= 0
  if not (low_ok and epsilon_high >= 0):
    bound = '0 <= epsilon_low <= 1' if ratio_space else 'epsilon_low >= 0'
    raise ValueError(
        f'Need {bound} and epsilon_high >= 0, got epsilon_low={epsilon_low}, '
        f'epsilon_high={epsilon_high}.'
    )


@POLICY_LOSSES.register('token_clip')
@policy_objective(loss_agg_mode='token-mean')
def token_clip_loss(
    inputs: MaskedInputs,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = None,
) -> ObjectiveTerms:
  """PPO/GRPO clipped surrogate per token, with clip-higher and dual clip.

  l_t = -min(rho_t A, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) A); with
  dual_clip c and A < 0: l_t = min(l_t, c |A|); then + beta * KL_t, aggregated.

  Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv
  1707.06347; GRPO: Shao et al. 2024, arXiv 2402.03300; clip-higher (epsilon_high
  = 0.28): DAPO, Yu et al. 2025, arXiv 2503.14476; dual clip: Ye et al. 2020,
  "Mastering Complex Control in MOBA Games with Deep RL", arXiv 1912.09729.

  Args:
    logp, old_logp, advantages, mask: [B, T], [B, T], [B], [B, T]; these and the
      shared options (default loss_agg_mode 'token-mean'): see
      `aggregation.policy_objective`.
    epsilon_low: lower clip, 0 <= epsilon_low <= 1.
    epsilon_high: upper clip, >= 0.
    dual_clip: c > 1 bounding the loss of A < 0 tokens by c |A|; None: off.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; all-masked rows contribute 0; rho is computed from delta clamped
    at 20, so a huge delta gives a finite loss and gradient.

  Raises:
    ValueError: bad epsilons, dual_clip <= 1, or the options errors of
      `aggregation.policy_objective`.
  """
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=True)
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f'dual_clip must be > 1 (or None), got {dual_clip}.')
  _, log_ratio, _, row_adv = inputs
  ratio = jnp.exp(jnp.minimum(log_ratio, MAX_LOG_RATIO))
  adv = row_adv[:, None]
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
  # The clipped branch is the larger loss (and constant in logp) exactly when
  # the ratio has left the range on the side the advantage pushes it to: high
  # for A > 0, low for A < 0. Padding has ratio 1 and is never counted.
  positive, negative = row_adv > 0, row_adv < 0
  clipped_counts = row_count(
      jnp.where(
          positive[:, None],
          ratio > 1.0 + epsilon_high,
          negative[:, None] & (ratio < 1.0 - epsilon_low),
      )
  )
  low_counts = jnp.where(negative, clipped_counts, 0)
  high_counts = jnp.where(positive, clipped_counts, 0)
  if dual_clip is not None:
    # c > 1 >= 1 - epsilon_low, so the bound c|A| binds exactly where rho > c.
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, -dual_clip * adv), per_token)
    high_counts = high_counts + row_count(negative[:, None] & (ratio > dual_clip))
  return ObjectiveTerms(low_counts, high_counts, token_losses=per_token)


def _one_sided_clip(x, positive, negative, *, epsilon_low, epsilon_high):
  """GMPO's clip in log space: (x~, clipped), for x of any shape.

  x~ = min(x, clip(x, -epsilon_low, epsilon_high)) where A > 0 and max(...)
  elsewhere; `clipped` marks where the clip holds x~ constant (x above the range
  for A > 0, below it for A < 0). `positive` / `negative` broadcast against x.
  """
  bounded = jnp.clip(x, -epsilon_low, epsilon_high)
  clipped_x = jnp.where(positive, jnp.minimum(x, bounded), jnp.maximum(x, bounded))
  clipped = jnp.where(positive, x > epsilon_high, negative & (x < -epsilon_low))
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


@POLICY_LOSSES.register('geometric')
@policy_objective(loss_agg_mode='seq-mean-token-mean')
def geometric_mean_loss(
    inputs: MaskedInputs,
    *,
    epsilon_low: float = 0.4,
    epsilon_high: float = 0.4,
    clip_mode: str = 'token',
) -> ObjectiveTerms:
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
    logp, old_logp, advantages, mask: [B, T], [B, T], [B], [B, T]; these and the
      shared options (default loss_agg_mode 'seq-mean-token-mean'): see
      `aggregation.policy_objective`.
    epsilon_low, epsilon_high, clip_mode: as `power_mean_loss`.

  Returns:
    (loss, extras): float32 scalar and LossExtras, as `power_mean_loss`.

  Raises:
    ValueError: as `power_mean_loss`.
  """
  return power_mean_loss.terms(
      inputs, p=0.0, epsilon_low=epsilon_low, epsilon_high=epsilon_high, clip_mode=clip_mode
  )


@POLICY_LOSSES.register('power_mean')
@policy_objective(loss_agg_mode='seq-mean-token-mean')
def power_mean_loss(
    inputs: MaskedInputs,
    *,
    p: float,
    epsilon_low: float = 0.4,
    epsilon_high: float = 0.4,
    clip_mode: str = 'token',
) -> ObjectiveTerms:
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
    logp, old_logp, advantages, mask: [B, T], [B, T], [B], [B, T]; these and the
      shared options (default loss_agg_mode 'seq-mean-token-mean', applied to the
      broadcast l_i): see `aggregation.policy_objective`.
    p: the power, a finite Python float (static).
    epsilon_low: lower clip of the log-ratio, >= 0.
    epsilon_high: upper clip of the log-ratio, >= 0.
    clip_mode: one of CLIP_MODES: 'token', 'sequence', 'sequence_mean', 'none'.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; an all-masked sequence contributes 0 whatever its advantage holds.
    For the sequence clips every valid token of a clipped sequence counts as
    clipped.

  Raises:
    ValueError: non-finite p, unknown clip_mode, negative epsilons, or the
      options errors of `aggregation.policy_objective`.
  """
  if clip_mode not in CLIP_MODES:
    raise ValueError(f'Unknown clip_mode {clip_mode!r}; valid: {", ".join(CLIP_MODES)}.')
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=False)
  if not np.isfinite(p):
    raise ValueError(f'p must be a finite number, got {p}.')
  valid, log_ratio, lengths, adv = inputs
  positive, negative = adv > 0, adv < 0
  clip = functools.partial(_one_sided_clip, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  if clip_mode == 'token':
    # Padding has log_ratio 0, which clipping keeps at 0: it adds nothing and
    # is never counted as clipped.
    clipped_log_ratio, clipped = clip(log_ratio, positive[:, None], negative[:, None])
    log_mean = _log_power_mean(clipped_log_ratio, valid, lengths, p=p)
    clipped_counts = row_count(clipped)
  else:
    log_mean = _log_power_mean(log_ratio, valid, lengths, p=p)
    clipped_counts = jnp.zeros_like(lengths)
    if clip_mode != 'none':
      # 'sequence' clips |o| log M_p (sum_t delta_t at p = 0), 'sequence_mean'
      # log M_p itself.
      size = jnp.maximum(lengths, 1).astype(jnp.float32) if clip_mode == 'sequence' else 1.0
      clipped_total, clipped = clip(log_mean * size, positive, negative)
      log_mean = clipped_total / size
      clipped_counts = jnp.where(clipped, lengths, 0)
  low_counts = jnp.where(negative, clipped_counts, 0)
  high_counts = jnp.where(positive, clipped_counts, 0)
  # adv is 0 on rows without a valid token.
  sequence_loss = -adv * jnp.exp(jnp.minimum(log_mean, MAX_LOG_RATIO))
  return ObjectiveTerms(low_counts, high_counts, sequence_losses=sequence_loss)


@POLICY_LOSSES.register('gspo')
@policy_objective(loss_agg_mode='seq-mean-token-mean')
def gspo_loss(
    inputs: MaskedInputs,
    *,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
) -> ObjectiveTerms:
  """GSPO: PPO clipping of the sequence ratio (the geometric mean of rho_t).

  s_i = exp(mean_t delta_t);  l_i = -min(s_i A_i, clip(s_i, 1 - epsilon_low,
  1 + epsilon_high) A_i); broadcast to the valid tokens, + beta * KL_t, aggregated.

  Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071
  (the sequence-level objective, not GSPO-token). Defaults are the paper's
  clip range 3e-4 / 4e-4. The mean log-ratio is clamped above at 20 before the
  exp, so a huge delta gives a finite loss and gradient.

  Args:
    logp, old_logp, advantages, mask: [B, T], [B, T], [B], [B, T]; these and the
      shared options (default loss_agg_mode 'seq-mean-token-mean', applied to the
      broadcast l_i): see `aggregation.policy_objective`.
    epsilon_low: lower clip of s, 0 <= epsilon_low <= 1.
    epsilon_high: upper clip of s, >= 0.

  Returns:
    (loss, extras): float32 scalar and LossExtras. A = 0 gives loss 0 and zero
    gradient; an all-masked sequence contributes 0. Clip fractions count every
    valid token of a clipped sequence.

  Raises:
    ValueError: bad epsilons, or the options errors of
      `aggregation.policy_objective`.
  """
  _check_epsilons(epsilon_low, epsilon_high, ratio_space=True)
  valid, log_ratio, lengths, adv = inputs
  ratio = jnp.exp(jnp.minimum(_log_power_mean(log_ratio, valid, lengths, p=0.0), MAX_LOG_RATIO))
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  sequence_loss = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
  high_counts = jnp.where((adv > 0) & (ratio > 1.0 + epsilon_high), lengths, 0)
  low_counts = jnp.where((adv < 0) & (ratio < 1.0 - epsilon_low), lengths, 0)
  return ObjectiveTerms(low_counts, high_counts, sequence_losses=sequence_loss)


POLICY_LOSSES.freeze()  # read-only from here on


def get_policy_loss(name: str, **hyperparameters) -> Callable[..., tuple[jax.Array, LossExtras]]:
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
  return POLICY_LOSSES.bind(name, **hyperparameters)
