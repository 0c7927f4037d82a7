"""`importance.correction_weights` against a float64 NumPy reference of the four weightings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax.algo import importance

B, T = 6, 7
CAP = 1.5
_weights = jax.jit(importance.correction_weights, static_argnames=("mode", "cap"))


def _reference(prox, behav, mask, mode, cap):
  """(weights [B, T], (mean, max, masked fraction)) in float64, from the ratios themselves:
  the sequence weight is the product form of the geometric mean, (prod_t w_t)^(1/|o|)."""
  weights = np.zeros(mask.shape)
  dropped = np.zeros(mask.shape, bool)
  for i, valid in enumerate(mask):
    if not valid.any():
      continue
    ratio = np.exp(prox[i, valid] - behav[i, valid])
    if mode.startswith("sequence"):
      ratio = np.full(ratio.shape, np.prod(ratio) ** (1.0 / ratio.size))
    if mode.endswith("tis"):
      weights[i, valid] = np.minimum(ratio, cap)
    else:
      kept = (1.0 / cap <= ratio) & (ratio <= cap)
      weights[i, valid] = kept
      dropped[i, valid] = ~kept
  return weights, (weights[mask].mean(), weights[mask].max(), dropped[mask].mean())


def _inputs(seed):
  """Random log-probs, right-padded rows with holes, one empty row, NaN on the padding."""
  rng = np.random.default_rng(seed)
  mask = np.arange(T) < rng.integers(2, T + 1, size=(B, 1))
  mask &= rng.random((B, T)) > 0.15
  mask[:, 0] = True
  mask[3] = False
  behav = rng.normal(-2.0, 0.5, (B, T))
  prox = behav + rng.normal(0.0, 0.5, (B, 1)) + rng.normal(0.0, 0.5, (B, T))
  prox[~mask] = np.nan
  behav[~mask] = np.nan
  return prox.astype(np.float32), behav.astype(np.float32), mask


@pytest.mark.parametrize("mode", importance.IS_CORRECTIONS)
def test_weights_and_statistics_match_the_reference(mode):
  prox, behav, mask = _inputs(seed=importance.IS_CORRECTIONS.index(mode))
  weights, stats = _weights(
      jnp.asarray(prox), jnp.asarray(behav), jnp.asarray(mask), mode=mode, cap=CAP
  )
  want, want_stats = _reference(prox.astype(np.float64), behav.astype(np.float64), mask, mode, CAP)
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, want, rtol=1e-5, atol=0)
  np.testing.assert_allclose(stats, want_stats, rtol=1e-5)
  valid = want[mask]
  # The cap (or the mask) binds on some tokens and not on others.
  if mode.endswith("tis"):
    assert np.any(valid == CAP) and np.any(valid < CAP) and stats.masked_fraction == 0
  else:
    assert np.any(valid == 0) and np.any(valid == 1) and 0 < stats.masked_fraction < 1
  if mode.startswith("sequence"):  # exactly one weight per sequence
    for row, valid_row in zip(np.asarray(weights), mask):
      assert not valid_row.any() or np.ptp(row[valid_row]) == 0


def test_weights_are_one_on_policy_and_carry_no_gradient():
  prox, _, mask = _inputs(seed=7)
  for mode in ("token_tis", "sequence_mask"):
    weights, stats = _weights(
        jnp.asarray(prox), jnp.asarray(prox), jnp.asarray(mask), mode=mode, cap=CAP
    )
    np.testing.assert_array_equal(weights, mask.astype(np.float32))
    assert stats == (1.0, 1.0, 0.0)
  grad = jax.grad(
      lambda p: jnp.sum(
          importance.correction_weights(
              p, jnp.zeros((B, T)), jnp.asarray(mask), mode="token_tis", cap=CAP
          )[0]
      )
  )(jnp.zeros((B, T)))
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("mode", importance.IS_CORRECTIONS)
def test_non_finite_valid_log_prob_gives_nan_never_a_silent_weight(mode):
  prox, behav, mask = _inputs(seed=11)
  behav[0, 0] = -np.inf  # a valid token
  weights, stats = _weights(
      jnp.asarray(prox), jnp.asarray(behav), jnp.asarray(mask), mode=mode, cap=CAP
  )
  weights = np.asarray(weights)
  nan_tokens = mask & (np.arange(B)[:, None] == 0)
  if mode.startswith("token"):
    nan_tokens &= np.arange(T)[None] == 0
  np.testing.assert_array_equal(np.isnan(weights), nan_tokens)
  assert np.isnan(stats.weight_mean) and np.isnan(stats.weight_max)
  # Huge finite ratios are capped or masked, not NaN.
  weights, _ = _weights(
      jnp.asarray(prox),
      jnp.asarray(np.where(mask, -1e30, 0.0)),
      jnp.asarray(mask),
      mode=mode,
      cap=CAP,
  )
  np.testing.assert_array_equal(weights, np.where(mask, CAP if mode.endswith("tis") else 0, 0))


def test_all_masked_rows_give_zero_weights_and_finite_statistics():
  nan = jnp.full((2, 3), jnp.nan)
  for mode in importance.IS_CORRECTIONS:
    weights, stats = _weights(nan, nan, jnp.zeros((2, 3), bool), mode=mode, cap=CAP)
    np.testing.assert_array_equal(weights, 0.0)
    assert stats == (1.0, 1.0, 0.0), mode


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="none", cap=2.0), "Unknown importance correction"),
        (dict(mode="token_tis", cap=1.0), "cap must be > 1"),
    ],
)
def test_bad_options_are_errors(kwargs, message):
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match=message):
    importance.correction_weights(x, x, x > -1, **kwargs)
