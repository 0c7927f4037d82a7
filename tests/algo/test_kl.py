"""Tests for gmpo_jax.algo.kl against float64 NumPy references."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax.algo import kl

_kl_penalty = jax.jit(kl.kl_penalty, static_argnames='estimator')
_entropy = jax.jit(kl.entropy_from_logits)
_entropy_grad = jax.jit(jax.grad(lambda z: jnp.sum(kl.entropy_from_logits(z))))


def _reference_kl(logp, ref_logp, estimator):
  """Schulman (2020) estimators in float64, x = log pi_ref - log pi_theta."""
  x = np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64)
  return {'k1': -x, 'k2': 0.5 * x**2, 'k3': np.exp(x) - x - 1.0}[estimator]


def _reference_entropy(logits):
  """-sum p log p in float64 over the entries with p > 0; 0 for an empty row."""
  z = np.asarray(logits, np.float64)
  shift = np.max(z, axis=-1, keepdims=True)
  shift = np.where(np.isfinite(shift), shift, 0.0)
  e = np.exp(z - shift)
  total = e.sum(axis=-1, keepdims=True)
  p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
  log_p = np.log(p, out=np.full_like(p, 0.0), where=p > 0)
  return -np.sum(p * log_p, axis=-1)


@pytest.mark.parametrize('use_jit', [True, False])
@pytest.mark.parametrize('estimator', ['k1', 'k2', 'k3'])
def test_kl_penalty_matches_reference(estimator, use_jit):
  rng = np.random.default_rng(0)
  logp = rng.normal(-2.0, 1.0, size=(3, 7)).astype(np.float32)
  ref_logp = (logp + rng.normal(0.0, 0.8, size=logp.shape)).astype(np.float32)
  fn = _kl_penalty if use_jit else kl.kl_penalty
  got = fn(jnp.asarray(logp), jnp.asarray(ref_logp), estimator=estimator)
  assert got.dtype == jnp.float32 and got.shape == logp.shape
  np.testing.assert_allclose(got, _reference_kl(logp, ref_logp, estimator), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('estimator', ['k1', 'k2', 'k3'])
def test_kl_penalty_gradient_matches_reference(estimator):
  # d/dlogp: k1 -> 1, k2 -> -x, k3 -> 1 - exp(x), with x = ref_logp - logp.
  rng = np.random.default_rng(1)
  logp = rng.normal(-2.0, 1.0, size=(2, 5)).astype(np.float32)
  ref_logp = (logp + rng.normal(0.0, 0.8, size=logp.shape)).astype(np.float32)
  grad = jax.grad(
      lambda lp: jnp.sum(kl.kl_penalty(lp, jnp.asarray(ref_logp), estimator=estimator))
  )(jnp.asarray(logp))
  x = ref_logp.astype(np.float64) - logp
  expected = {'k1': np.ones_like(x), 'k2': -x, 'k3': 1.0 - np.exp(x)}[estimator]
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    scale=st.sampled_from([1e-7, 1e-5, 1e-3, 1e-1, 1.0, 30.0]), seed=st.integers(0, 2**31 - 1)
)
def test_k3_is_nonnegative_and_accurate_for_any_scale(scale, seed):
  # exp(x) - x - 1 in float32 cancels to noise (possibly < 0) for small |x|.
  rng = np.random.default_rng(seed)
  logp = rng.normal(-3.0, 1.0, size=(4, 16)).astype(np.float32)
  delta = (scale * rng.standard_normal(logp.shape)).astype(np.float32)
  ref_logp = (logp + delta).astype(np.float32)
  got = np.asarray(_kl_penalty(jnp.asarray(logp), jnp.asarray(ref_logp), estimator='k3'))
  assert np.all(got >= 0)
  # The float32 difference x is the input of the estimator; from there, the
  # only float32 error left is rounding of expm1(x) and x, a few ulps of |x|.
  x = np.minimum((ref_logp - logp).astype(np.float64), kl.MAX_LOG_RATIO)
  expected = np.expm1(x) - x
  tolerance = 1e-5 * expected + 4 * np.finfo(np.float32).eps * np.abs(x)
  assert np.all(np.abs(got - expected) <= tolerance)


def test_k3_clamps_huge_log_ratio_and_stays_finite():
  logp = jnp.asarray([[0.0, 0.0, -1e3]], jnp.float32)
  ref_logp = jnp.asarray([[-1e3, 1e3, 0.0]], jnp.float32)
  value, grad = jax.value_and_grad(lambda lp: jnp.sum(kl.kl_penalty(lp, ref_logp, estimator='k3')))(
      logp
  )
  per_token = kl.kl_penalty(logp, ref_logp, estimator='k3')
  cap = kl.MAX_LOG_RATIO
  # x = -1e3 needs no clamp (exp underflows to 0); x = +1e3 is held at x = 20.
  np.testing.assert_allclose(
      per_token, [[1e3 - 1.0, np.expm1(cap) - cap, np.expm1(cap) - cap]], rtol=1e-6
  )
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, [[1.0, 0.0, 0.0]])


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
def test_unbiased_estimators_average_to_true_kl(estimator):
  # Monte Carlo over tokens sampled from pi_theta: E[k1] = E[k3] = KL(p || q).
  rng = np.random.default_rng(2)
  p = rng.dirichlet(np.ones(6))
  q = rng.dirichlet(np.ones(6))
  true_kl = np.sum(p * np.log(p / q))
  tokens = rng.choice(6, size=(1, 200_000), p=p)
  estimates = np.asarray(
      kl.kl_penalty(
          jnp.asarray(np.log(p)[tokens], jnp.float32),
          jnp.asarray(np.log(q)[tokens], jnp.float32),
          estimator=estimator,
      ),
      np.float64,
  )
  standard_error = estimates.std() / np.sqrt(estimates.size)
  assert abs(estimates.mean() - true_kl) < 5 * standard_error


def test_kl_penalty_rejects_unknown_estimator():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='k1, k2, k3'):
    kl.kl_penalty(x, x, estimator='k4')


@pytest.mark.parametrize('use_jit', [True, False])
def test_entropy_matches_reference_for_huge_and_masked_logits(use_jit):
  rng = np.random.default_rng(3)
  logits = rng.normal(0.0, 3.0, size=(2, 3, 11)).astype(np.float32)
  logits[0, 0] *= 1e4  # naive softmax overflows in float32
  logits[0, 1] += 1e30  # shift far beyond exp's range; entropy unchanged
  logits[1, 0, ::2] = -np.inf  # masked vocabulary entries
  logits[1, 1, 1:] = -np.inf  # a single allowed token: entropy 0
  logits[1, 2, :] = -np.inf  # no allowed token: documented 0
  fn = _entropy if use_jit else kl.entropy_from_logits
  got = fn(jnp.asarray(logits))
  assert got.dtype == jnp.float32 and got.shape == (2, 3)
  expected = _reference_entropy(logits)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert expected[1, 1] == 0 and expected[1, 2] == 0
  assert expected[0, 2] > 0.1  # the reference is not trivially zero


def test_entropy_of_bfloat16_logits_is_reduced_in_float32():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(0.0, 2.0, size=(4, 64)), jnp.bfloat16)
  got = kl.entropy_from_logits(logits)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference_entropy(np.asarray(logits, np.float32)), rtol=1e-5)


def test_entropy_gradient_matches_reference_and_is_finite_with_masks():
  # dH/dz_v = -p_v (log p_v + H); masked entries (p = 0) get 0.
  rng = np.random.default_rng(5)
  logits = rng.normal(0.0, 2.0, size=(3, 9)).astype(np.float32)
  logits[1, ::3] = -np.inf
  logits[2, :] = -np.inf
  grad = np.asarray(_entropy_grad(jnp.asarray(logits)))
  z = logits[:2].astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  log_p = np.log(p, out=np.zeros_like(p), where=p > 0)
  entropy = -np.sum(p * log_p, -1, keepdims=True)
  expected = -p * (log_p + entropy)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[:2], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grad[2], 0.0)
  assert np.abs(expected).max() > 1e-2
