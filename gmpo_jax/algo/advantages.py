"""Group-relative advantage estimators.

One concept, the family of group baselines, each with its paper's derivation in its docstring.

Every estimator maps the rewards of ``B`` prompts with ``G`` completions each,
``rewards [B, G]``, to one advantage per completion, ``[B, G]``. An optional boolean
``mask [B, G]`` marks the valid completions: masked entries get advantage 0 and take
no part in any mean or standard deviation. Hyperparameters are keyword-only and
static (bind them with ``functools.partial`` or :func:`get_advantage_fn` before
``jax.jit``).

Numerics shared by all estimators (see ``_moments``):

* A group whose valid rewards are all equal (including a group of one valid
  completion, and an all-masked group) gets advantages of exactly 0: the values are
  shifted by the group's largest valid value before averaging, so equal values give
  exact zeros instead of rounding noise divided by ``eps``.
* Raw rewards are divided by their group's largest magnitude before any sum or
  square, so no intermediate overflows for any finite input (log rewards are
  bounded and need no scaling).
* Standard deviations use ``ddof = 1`` and a square root whose gradient stays
  finite at 0, so the estimators can be differentiated without producing NaN.

Non-finite input, one rule for every estimator (see ``_nan_where_invalid``):

* A NaN or ±inf reward on a *valid* entry makes every valid advantage of its group
  NaN (of the whole batch for :func:`batch_std_advantages`, whose spread couples the
  groups); so does a reward outside an estimator's domain where the formula has no
  value (a negative reward for :func:`maxrl_advantages`). Never a plausible-looking
  number: the learner's non-finite guard then skips the update. Floors and offsets
  (the log-reward baselines) are documented clamps of finite rewards, not errors.
* Anything in a *masked* entry (NaN and ±inf included) contributes nothing: masked
  entries are 0 and the other advantages are what they would be without them.

Value checks (finite, positive) cannot run under ``jit``: call
:func:`validate_rewards` on the host before the rewards enter a jitted step; it
names the offending groups, and :func:`reward_domain` says which check an
estimator needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from gmpo_jax.algo import registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "batch_std_advantages",
    "dr_grpo_advantages",
    "get_advantage_fn",
    "gmpo_advantages",
    "grpo_advantages",
    "host_rewards",
    "maxrl_advantages",
    "power_mean_advantages",
    "reward_domain",
    "rloo_advantages",
    "validate_rewards",
]


# Filled by `@ADVANTAGE_ESTIMATORS.register(name)` below; frozen after the last estimator.
ADVANTAGE_ESTIMATORS: registry.Registry[Callable[..., jax.Array]] = registry.Registry(
    "advantage estimator"
)


def _check_inputs(rewards: chex.Array, mask: chex.Array | None) -> jax.Array:
  """Static shape/dtype checks; returns the validity mask (all True if None)."""
  chex.assert_rank(rewards, 2)
  chex.assert_type(rewards, float)
  if mask is None:
    return jnp.ones(rewards.shape, dtype=bool)
  chex.assert_type(mask, bool)
  chex.assert_equal_shape([rewards, mask])
  return mask


def _compute_dtype(rewards: chex.Array) -> jnp.dtype:
  # At least float32: bf16/f16 rewards would lose the differences that the
  # advantages are made of. float64 stays float64 when x64 is enabled.
  return jnp.promote_types(rewards.dtype, jnp.float32)


def _check_eps(eps: float) -> None:
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps}.")


def _scale(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s, 1 / s) with s = max_valid |v| clipped to the normal range of the dtype.

  Raw rewards are divided by s before any sum or square, so that nothing overflows
  for any finite input (|v / s| <= 4). The clip keeps both s and 1 / s normal
  numbers: XLA flushes subnormals to zero on CPU and GPU. s is a constant for
  autodiff: every estimator is the same function of the rewards for any fixed s,
  so the gradient stays exact.
  """
  tiny = jnp.finfo(values.dtype).tiny
  largest = jnp.max(jnp.where(valid, jnp.abs(values), 0))
  scale = jax.lax.stop_gradient(jnp.clip(largest, tiny, 1 / tiny))
  return scale, 1 / scale


def _moments(
    values: jax.Array, valid: jax.Array, inverse_scale: jax.Array | float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked centering and unbiased variance of one group, in units of the scale.

  Args:
    values: [N] float; masked entries may hold anything, NaN included.
    valid: [N] bool.
    inverse_scale: scalar, 1 / s; values * inverse_scale must be small enough that
      n of their squares cannot overflow (see ``_scale``).

  Returns:
    ``(centered, variance, count)``: centered [N] = (v_i - mean_valid v) / s, 0 on
    masked entries; the unbiased (ddof = 1) variance of the valid v / s, 0 for
    fewer than two; the number of valid entries (float).
  """
  count = jnp.sum(valid.astype(values.dtype))
  # Shift by a valid member (the largest) before averaging: equal values then give
  # exactly 0, hence a mean of 0 and advantages of exactly 0 (sum(v) / n need not
  # round back to v, and eps would turn that noise into O(1) advantages). The
  # shift cancels in the centered values, so it is a constant for autodiff.
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(valid, values, -jnp.inf)))
  # Halve before subtracting: the difference of two finite halves cannot overflow.
  # Halving is exact, so equal values still give exactly 0 where the compiler fuses
  # a product and a subtraction into one multiply-add (XLA on CPU does: there
  # v * (1 / s) - shift * (1 / s) left a rounding residue that eps / s amplified).
  shifted = jnp.where(valid, (values * 0.5 - shift * 0.5) * (2 * inverse_scale), 0)
  mean = jnp.sum(shifted) / jnp.maximum(count, 1)
  # Two passes (mean, then squared deviations) rather than sum and sum of squares:
  # no cancellation in the variance.
  centered = jnp.where(valid, shifted - mean, 0)
  variance = jnp.sum(centered**2) / jnp.maximum(count - 1, 1)
  return centered, variance, count


def _safe_std(variance: jax.Array) -> jax.Array:
  # sqrt'(0) is infinite: keep both the value and the gradient finite at 0.
  positive = variance > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1)), 0)


def _standardize(centered: jax.Array, spread: jax.Array, eps: jax.Array) -> jax.Array:
  """centered / (spread + eps), with 0 / 0 = 0.

  The denominator is 0 only for eps = 0 and no spread (std, or MaxRL's mean),
  where the centered values are 0 too.
  """
  denominator = spread + eps
  positive = denominator > 0
  return jnp.where(positive, centered / jnp.where(positive, denominator, 1), 0)


def _group_relative(
    values: jax.Array, valid: jax.Array, *, normalize: bool, eps: float, scaled: bool
) -> jax.Array:
  """(v_i - mean v) [/ (std v + eps)] per group, for values [B, G], valid [B, G].

  ``scaled=False`` only for values bounded well inside the float range (log rewards).
  """

  def one_group(group_values, group_valid):
    scale, inverse_scale = _scale(group_values, group_valid) if scaled else (1.0, 1.0)
    centered, variance, _ = _moments(group_values, group_valid, inverse_scale)
    if not normalize:
      return centered * scale
    # In units of s: (c / s) / (std / s + eps / s).
    return _standardize(centered, _safe_std(variance), eps * inverse_scale)

  return jax.vmap(one_group)(values, valid)


def _nan_where_invalid(
    advantages: jax.Array,
    rewards: jax.Array,
    valid: jax.Array,
    *,
    whole_batch: bool = False,
    outside_domain: jax.Array | None = None,
) -> jax.Array:
  """The module's non-finite rule: NaN on every valid entry of a poisoned group.

  A group is poisoned when one of its valid rewards is NaN or ±inf, or lies
  outside the estimator's domain (``outside_domain`` [B, G] bool); with
  ``whole_batch`` one such reward poisons the batch. Masked entries keep their 0.
  """
  bad = valid & ~jnp.isfinite(rewards)
  if outside_domain is not None:
    bad = bad | (valid & outside_domain)
  poisoned = jnp.any(bad, axis=None if whole_batch else -1, keepdims=True)
  # The masked entries of a poisoned group may hold 0 * NaN: reset them to 0.
  return jnp.where(valid, jnp.where(poisoned, jnp.nan, advantages), 0)


def _log_rewards(rewards: chex.Array, *, floor: float, offset: float) -> jax.Array:
  """L = log(max(R + offset, floor)) in the compute dtype, for R [B, G]."""
  dtype = _compute_dtype(rewards)
  if not np.asarray(floor, dtype) > 0:
    raise ValueError(f"floor must be > 0 and representable in {dtype}, got {floor}.")
  shifted = rewards.astype(dtype) + jnp.asarray(offset, dtype)
  # Clamping above too keeps log finite if R + offset overflows to inf. The log
  # rewards lie in [log floor, log max] (about [-87, 89] in float32), so sums and
  # squares of them cannot overflow and need no scaling.
  return jnp.log(jnp.clip(shifted, floor, jnp.finfo(dtype).max))


@ADVANTAGE_ESTIMATORS.register("gmpo")
def gmpo_advantages(
    rewards: chex.Array,
    mask: chex.Array | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-6,
    floor: float = 1e-8,
    offset: float = 0.0,
) -> jax.Array:
  """Log-reward geometric-mean baseline: A_i = L_i - mean_j L_j, L = log(max(R + offset, floor)).

  From the founding document (§2.2–3.1, "GMPO: Group Relative Optimization with
  Geometric Mean Baseline"): A_i = log(R_i / GM(R)), with GM the geometric mean of
  the group. With ``normalize=True`` the result is divided by the unbiased
  (ddof = 1) standard deviation of L over the group plus ``eps`` (document §3.1).
  The default is ``normalize=False``, the document's core formula (§2.2, §6.1):
  log-ratios are already scale free, and dividing by the std of L would turn an
  order-of-magnitude difference into a fixed ±1 whatever its size. This is not the
  GMPO objective of Zhao et al. 2025 (arXiv 2507.20673), which is a policy loss
  and takes any advantage.

  Example (document §1.2): R = [10, 10, 10, 1000] gives ln 10 · [-.5, -.5, -.5, 1.5]
  and, normalized, [-.5, -.5, -.5, 1.5].

  Rewards must be positive. ``R + offset <= floor`` (zero or negative rewards) is
  clamped to ``floor``, silently: with binary 0/1 rewards the unnormalized result
  is |log floor| · (R_i - p̂), Dr.GRPO scaled by 18.4 for floor = 1e-8, so the floor
  sets the step size; normalized, it equals GRPO up to eps. Reject such rewards on
  the host with ``validate_rewards(..., require_positive=True, offset=offset)``.

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.
    normalize: divide by std_j(L_j) + eps.
    eps: >= 0, added to the standard deviation.
    floor: > 0, smallest value passed to the log.
    offset: added to the rewards before the log (e.g. to make them positive).

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries,
    and exactly 0 for every entry of a group whose valid rewards are all equal
    (including groups with fewer than two valid completions). Finite for every
    finite input; NaN for a group holding a non-finite valid reward.
  """
  valid = _check_inputs(rewards, mask)
  _check_eps(eps)
  log_rewards = _log_rewards(rewards, floor=floor, offset=offset)
  advantages = _group_relative(log_rewards, valid, normalize=normalize, eps=eps, scaled=False)
  return _nan_where_invalid(advantages, rewards, valid)


@ADVANTAGE_ESTIMATORS.register("power_mean")
def power_mean_advantages(
    rewards: chex.Array,
    mask: chex.Array | None = None,
    *,
    p: float,
    normalize: bool = False,
    eps: float = 1e-6,
    floor: float = 1e-8,
    offset: float = 0.0,
) -> jax.Array:
  """Power-mean (Box–Cox) baseline: A_i = L_i - mean_j L_j, L = (R'^p - 1) / p.

  R' = max(R + offset, floor); L = log R' at p = 0, the limit of (R'^p - 1) / p
  (Box & Cox 1964, "An Analysis of Transformations", JRSS B 26(2)). mean_j L_j is
  the p-power mean of the group in Box–Cox units, so the family runs from the
  arithmetic-mean baseline (p = 1: Dr.GRPO, Liu et al. 2025, arXiv 2503.20783;
  normalized, GRPO, Shao et al. 2024, arXiv 2402.03300) through the log-reward
  geometric-mean baseline (p = 0: exactly :func:`gmpo_advantages`, the founding
  document §2.2–3.1) to harmonic-like baselines (p < 0) that weigh the small
  rewards more. With ``normalize=True`` the result is divided by the unbiased
  (ddof = 1) std of L plus ``eps``.

  Continuous in p, with no jump near 0: per group, with c the valid log reward
  that maximizes p · log R', L_i - mean L = e^{pc} (u_i - mean u) where
  u_i = expm1(p (log R'_i - c)) / p. Then p (log R' - c) <= 0, so nothing
  overflows and |u| <= min(1 / |p|, log-range); expm1 keeps full precision as
  p -> 0 (p = 1e-7 agrees with p = 0 to float32 rounding). Only the unnormalized
  result of a group whose true advantages exceed the float range (p · log R'
  beyond ~88 in float32) saturates at the largest float.

  ``R + offset <= floor`` is clamped to ``floor``, silently, as in
  :func:`gmpo_advantages`: for p <= 0 the floor then decides the value (R'^p
  grows without bound as R' -> 0), so reject such rewards on the host with
  ``validate_rewards(..., require_positive=True, offset=offset)``
  (:func:`reward_domain` says 'positive' for p <= 0). For p > 0 the clamp only
  moves zero and negative rewards up to the floor: p = 1 equals Dr.GRPO for
  rewards above the floor.

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.
    p: the power (a finite Python float; p = 0 is the log).
    normalize: divide by std_j(L_j) + eps.
    eps: >= 0, added to the standard deviation.
    floor: > 0, smallest value of R + offset.
    offset: added to the rewards before the transform.

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries,
    exactly 0 for groups whose valid rewards are all equal (including groups with
    fewer than two valid completions); NaN for a group holding a non-finite valid
    reward.
  """
  if not np.isfinite(p):
    raise ValueError(f"p must be a finite number, got {p}.")
  if p == 0:
    return gmpo_advantages(rewards, mask, normalize=normalize, eps=eps, floor=floor, offset=offset)
  valid = _check_inputs(rewards, mask)
  _check_eps(eps)
  log_rewards = _log_rewards(rewards, floor=floor, offset=offset)
  largest = jnp.finfo(log_rewards.dtype).max

  def one_group(x, group_valid):
    # p c: the largest valid p log R'. A constant for autodiff: the advantages are
    # the same function of the rewards for any fixed c.
    pc = jnp.max(jnp.where(group_valid, p * x, -jnp.inf))
    pc = jax.lax.stop_gradient(jnp.where(jnp.isfinite(pc), pc, 0))  # all masked: any c
    u = jnp.expm1(p * x - pc) / p
    centered, variance, _ = _moments(u, group_valid)
    if not normalize:
      # e^{pc} saturates at the largest float instead of overflowing, so that
      # an all-equal group (centered exactly 0) stays 0 rather than 0 * inf.
      return centered * jnp.minimum(jnp.exp(pc), largest)
    # (L_i - mean L) / (std L + eps), with L = e^{pc} u divided through by e^{pc}.
    return _standardize(centered, _safe_std(variance), eps * jnp.minimum(jnp.exp(-pc), largest))

  advantages = jax.vmap(one_group)(log_rewards, valid)
  return _nan_where_invalid(advantages, rewards, valid)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: chex.Array,
    mask: chex.Array | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
  """GRPO: A_i = (R_i - mean_j R_j) / (std_j R_j + eps), std unbiased (ddof = 1).

  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
  Open Language Models", arXiv 2402.03300. ``normalize=True`` is the default because
  it is the published formula (and what verl, TRL and Tunix do; their eps are 1e-6,
  1e-4, 1e-6). ``normalize=False`` is :func:`dr_grpo_advantages`.

  Example: R = [10, 10, 10, 1000] unnormalized gives [-247.5, -247.5, -247.5, 742.5].

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.
    normalize: divide by std_j(R_j) + eps.
    eps: >= 0, added to the standard deviation.

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries
    and exactly 0 for groups whose valid rewards are all equal (including groups
    with fewer than two valid completions). Finite for every finite input, except
    that unnormalized advantages beyond the float range become ±inf; NaN for a
    group holding a non-finite valid reward.
  """
  valid = _check_inputs(rewards, mask)
  _check_eps(eps)
  values = rewards.astype(_compute_dtype(rewards))
  advantages = _group_relative(values, valid, normalize=normalize, eps=eps, scaled=True)
  return _nan_where_invalid(advantages, rewards, valid)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: chex.Array, mask: chex.Array | None = None) -> jax.Array:
  """Dr.GRPO: A_i = R_i - mean_j R_j (no division by the standard deviation).

  Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv 2503.20783. Equal to ``grpo_advantages(..., normalize=False)``.

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.

  Returns:
    [B, G] advantages, as :func:`grpo_advantages`.
  """
  return grpo_advantages(rewards, mask, normalize=False)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: chex.Array, mask: chex.Array | None = None) -> jax.Array:
  """RLOO: A_i = R_i - mean_{j != i, valid} R_j = n / (n - 1) · (R_i - mean_j R_j).

  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", arXiv 2402.14740. n is the group's number
  of valid completions; the leave-one-out mean needs n >= 2.

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries
    and for groups with fewer than two valid completions or all-equal rewards;
    NaN for a group holding a non-finite valid reward.
  """
  valid = _check_inputs(rewards, mask)

  def one_group(group_values, group_valid):
    scale, inverse_scale = _scale(group_values, group_valid)
    centered, _, count = _moments(group_values, group_valid, inverse_scale)
    # For n < 2 the centered values are already 0; the maximum only avoids 0 / 0.
    return centered * scale * (count / jnp.maximum(count - 1, 1))

  advantages = jax.vmap(one_group)(rewards.astype(_compute_dtype(rewards)), valid)
  return _nan_where_invalid(advantages, rewards, valid)


@ADVANTAGE_ESTIMATORS.register("maxrl")
def maxrl_advantages(
    rewards: chex.Array, mask: chex.Array | None = None, *, eps: float = 1e-6
) -> jax.Array:
  """MaxRL: A_i = (R_i - mean_j R_j) / (mean_j R_j + eps), for rewards R >= 0.

  Tajwar, Zeng et al. 2026, "Maximum Likelihood Reinforcement Learning", arXiv
  2602.02710: averaging the score function over the successful samples only is an
  unbiased estimator of a truncation (of order G) of the gradient of
  log P(success), the maximum-likelihood objective; with the group mean as control
  variate this is the GRPO advantage divided by the group's mean reward instead of
  its std. For 0/1 rewards with success rate p̂ it is (R_i - p̂) / p̂: hard prompts
  (small p̂) weigh about 1 / p̂.

  Args:
    rewards: [B, G] float rewards >= 0, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.
    eps: >= 0, added to the mean.

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries,
    exactly 0 for groups whose valid rewards are all equal (a group without a
    success, mean 0, included; also groups with fewer than two valid
    completions); NaN for a group holding a negative or non-finite valid reward
    (the paper's rewards are 0/1; check on the host with
    ``validate_rewards(..., require_non_negative=True)``).
  """
  valid = _check_inputs(rewards, mask)
  _check_eps(eps)
  values = rewards.astype(_compute_dtype(rewards))

  def one_group(group_values, group_valid):
    _, inverse_scale = _scale(group_values, group_valid)
    centered, _, count = _moments(group_values, group_valid, inverse_scale)
    mean = jnp.sum(jnp.where(group_valid, group_values * inverse_scale, 0)) / jnp.maximum(count, 1)
    # In units of s: (c / s) / (mean / s + eps / s); 0 / 0 = 0 for eps = 0 and mean 0.
    return _standardize(centered, mean, eps * inverse_scale)

  advantages = jax.vmap(one_group)(values, valid)
  return _nan_where_invalid(advantages, rewards, valid, outside_domain=values < 0)


@ADVANTAGE_ESTIMATORS.register("batch_std")
def batch_std_advantages(
    rewards: chex.Array, mask: chex.Array | None = None, *, eps: float = 1e-6
) -> jax.Array:
  """Group mean, batch std: A_i = (R_i - mean_group R) / (std_batch R + eps).

  The std is the unbiased (ddof = 1) standard deviation of all valid rewards of the
  batch, not of each group, so that groups of nearly equal rewards are not blown up
  (Liu et al. 2025, "Part I: Tricks or Traps? A Deep Dive into RL for LLM
  Reasoning", arXiv 2508.08221, "group mean, batch std").

  Args:
    rewards: [B, G] float rewards, groups on the last axis.
    mask: optional [B, G] bool, True for valid completions.
    eps: >= 0, added to the standard deviation.

  Returns:
    [B, G] advantages, float32 (float64 for float64 rewards). 0 on masked entries
    and exactly 0 for groups whose valid rewards are all equal (including groups
    with fewer than two valid completions); all zeros if the batch has no spread.
    NaN on every valid entry of the batch if one valid reward is non-finite (the
    batch std is then undefined).
  """
  valid = _check_inputs(rewards, mask)
  _check_eps(eps)
  values = rewards.astype(_compute_dtype(rewards))
  flat_values, flat_valid = values.reshape(-1), valid.reshape(-1)
  # One scale for the batch: the group means and the batch std in the same units.
  _, inverse_scale = _scale(flat_values, flat_valid)
  centered = jax.vmap(lambda v, m: _moments(v, m, inverse_scale)[0])(values, valid)
  # The whole batch is one set for the spread: the same masked two-pass variance.
  _, batch_variance, _ = _moments(flat_values, flat_valid, inverse_scale)
  advantages = _standardize(centered, _safe_std(batch_variance), eps * inverse_scale)
  return _nan_where_invalid(advantages, rewards, valid, whole_batch=True)


ADVANTAGE_ESTIMATORS.freeze()  # read-only from here on


def get_advantage_fn(name: str, **hyperparameters) -> Callable[..., jax.Array]:
  """Looks up an estimator by name and binds its keyword-only hyperparameters.

  Args:
    name: one of ``ADVANTAGE_ESTIMATORS`` ('grpo', 'gmpo', 'dr_grpo', 'rloo',
      'batch_std', 'power_mean', 'maxrl').
    **hyperparameters: keyword-only arguments of that estimator (e.g. ``normalize``,
      ``eps``, ``floor``, ``offset`` for 'gmpo'; 'power_mean' needs ``p``).

  Returns:
    ``fn(rewards [B, G], mask [B, G] | None = None) -> advantages [B, G]``.

  Raises:
    ValueError: unknown name, a hyperparameter the estimator does not take, or a
      missing required one (the message lists the valid ones).
  """
  return ADVANTAGE_ESTIMATORS.bind(name, **hyperparameters)


def reward_domain(name: str, **hyperparameters) -> str:
  """Which rewards an estimator's formula is defined for: 'positive', 'non_negative' or 'real'.

  'positive' (R + offset > 0): the log-reward baseline ('gmpo') and 'power_mean' with
  p <= 0, which clamp anything else to their floor; 'non_negative' (R >= 0): 'maxrl';
  'real': every other estimator. Pass the answer to :func:`validate_rewards` as
  ``require_positive=(domain == 'positive')``,
  ``require_non_negative=(domain == 'non_negative')``.

  Args:
    name: a key of ``ADVANTAGE_ESTIMATORS``.
    **hyperparameters: the estimator's hyperparameters (only ``p`` matters).

  Raises:
    ValueError: as :func:`get_advantage_fn`.
  """
  get_advantage_fn(name, **hyperparameters)  # the registry's own errors
  if name == "gmpo" or (name == "power_mean" and hyperparameters["p"] <= 0):
    return "positive"
  if name == "maxrl":
    return "non_negative"
  return "real"


def host_rewards(
    rewards: npt.ArrayLike, mask: npt.ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Rewards [B, G] and their mask as NumPy arrays, with their shapes and dtypes checked.

  Args:
    rewards: [B, G] real rewards (NumPy or anything ``np.asarray`` takes).
    mask: optional [B, G] bool, True for valid completions; None: all valid.

  Returns:
    (values, valid): the rewards (floating dtype kept; integers become float64) and the
    [B, G] bool mask.

  Raises:
    ValueError: rewards not of rank 2 or not real numbers, or a mask that is not bool of
      the rewards' shape.
  """
  values = np.asarray(rewards)
  if values.ndim != 2:
    raise ValueError(f"rewards must be [B, G] (rank 2), got shape {values.shape}.")
  if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f"rewards must be real numbers, got dtype {values.dtype}.")
  if not np.issubdtype(values.dtype, np.floating):
    values = values.astype(np.float64)
  if mask is None:
    return values, np.ones(values.shape, dtype=bool)
  valid = np.asarray(mask)
  if valid.shape != values.shape or valid.dtype != np.bool_:
    raise ValueError(
        f"mask must be bool with the rewards' shape {values.shape}, "
        f"got {valid.dtype} {valid.shape}."
    )
  return values, valid


def validate_rewards(
    rewards: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    *,
    require_positive: bool,
    require_non_negative: bool = False,
    offset: float = 0.0,
    group_names: Sequence[str] | None = None,
) -> np.ndarray:
  """Host-side value checks of rewards [B, G] before they enter a jitted step.

  Checks only the valid (unmasked) entries: every reward must be finite and, with
  ``require_positive`` (the log-reward baselines), R + offset must be > 0 (positive
  values below the estimator's ``floor`` are still clamped to it); with
  ``require_non_negative`` (MaxRL), R >= 0. :func:`reward_domain` says which an
  estimator needs.

  Args:
    rewards: [B, G] real rewards (NumPy or anything ``np.asarray`` takes).
    mask: optional [B, G] bool, True for valid completions.
    require_positive: also require R + offset > 0 on valid entries.
    require_non_negative: also require R >= 0 on valid entries.
    offset: the offset the estimator will add (used by ``require_positive``).
    group_names: optional B names used in error messages instead of indices.

  Returns:
    The rewards as a NumPy array (floating dtype kept; integers become float64).

  Raises:
    ValueError: wrong shapes, or a failing check; the message names every failing
      group (up to 5) and the offending positions and values.
  """
  values, valid = host_rewards(rewards, mask)
  if group_names is not None and len(group_names) != values.shape[0]:
    raise ValueError(f"group_names has {len(group_names)} names for {values.shape[0]} groups.")

  def describe(group: int) -> str:
    return f"group {group}" + (f" ({group_names[group]!r})" if group_names is not None else "")

  def fail_if_any(bad: np.ndarray, what: str) -> None:
    bad_groups = np.flatnonzero(bad.any(axis=1))
    if bad_groups.size == 0:
      return
    lines = []
    for group in bad_groups[:5]:
      positions = np.flatnonzero(bad[group])
      lines.append(
          f"  {describe(group)}: positions {positions.tolist()}, "
          f"values {values[group, positions].tolist()}"
      )
    more = f"\n  ... and {bad_groups.size - 5} more group(s)" if bad_groups.size > 5 else ""
    raise ValueError(f"{what} in {bad_groups.size} group(s):\n" + "\n".join(lines) + more)

  fail_if_any(valid & ~np.isfinite(values), "Non-finite rewards (NaN or inf)")
  if require_positive:
    fail_if_any(
        valid & (values + offset <= 0),
        f"Rewards with R + offset <= 0 (offset={offset}) cannot enter the "
        "log-reward baseline; pass an offset or use another estimator",
    )
  if require_non_negative:
    fail_if_any(
        valid & (values < 0),
        "Negative rewards cannot enter MaxRL (its advantages divide by the mean "
        "reward); shift the rewards or use another estimator",
    )
  return values
