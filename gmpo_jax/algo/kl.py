"""Per-token KL estimators and the entropy of a categorical distribution.

The KL estimators are the ones of Schulman, "Approximating KL Divergence" (2020),
as used by GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300): with tokens
sampled from pi_theta and x = log pi_ref - log pi_theta,
k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1, all estimating KL(pi_theta || pi_ref).
"""

from typing import Final

import chex
import jax
import jax.numpy as jnp

KL_ESTIMATORS: Final[tuple[str, ...]] = ('k1', 'k2', 'k3')

# Largest log-ratio that enters an exp anywhere in the losses and estimators:
# e^20 ~ 4.9e8 is far beyond any ratio a healthy update produces, and small enough
# that e^20 times an advantage or a batch sum stays finite in float32. Beyond it the
# value is held constant (zero gradient), instead of overflowing to inf and NaN.
MAX_LOG_RATIO: Final[float] = 20.0


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, *, estimator: str) -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

  x = ref_logp - logp;  k1 = -x,  k2 = x^2 / 2,  k3 = exp(x) - x - 1.

  Schulman, "Approximating KL Divergence" (2020); used as the GRPO penalty
  (k3) in Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300.

  k3 is computed as expm1(x) - x, which is >= 0 after rounding as well, with x
  clamped above at MAX_LOG_RATIO = 20 (beyond it the value is held at its value
  at 20 and its gradient is 0, instead of overflowing). k1 is unbiased but can be
  negative per token; k2 and k3 are >= 0.

  Args:
    logp: [B, T] float, log pi_theta of the sampled tokens.
    ref_logp: [B, T] float, log pi_ref of the same tokens.
    estimator: one of 'k1', 'k2', 'k3'.

  Returns:
    [B, T] float32 per-token estimates (masking is left to the caller; padded
    positions must hold finite values, e.g. zeros, or they propagate).

  Raises:
    ValueError: unknown estimator.
  """
  chex.assert_rank([logp, ref_logp], 2)
  chex.assert_equal_shape([logp, ref_logp])
  chex.assert_type([logp, ref_logp], float)
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f'Unknown KL estimator {estimator!r}; valid: {", ".join(KL_ESTIMATORS)}.')
  x = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  if estimator == 'k1':
    return -x
  if estimator == 'k2':
    return 0.5 * jnp.square(x)
  x = jnp.minimum(x, MAX_LOG_RATIO)
  # expm1 avoids the cancellation of exp(x) - 1 for small |x|, which in float32
  # would swamp the O(x^2) value and could make it negative.
  return jnp.expm1(x) - x


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the last axis, reduced in float32.

  H = logsumexp(z) - sum_v softmax(z)_v z_v.

  Stable for logits of any finite magnitude (the max is subtracted first).
  Logits of -inf (masked vocabulary entries) have probability 0 and contribute 0,
  with a finite gradient. A row whose logits are all -inf (no allowed token) has
  entropy 0. NaN or +inf logits are not supported (NaN in, NaN out).

  Args:
    logits: [..., V] float (any float dtype; computed in float32).

  Returns:
    [...] float32 entropies in nats.
  """
  chex.assert_type(logits, float)
  logits = logits.astype(jnp.float32)
  # The entropy does not depend on the shift, so the max carries no gradient.
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  z = logits - shift
  e = jnp.exp(z)
  total = jnp.sum(e, axis=-1)
  has_mass = total > 0
  safe_total = jnp.where(has_mass, total, 1.0)
  p = e / safe_total[..., None]
  # 0 * (-inf) would be NaN (in the value and in the gradient): masked entries
  # have p = 0, so replacing their z by 0 changes nothing else.
  z_finite = jnp.where(jnp.isfinite(z), z, 0.0)
  entropy = jnp.log(safe_total) - jnp.sum(p * z_finite, axis=-1)
  return jnp.where(has_mass, entropy, 0.0)
