"""Tests for gmpo_jax.algo.losses against float64 NumPy references written from the papers.

The references below follow the published formulas directly (GMPO as the product
form sgn(A) prod_t |min(rho_t A, clip(rho_t, e^-eps_low, e^eps_high) A)|^(1/|o|),
its power means as sgn(A) M_p(|min(rho_t A, clip(rho_t, ...) A)|) with
M_p(x) = (mean_t x_t^p)^(1/p), GMPO's sequence-level clip on prod_t rho_t, GSPO
with s = (prod_t rho_t)^(1/|o|)), not the log-space code under test.
Gradients are compared with central finite differences of these references.
Shapes are tiny and the jitted functions are shared across tests to keep the
compile count (the dominant cost) low.
"""

import functools
import inspect

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax.algo import aggregation, losses

B, T = 8, 8
MODES = aggregation.AGGREGATION_MODES
MAX_LENGTH = 12  # seq-mean-token-sum-norm divisor, != T so that a default of T shows

# name -> (objective, hyperparameters, std of delta). Asymmetric epsilons catch
# swapped sides; the *_unclipped cases have clip ranges that never bind.
CASES = {
    'grpo': ('token_clip', dict(epsilon_low=0.2, epsilon_high=0.2), 0.3),
    'dapo_dual_clip': ('token_clip', dict(epsilon_low=0.2, epsilon_high=0.28, dual_clip=1.5), 0.4),
    'gmpo_token': ('geometric', dict(epsilon_low=0.3, epsilon_high=0.2), 0.4),
    'gmpo_sequence': (
        'geometric',
        dict(epsilon_low=0.3, epsilon_high=0.4, clip_mode='sequence'),
        0.4,
    ),
    'gmpo_sequence_mean': (
        'geometric',
        dict(epsilon_low=0.1, epsilon_high=0.15, clip_mode='sequence_mean'),
        0.4,
    ),
    'gmpo_none': ('geometric', dict(clip_mode='none'), 0.4),
    'gmpo_token_unclipped': ('geometric', dict(epsilon_low=np.inf, epsilon_high=np.inf), 0.4),
    'gspo': ('gspo', dict(epsilon_low=0.05, epsilon_high=0.08), 0.3),
    'gspo_paper_range': ('gspo', dict(), 1e-3),
    'gspo_unclipped': ('gspo', dict(epsilon_low=1.0, epsilon_high=np.inf), 0.4),
    'pmpo_arithmetic': ('power_mean', dict(p=1.0, epsilon_low=0.3, epsilon_high=0.2), 0.4),
    'pmpo_harmonic': ('power_mean', dict(p=-1.0, epsilon_low=0.2, epsilon_high=0.3), 0.4),
    'pmpo_sequence': (
        'power_mean',
        dict(p=0.5, epsilon_low=0.3, epsilon_high=0.4, clip_mode='sequence'),
        0.4,
    ),
    # |p delta| up to ~200: e^(p delta) overflows float32, not the log-space code.
    'pmpo_steep': ('power_mean', dict(p=-30.0, epsilon_low=0.5, epsilon_high=0.5), 2.0),
}
# One case per registered objective, for the checks that must cover all of them.
OBJECTIVE_CASES = {
    'token_clip': 'grpo',
    'geometric': 'gmpo_token',
    'gspo': 'gspo',
    'power_mean': 'pmpo_harmonic',
}
# pmpo_steep is left out: at p = -30 the gradient weights rho_t^p / sum_s rho_s^p of
# unclipped tokens underflow to exactly 0, which the exact-zero check cannot tell apart.
CLIPPING_CASES = [
    c
    for c in CASES
    if c not in ('gmpo_none', 'gmpo_token_unclipped', 'gspo_unclipped', 'pmpo_steep')
]


def _evaluate_eager(
    case,
    logp,
    old_logp,
    advantages,
    mask,
    ref_logp,
    *,
    beta=0.0,
    kl_estimator='k3',
    num_sequences=None,
    num_tokens=None,
    token_weights=None,
):
  """((loss, extras), d loss / d logp) of one case in every aggregation mode."""
  objective, hp, _ = CASES[case]
  value_and_grad = jax.value_and_grad(losses.POLICY_LOSSES[objective], has_aux=True)
  return {
      mode: value_and_grad(
          logp,
          old_logp,
          advantages,
          mask,
          ref_logp=ref_logp,
          beta=beta,
          kl_estimator=kl_estimator,
          loss_agg_mode=mode,
          max_length=MAX_LENGTH if mode == 'seq-mean-token-sum-norm' else None,
          num_sequences=num_sequences,
          num_tokens=num_tokens,
          token_weights=token_weights,
          **hp,
      )
      for mode in MODES
  }


# One compile per (case, beta, estimator, shape), shared by all tests. Compiling
# dominates the test time; LLVM's -O0 halves it and changes no result checked here.
_evaluate = jax.jit(
    _evaluate_eager,
    static_argnames=('case', 'beta', 'kl_estimator'),
    compiler_options={'xla_backend_optimization_level': 0},
)
_aggregate = jax.jit(aggregation.aggregate_loss, static_argnames=('mode', 'max_length'))


# ----------------------------------------------------------------- references


def _gm(x):
  """Geometric mean, the product form of the papers."""
  return np.prod(x) ** (1.0 / x.size)


def _power_mean(x, p):
  """M_p(x) = (mean x^p)^(1/p); the geometric mean at p = 0."""
  return _gm(x) if p == 0 else np.mean(x**p) ** (1.0 / p)


def _one_sided(ratio, adv, low, high):
  """The PPO-side clip of a ratio: min(r, clip(r)) for A > 0, max(...) for A < 0."""
  bounded = np.clip(ratio, low, high)
  return np.minimum(ratio, bounded) if adv > 0 else np.maximum(ratio, bounded)


def _reference_per_token(objective, logp, old_logp, advantages, mask, hp):
  """[B, T] float64 policy loss per token; 0 on padding."""
  per_token = np.zeros(logp.shape)
  for i, adv in enumerate(advantages):
    valid = mask[i]
    if not valid.any():
      continue
    rho = np.exp(logp[i, valid] - old_logp[i, valid])
    if objective == 'token_clip':
      low, high = 1 - hp['epsilon_low'], 1 + hp['epsilon_high']
      loss = -np.minimum(rho * adv, np.clip(rho, low, high) * adv)
      if hp.get('dual_clip') is not None and adv < 0:
        loss = np.minimum(loss, hp['dual_clip'] * abs(adv))
    elif objective in ('geometric', 'power_mean'):
      p, mode = hp.get('p', 0.0), hp.get('clip_mode', 'token')
      low = np.exp(-hp.get('epsilon_low', 0.4))
      high = np.exp(hp.get('epsilon_high', 0.4))
      if mode == 'token':
        terms = np.minimum(rho * adv, np.clip(rho, low, high) * adv)
        loss = -np.sign(adv) * _power_mean(np.abs(terms), p)
      elif mode == 'sequence':
        # The paper's ablation: clip the product (for p != 0, M_p^|o|), then the root.
        n = rho.size
        loss = -adv * _one_sided(_power_mean(rho, p) ** n, adv, low, high) ** (1 / n)
      elif mode == 'sequence_mean':
        mean = _power_mean(rho, p)
        loss = -np.minimum(mean * adv, np.clip(mean, low, high) * adv)
      else:
        loss = -adv * _power_mean(rho, p)
    else:
      low = 1 - hp.get('epsilon_low', 3e-4)
      high = 1 + hp.get('epsilon_high', 4e-4)
      s = _gm(rho)
      loss = -min(s * adv, np.clip(s, low, high) * adv)
    per_token[i, valid] = loss
  return per_token


def _reference_kl(logp, ref_logp, estimator):
  x = ref_logp - logp
  return {'k1': -x, 'k2': 0.5 * x**2, 'k3': np.exp(x) - x - 1}[estimator]


def _reference_aggregate(
    per_token, mask, mode, max_length=None, num_sequences=None, num_tokens=None
):
  lengths = mask.sum(-1)
  sums = np.array([per_token[i, mask[i]].sum() for i in range(len(mask))])
  if mode == 'token-mean':
    return sums.sum() / (lengths.sum() if num_tokens is None else num_tokens)
  if mode == 'seq-mean-token-mean':
    per_sequence = [s / n for s, n in zip(sums, lengths) if n > 0]
  elif mode == 'seq-mean-token-sum':
    per_sequence = sums
  else:
    per_sequence = sums / max_length
  count = (lengths > 0).sum() if num_sequences is None else num_sequences
  return np.sum(per_sequence) / count


def _reference_loss(
    objective,
    logp,
    old_logp,
    advantages,
    mask,
    hp,
    *,
    loss_agg_mode,
    ref_logp=None,
    beta=0.0,
    kl_estimator='k3',
    weights=None,
    **counts,
):
  per_token = _reference_per_token(objective, logp, old_logp, advantages, mask, hp)
  if beta > 0:
    per_token = per_token + beta * np.where(mask, _reference_kl(logp, ref_logp, kl_estimator), 0.0)
  if weights is not None:  # each valid token's loss scaled; the counts unchanged
    per_token = np.where(mask, weights * per_token, 0.0)
  return _reference_aggregate(per_token, mask, loss_agg_mode, **counts)


def _reference_clipped(objective, logp, old_logp, advantages, mask, hp):
  """(low, high) [B, T] bool: valid tokens whose gradient the clip removes."""
  low = np.zeros(mask.shape, bool)
  high = np.zeros(mask.shape, bool)
  for i, adv in enumerate(advantages):
    valid = mask[i]
    if not valid.any():
      continue
    rho = np.exp(logp[i, valid] - old_logp[i, valid])
    if objective == 'token_clip':
      high[i, valid] = ((adv > 0) & (rho > 1 + hp['epsilon_high'])) | (
          (adv < 0) & (rho > (hp.get('dual_clip') or np.inf))
      )
      low[i, valid] = (adv < 0) & (rho < 1 - hp['epsilon_low'])
      continue
    if objective in ('geometric', 'power_mean'):
      p, mode = hp.get('p', 0.0), hp.get('clip_mode', 'token')
      if mode == 'none':
        continue
      ratio = {
          'token': rho,
          'sequence': _power_mean(rho, p) ** rho.size,
          'sequence_mean': _power_mean(rho, p),
      }[mode]
      bounds = np.exp(-hp['epsilon_low']), np.exp(hp['epsilon_high'])
    else:
      ratio = _gm(rho)
      bounds = 1 - hp.get('epsilon_low', 3e-4), 1 + hp.get('epsilon_high', 4e-4)
    high[i, valid] = (adv > 0) & (ratio > bounds[1])
    low[i, valid] = (adv < 0) & (ratio < bounds[0])
  return low, high


def _reference_extras(objective, logp, old_logp, advantages, mask, hp, ref_logp, kl_estimator):
  low, high = _reference_clipped(objective, logp, old_logp, advantages, mask, hp)
  rho = np.exp(logp[mask] - old_logp[mask])
  nonempty = mask.any(-1)
  fully = [(low[i] | high[i])[mask[i]].all() for i in np.flatnonzero(nonempty)]
  return aggregation.LossExtras(
      clip_fraction_low=low.sum() / mask.sum(),
      clip_fraction_high=high.sum() / mask.sum(),
      ratio_min=rho.min(),
      ratio_mean=rho.mean(),
      ratio_max=rho.max(),
      approx_kl=np.mean(rho - 1 - np.log(rho)),
      fully_clipped_fraction=np.mean(fully),
      kl=_reference_kl(logp, ref_logp, kl_estimator)[mask].mean(),
  )


def _finite_difference_grad(f, logp, mask, h=1e-6):
  grad = np.zeros(logp.shape)
  for index in zip(*np.nonzero(mask)):
    up, down = logp.copy(), logp.copy()
    up[index] += h
    down[index] -= h
    grad[index] = (f(up) - f(down)) / (2 * h)
  return grad


# ---------------------------------------------------------------------- inputs


def _row_log_power_mean(d, mask, p, *, times_length=False):
  """[B] float64 log M_p(e^d) over each row's valid d (times |o| if asked)."""
  out = np.zeros(len(mask))
  for i, valid in enumerate(mask):
    if valid.any():
      x = d[i, valid]
      out[i] = x.mean() if p == 0 else np.log(np.mean(np.exp(p * x))) / p
      out[i] *= x.size if times_length else 1
  return out


def _kinks(objective, hp):
  """(level, log-space points where the loss has a kink, row statistic) of a case.

  Token-level kinks are in delta; row-level ones in a per-row statistic of delta.
  """
  if np.isinf(hp.get('epsilon_high', 0.0)):
    return 'none', (), None
  if objective == 'token_clip':
    points = [np.log(1 + hp['epsilon_high']), np.log(1 - hp['epsilon_low'])]
    if hp.get('dual_clip'):
      points.append(np.log(hp['dual_clip']))
    return 'token', points, None
  if objective in ('geometric', 'power_mean'):
    mode = hp.get('clip_mode', 'token')
    points = [hp.get('epsilon_high', 0.4), -hp.get('epsilon_low', 0.4)]
    if mode in ('token', 'none'):
      return mode, points, None
    return (
        'row',
        points,
        functools.partial(_row_log_power_mean, p=hp.get('p', 0.0), times_length=mode == 'sequence'),
    )
  return (
      'row',
      [np.log(1 + hp.get('epsilon_high', 4e-4)), np.log(1 - hp.get('epsilon_low', 3e-4))],
      functools.partial(_row_log_power_mean, p=0.0),
  )


def _make_batch(seed, *, scale=0.4, kinks=('none', (), None), margin=5e-5):
  """Random float32 [B, T] inputs with padding: right-padded random lengths,
  holes, one fully masked row, NaN in every padded position, A of both signs,
  and log-ratios at least `margin` away from the loss's kinks (for finite
  differences)."""
  rng = np.random.default_rng(seed)
  mask = np.arange(T) < rng.integers(1, T + 1, size=(B, 1))
  mask &= rng.random((B, T)) > 0.15
  mask[:2, 0] = True
  mask[rng.integers(2, B)] = False
  old_logp = rng.normal(-1.5, 0.5, size=(B, T)).astype(np.float32)
  delta = rng.normal(0.0, scale, size=(B, T))
  level, points, statistic = kinks
  for _ in range(1000):
    logp = (old_logp + delta).astype(np.float32)
    d = logp.astype(np.float64) - old_logp
    if level == 'token':
      near = np.any([np.abs(d - p) < margin for p in points], axis=0) & mask
    elif level == 'row':
      value = statistic(d, mask)
      near_rows = np.any([np.abs(value - p) < margin for p in points], axis=0)
      near = near_rows[:, None] & mask
    else:
      break
    if not near.any():
      break
    delta = np.where(near, rng.normal(0.0, scale, size=delta.shape), delta)
  else:
    raise AssertionError('could not draw inputs away from the kinks')
  ref_logp = (logp + rng.normal(0.0, 0.3, size=logp.shape)).astype(np.float32)
  advantages = rng.normal(0.0, 1.0, size=B).astype(np.float32)
  advantages[0], advantages[1] = abs(advantages[0]) + 0.1, -abs(advantages[1]) - 0.1
  for array in (logp, old_logp, ref_logp):
    array[~mask] = np.nan
  return logp, old_logp, advantages, mask, ref_logp


def _case_batch(case, seed):
  objective, hp, scale = CASES[case]
  return _make_batch(seed, scale=scale, kinks=_kinks(objective, hp))


def _f64(x):
  return np.asarray(x, np.float64)


def _check_against_reference(case, batch, results, *, beta=0.0, kl_estimator='k3', weights=None):
  """Loss (all modes), gradient (finite differences) and extras vs float64."""
  objective, hp, _ = CASES[case]
  logp, old_logp, advantages, mask, ref_logp = (_f64(x) if x.dtype != bool else x for x in batch)
  for mode, ((loss, extras), grad) in results.items():
    length = {'max_length': MAX_LENGTH} if mode == 'seq-mean-token-sum-norm' else {}

    def reference(lp, mode=mode, length=length):
      return _reference_loss(
          objective,
          lp,
          old_logp,
          advantages,
          mask,
          hp,
          loss_agg_mode=mode,
          ref_logp=ref_logp,
          beta=beta,
          kl_estimator=kl_estimator,
          weights=weights,
          **length,
      )

    expected_grad = _finite_difference_grad(reference, logp, mask)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, reference(logp), rtol=2e-5, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6, err_msg=mode)
    assert np.abs(expected_grad).max() > 1e-3, mode  # not trivially zero
  expected_extras = _reference_extras(
      objective, logp, old_logp, advantages, mask, hp, ref_logp, kl_estimator
  )
  for name, got, want in zip(aggregation.LossExtras._fields, extras, expected_extras):
    assert got.dtype == jnp.float32 and got.shape == (), name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize('case', CASES)
def test_objective_loss_gradient_and_extras_match_reference(case):
  batch = _case_batch(case, seed=list(CASES).index(case))
  _check_against_reference(case, batch, _evaluate(case, *map(jnp.asarray, batch)))


@pytest.mark.parametrize('case', CASES)
def test_without_jit_matches_jit(case):
  objective, hp, _ = CASES[case]
  batch = [jnp.asarray(x) for x in _case_batch(case, seed=200)]
  fn = losses.POLICY_LOSSES[objective]
  mode = inspect.signature(fn).parameters['loss_agg_mode'].default
  (loss, extras), grad = jax.value_and_grad(fn, has_aux=True)(
      *batch[:4], ref_logp=batch[4], loss_agg_mode=mode, **hp
  )
  (want_loss, want_extras), want_grad = _evaluate(case, *batch)[mode]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)
  for got, want in zip(extras, want_extras):
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    'case, estimator', [('dapo_dual_clip', 'k1'), ('gmpo_token', 'k2'), ('gspo', 'k3')]
)
def test_kl_penalty_is_added_per_token_before_aggregation(case, estimator):
  batch = _case_batch(case, seed=300)
  results = _evaluate(case, *map(jnp.asarray, batch), beta=0.1, kl_estimator=estimator)
  _check_against_reference(case, batch, results, beta=0.1, kl_estimator=estimator)


# A token-level and two sequence-level objectives, each with the KL estimator its
# unweighted run above already compiled.
WEIGHTED_CASES = [('dapo_dual_clip', 'k1'), ('gmpo_token', 'k2'), ('gspo', 'k3')]


def _token_weights(seed, mask):
  """Importance-like weights in [0, 2], a fifth of them 0, NaN on padding."""
  rng = np.random.default_rng(seed)
  weights = rng.uniform(0.0, 2.0, size=mask.shape).astype(np.float32)
  weights[rng.random(mask.shape) < 0.2] = 0.0
  weights[~mask] = np.nan
  return weights


@pytest.mark.parametrize('case, estimator', WEIGHTED_CASES)
def test_token_weights_scale_each_tokens_loss_and_kl(case, estimator):
  # Constant weights: the loss is the aggregate of w_t (l_t + beta KL_t) with the
  # counts of the unweighted batch, and its gradient (checked by finite
  # differences) is the weighted per-token gradient.
  batch = _case_batch(case, seed=300)
  weights = _token_weights(301, batch[3])
  results = _evaluate(
      case,
      *map(jnp.asarray, batch),
      beta=0.1,
      kl_estimator=estimator,
      token_weights=jnp.asarray(weights),
  )
  _check_against_reference(
      case, batch, results, beta=0.1, kl_estimator=estimator, weights=_f64(weights)
  )
  zero = (weights == 0) & batch[3]
  # A token objective's token of weight 0 trains nothing; in a sequence objective
  # it still enters l_i, of which only its own copy is dropped.
  token_level = CASES[case][0] == 'token_clip'
  for mode, (_, grad) in results.items():
    assert np.all(np.asarray(grad)[zero] == 0) == token_level, mode


@pytest.mark.parametrize('case, estimator', WEIGHTED_CASES)
def test_all_ones_token_weights_give_exactly_the_unweighted_loss(case, estimator):
  batch = [jnp.asarray(x) for x in _case_batch(case, seed=300)]
  plain = _evaluate(case, *batch, beta=0.1, kl_estimator=estimator)
  ones = _evaluate(
      case, *batch, beta=0.1, kl_estimator=estimator, token_weights=jnp.ones((B, T), jnp.float32)
  )
  for mode in MODES:
    for got, want in zip(jax.tree.leaves(ones[mode]), jax.tree.leaves(plain[mode])):
      np.testing.assert_array_equal(got, want, err_msg=mode)


@pytest.mark.parametrize('use_jit', [True, False])
@pytest.mark.parametrize('mode', MODES)
def test_aggregate_loss_matches_reference(mode, use_jit):
  rng = np.random.default_rng(11)
  *_, mask, _ = _make_batch(12)
  per_token = rng.normal(size=mask.shape).astype(np.float32)
  per_token[~mask] = np.nan
  fn = _aggregate if use_jit else aggregation.aggregate_loss
  options = [{}, {'num_sequences': 5.0, 'num_tokens': 40.0}]
  if mode == 'seq-mean-token-sum-norm':  # max_length is required
    options = [{'max_length': 20}, {'max_length': 7, 'num_sequences': 5.0}]
  for kwargs in options:
    got = fn(jnp.asarray(per_token), jnp.asarray(mask), mode=mode, **kwargs)
    expected = _reference_aggregate(_f64(per_token), mask, mode, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=str(kwargs))
  # A float mask means the same as a bool one.
  np.testing.assert_allclose(
      fn(jnp.asarray(per_token), jnp.asarray(mask, jnp.float32), mode=mode, **kwargs),
      fn(jnp.asarray(per_token), jnp.asarray(mask), mode=mode, **kwargs),
      rtol=1e-6,
  )


@pytest.mark.parametrize('mode', MODES)
def test_aggregate_loss_of_all_masked_batch_is_zero(mode):
  per_token = jnp.full((2, 3), jnp.nan)
  mask = jnp.zeros((2, 3), bool)
  length = {'max_length': 4} if mode == 'seq-mean-token-sum-norm' else {}
  value, grad = jax.value_and_grad(
      lambda x: aggregation.aggregate_loss(x, mask, mode=mode, **length)
  )(per_token)
  assert value == 0
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('case', ['grpo', 'gmpo_token', 'gmpo_sequence', 'gspo', 'pmpo_harmonic'])
def test_micro_batches_with_global_counts_sum_to_full_batch(case):
  """Gradient accumulation: losses add up, and the gradient of each micro-batch
  is the full-batch gradient of its rows (so parameter gradients add up too)."""
  batch = [jnp.asarray(x) for x in _case_batch(case, seed=21)]
  mask = np.asarray(batch[3])
  full = _evaluate(case, *batch)
  counts = dict(num_sequences=jnp.float32(mask.any(-1).sum()), num_tokens=jnp.float32(mask.sum()))
  for num_micro in (1, 2, 4):
    parts = [
        _evaluate(case, *(x[rows] for x in batch), **counts)
        for rows in np.split(np.arange(B), num_micro)
    ]
    for mode in MODES:
      np.testing.assert_allclose(
          sum(part[mode][0][0] for part in parts),
          full[mode][0][0],
          rtol=1e-5,
          atol=1e-7,
          err_msg=f'{num_micro} {mode}',
      )
      np.testing.assert_allclose(
          jnp.concatenate([part[mode][1] for part in parts]),
          full[mode][1],
          rtol=1e-5,
          atol=1e-8,
          err_msg=f'{num_micro} {mode}',
      )
      assert np.abs(full[mode][1]).max() > 1e-3


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    case=st.sampled_from(sorted(CASES)),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 1e3]),
)
def test_zero_advantage_gives_zero_loss_and_gradient(case, seed, scale):
  logp, old_logp, _, mask, ref_logp = _make_batch(seed, scale=scale)
  results = _evaluate(
      case, *map(jnp.asarray, (logp, old_logp, np.zeros(B, np.float32), mask, ref_logp))
  )
  for mode, ((loss, _), grad) in results.items():
    assert loss == 0, mode
    np.testing.assert_array_equal(grad, 0.0, err_msg=mode)


@pytest.mark.parametrize('case', CLIPPING_CASES)
def test_gradient_is_zero_exactly_on_clipped_and_padded_tokens(case):
  # GMPO (token clip): the gradient flows only through the unclipped tokens;
  # sequence-level clips remove whole sequences.
  objective, hp, _ = CASES[case]
  batch = _case_batch(case, seed=31)
  (_, extras), grad = _evaluate(case, *map(jnp.asarray, batch))['seq-mean-token-mean']
  low, high = _reference_clipped(objective, *map(_f64, batch[:3]), batch[3], hp)
  flows = batch[3] & ~low & ~high
  np.testing.assert_array_equal(np.asarray(grad) != 0, flows)
  assert flows.any() and (low | high).any()  # both kinds are exercised


def test_gspo_and_gmpo_coincide_without_clipping():
  batch = [jnp.asarray(x) for x in _make_batch(41, scale=0.5)]
  gspo = _evaluate('gspo_unclipped', *batch)
  assert abs(float(gspo['seq-mean-token-mean'][0][0])) > 1e-3
  for case in ('gmpo_none', 'gmpo_token_unclipped'):
    gmpo = _evaluate(case, *batch)
    for mode in MODES:
      np.testing.assert_allclose(
          gmpo[mode][0][0], gspo[mode][0][0], rtol=1e-6, err_msg=f'{case} {mode}'
      )
      np.testing.assert_allclose(
          gmpo[mode][1], gspo[mode][1], rtol=1e-6, atol=1e-9, err_msg=f'{case} {mode}'
      )


@pytest.mark.parametrize('case', CASES)
def test_huge_log_ratios_give_finite_loss_gradient_and_extras(case):
  logp, old_logp, advantages, mask, ref_logp = _make_batch(51)
  rng = np.random.default_rng(52)
  logp = np.where(mask, old_logp + rng.choice([-1e3, 1e3], size=mask.shape), np.nan).astype(
      np.float32
  )
  results = _evaluate(case, *map(jnp.asarray, (logp, old_logp, advantages, mask, ref_logp)))
  for mode, ((loss, extras), grad) in results.items():
    assert np.isfinite(loss), mode
    assert np.all(np.isfinite(grad)), mode
    assert all(np.isfinite(x) for x in extras), mode


@pytest.mark.parametrize(
    'case',
    [
        'gmpo_token',
        'gmpo_sequence',
        'gmpo_sequence_mean',
        'gmpo_none',
        'pmpo_harmonic',
        'pmpo_sequence',
    ],
)
def test_gmpo_overflow_guard_holds_the_ratio_at_e_to_the_20(case):
  # A < 0 and delta = +1e3 on every token: the unclipped side. Without the guard
  # exp(1e3) = inf and the gradient is NaN; with it the loss is -A e^20.
  old_logp = np.zeros((B, T), np.float32)
  advantages = -np.linspace(0.5, 2.0, B).astype(np.float32)
  results = _evaluate(
      case,
      *map(jnp.asarray, (old_logp + 1e3, old_logp, advantages, np.ones((B, T), bool), old_logp)),
  )
  (loss, _), grad = results['seq-mean-token-mean']
  np.testing.assert_allclose(loss, -advantages.mean() * np.exp(20.0), rtol=1e-6)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('objective', sorted(losses.POLICY_LOSSES))
def test_extras_carry_no_gradient(objective):
  logp, old_logp, advantages, mask, ref_logp = _make_batch(61)
  fn = losses.get_policy_loss(objective, **CASES[OBJECTIVE_CASES[objective]][1])

  def extras(lp):
    return fn(
        lp,
        jnp.asarray(old_logp),
        jnp.asarray(advantages),
        jnp.asarray(mask),
        ref_logp=jnp.asarray(ref_logp),
        beta=0.1,
    )[1]

  # These extras do depend on logp, so a missing stop_gradient would show.
  before, after = extras(jnp.asarray(logp)), extras(jnp.asarray(logp) + 0.1)
  for name in ('ratio_min', 'ratio_mean', 'ratio_max', 'approx_kl', 'kl'):
    assert getattr(before, name) != getattr(after, name), name
  np.testing.assert_array_equal(jax.grad(lambda lp: sum(extras(lp)))(jnp.asarray(logp)), 0.0)
  # Without a reference policy the KL extra is 0.
  assert (
      fn(jnp.asarray(logp), jnp.asarray(old_logp), jnp.asarray(advantages), jnp.asarray(mask))[1].kl
      == 0
  )


@pytest.mark.parametrize('case', ['grpo', 'gmpo_token', 'gspo', 'pmpo_harmonic'])
def test_all_masked_input_gives_zero_loss_and_finite_extras(case):
  logp, old_logp, advantages, _, ref_logp = _make_batch(62)
  results = _evaluate(
      case, *map(jnp.asarray, (logp, old_logp, advantages, np.zeros((B, T), bool), ref_logp))
  )
  for mode, ((loss, extras), grad) in results.items():
    assert loss == 0, mode
    np.testing.assert_array_equal(grad, 0.0, err_msg=mode)
    assert extras == aggregation.LossExtras(0, 0, 1, 1, 1, 0, 0, 0), mode


@pytest.mark.parametrize(
    'fn, kwargs, message',
    [
        (losses.token_clip_loss, dict(beta=0.1), 'needs ref_logp'),
        (losses.geometric_mean_loss, dict(beta=0.1), 'needs ref_logp'),
        (losses.gspo_loss, dict(beta=0.1), 'needs ref_logp'),
        (losses.token_clip_loss, dict(beta=-0.1), 'beta must be >= 0'),
        (losses.token_clip_loss, dict(loss_agg_mode='sum'), 'token-mean'),
        (losses.geometric_mean_loss, dict(kl_estimator='k4'), 'k1, k2, k3'),
        (
            losses.geometric_mean_loss,
            dict(clip_mode='tokens'),
            'token, sequence, sequence_mean, none',
        ),
        (functools.partial(losses.power_mean_loss, p=float('inf')), {}, 'p must be a finite'),
        (
            functools.partial(losses.power_mean_loss, p=1.0),
            dict(epsilon_high=-1.0),
            'epsilon_high >= 0',
        ),
        (losses.geometric_mean_loss, dict(epsilon_low=-0.1), 'epsilon_low >= 0'),
        (losses.token_clip_loss, dict(epsilon_low=1.2), '0 <= epsilon_low <= 1'),
        (losses.gspo_loss, dict(epsilon_high=float('nan')), 'epsilon_high >= 0'),
        (losses.token_clip_loss, dict(dual_clip=1.0), 'dual_clip must be > 1'),
        (losses.geometric_mean_loss, dict(max_length=16), 'applies only'),
        (
            losses.token_clip_loss,
            dict(loss_agg_mode='seq-mean-token-sum-norm', max_length=0),
            'positive',
        ),
        (losses.gspo_loss, dict(loss_agg_mode='seq-mean-token-sum-norm'), 'needs max_length'),
    ],
)
def test_options_that_cannot_apply_are_errors(fn, kwargs, message):
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=message):
    fn(x, x, jnp.ones(2), jnp.ones((2, 3), bool), **kwargs)


def test_get_policy_loss_binds_hyperparameters_and_rejects_unknown_names():
  logp, old_logp, advantages, mask, ref_logp = _case_batch('gmpo_sequence', 71)
  args = [jnp.asarray(x) for x in (logp, old_logp, advantages, mask)]
  fn = losses.get_policy_loss(
      'geometric', clip_mode='sequence', epsilon_low=0.1, epsilon_high=0.15, beta=0.05
  )
  got, _ = fn(*args, ref_logp=jnp.asarray(ref_logp))
  want, _ = losses.geometric_mean_loss(
      *args,
      clip_mode='sequence',
      epsilon_low=0.1,
      epsilon_high=0.15,
      beta=0.05,
      ref_logp=jnp.asarray(ref_logp),
  )
  assert got == want
  assert isinstance(fn, functools.partial)
  with pytest.raises(ValueError, match=r"\['geometric', 'gspo', 'power_mean', 'token_clip'\]"):
    losses.get_policy_loss('ppo')
  with pytest.raises(ValueError, match=r"\['clip_mode'\].*valid: \['epsilon_low'"):
    losses.get_policy_loss('gspo', clip_mode='token')
  with pytest.raises(ValueError, match='num_tokens'):
    losses.get_policy_loss('token_clip', num_tokens=100)
  with pytest.raises(ValueError, match="'power_mean' needs hyperparameter.*p"):
    losses.get_policy_loss('power_mean', clip_mode='sequence')
  assert set(losses.POLICY_LOSSES) == {'token_clip', 'geometric', 'gspo', 'power_mean'}
  assert set(OBJECTIVE_CASES) == set(losses.POLICY_LOSSES)


# ------------------------------------------------- the power-mean family


@pytest.mark.parametrize('clip_mode', losses.CLIP_MODES)
def test_power_mean_at_p_0_is_geometric_mean_loss_and_continuous(clip_mode):
  batch = [jnp.asarray(x) for x in _make_batch(81)]
  hp = dict(epsilon_low=0.2, epsilon_high=0.3, clip_mode=clip_mode)

  def evaluate(fn, **extra):
    return jax.value_and_grad(fn, has_aux=True)(*batch[:4], **hp, **extra)

  (want, want_extras), want_grad = evaluate(losses.geometric_mean_loss)
  (got, got_extras), got_grad = evaluate(losses.power_mean_loss, p=0.0)
  assert got == want and abs(float(want)) > 1e-3
  np.testing.assert_array_equal(got_grad, want_grad)
  assert got_extras == want_extras
  for p in (-1e-7, 1e-7):  # no jump at p = 0
    (near, _), near_grad = evaluate(losses.power_mean_loss, p=p)
    np.testing.assert_allclose(near, want, rtol=1e-5)
    np.testing.assert_allclose(near_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_power_mean_at_p_1_without_clip_is_the_arithmetic_mean_of_ratios():
  # -A mean_t rho_t per sequence: the unclipped token surrogate, sequence-averaged.
  batch = [jnp.asarray(x) for x in _make_batch(82)]
  (got, _), got_grad = jax.value_and_grad(losses.power_mean_loss, has_aux=True)(
      *batch[:4], p=1.0, clip_mode='none'
  )
  (want, _), want_grad = jax.value_and_grad(losses.token_clip_loss, has_aux=True)(
      *batch[:4], epsilon_low=1.0, epsilon_high=np.inf, loss_agg_mode='seq-mean-token-mean'
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    'advantage, delta, sequence, sequence_mean',
    [
        # The example: the sum 0.6 is clipped to 0.4 before dividing by 2,
        # -e^0.2 = -1.2214; the mean 0.3 is inside the range, -e^0.3 = -1.3499.
        (1.0, [0.3, 0.3], -np.exp(0.2), -np.exp(0.3)),
        (-1.0, [-0.3, -0.3], np.exp(-0.2), np.exp(-0.3)),  # 0.8187 and 0.7408
        (1.0, [0.3, -0.3], -1.0, -1.0),  # the product is 1: nothing to clip
    ],
)
def test_sequence_clip_worked_example(advantage, delta, sequence, sequence_mean):
  logp = jnp.asarray([delta], jnp.float32)
  args = (logp, jnp.zeros_like(logp), jnp.asarray([advantage]), jnp.ones(logp.shape, bool))
  for mode, want in [('sequence', sequence), ('sequence_mean', sequence_mean)]:
    got, _ = losses.geometric_mean_loss(*args, clip_mode=mode)
    reference = _reference_loss(
        'geometric',
        _f64(logp),
        np.zeros(logp.shape),
        np.array([advantage]),
        np.ones(logp.shape, bool),
        dict(clip_mode=mode),
        loss_agg_mode='seq-mean-token-mean',
    )
    np.testing.assert_allclose([got, reference], [want, want], rtol=1e-6, err_msg=mode)


# ------------------------------------------------- non-finite input, every objective


def _garbage(rng, shape):
  return rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30], np.float32), size=shape)


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    objective=st.sampled_from(sorted(losses.POLICY_LOSSES)), seed=st.integers(0, 2**16)
)
def test_masked_garbage_contributes_nothing_for_every_objective(objective, seed):
  """NaN/inf in masked tokens and in fully masked rows (logp, old_logp and the
  row's advantage): a finite loss, equal to the loss without those rows."""
  case = OBJECTIVE_CASES[objective]
  logp, old_logp, advantages, mask, ref_logp = _case_batch(case, seed=seed)
  empty = ~mask.any(-1)
  assert empty.any()
  rng = np.random.default_rng(seed)
  dirty = [x.copy() for x in (logp, old_logp, advantages)]
  for x in dirty[:2]:
    x[~mask] = _garbage(rng, (~mask).sum())
  dirty[2][empty] = _garbage(rng, empty.sum())
  got = _evaluate(case, *map(jnp.asarray, (*dirty, mask, ref_logp)))
  kept = ~empty
  without = _evaluate(
      case, *(jnp.asarray(x[kept]) for x in (logp, old_logp, advantages, mask, ref_logp))
  )
  for mode in MODES:
    (loss, extras), grad = got[mode]
    (want, want_extras), want_grad = without[mode]
    assert np.isfinite(loss) and np.all(np.isfinite(grad)), mode
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-8, err_msg=mode)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    np.testing.assert_allclose(np.asarray(grad)[kept], want_grad, rtol=1e-5, atol=1e-9)
    for name, a, b in zip(aggregation.LossExtras._fields, extras, want_extras):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f'{mode} {name}')


@hypothesis.settings(max_examples=16, deadline=None, derandomize=True)
@hypothesis.given(
    objective=st.sampled_from(sorted(losses.POLICY_LOSSES)),
    where=st.sampled_from(['logp', 'old_logp', 'advantage']),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
)
def test_non_finite_valid_input_gives_nan_for_every_objective(objective, where, bad, seed):
  case = OBJECTIVE_CASES[objective]
  batch = list(_case_batch(case, seed=seed))
  mask = batch[3]
  rng = np.random.default_rng(seed)
  row = rng.choice(np.flatnonzero(mask.any(-1)))
  if where == 'advantage':
    batch[2] = batch[2].copy()
    batch[2][row] = bad
  else:
    index = 0 if where == 'logp' else 1
    batch[index] = batch[index].copy()
    batch[index][row, rng.choice(np.flatnonzero(mask[row]))] = bad
  for mode, ((loss, _), _) in _evaluate(case, *map(jnp.asarray, batch)).items():
    assert np.isnan(loss), (mode, float(loss))


@pytest.mark.parametrize(
    'case, estimator', [('dapo_dual_clip', 'k1'), ('gmpo_token', 'k2'), ('gspo', 'k3')]
)
def test_non_finite_valid_ref_logp_gives_nan(case, estimator):
  batch = list(_case_batch(case, seed=300))
  batch[4] = batch[4].copy()
  batch[4][0, 0] = -np.inf  # a valid token (rows 0 and 1 start valid)
  for mode, ((loss, extras), _) in _evaluate(
      case, *map(jnp.asarray, batch), beta=0.1, kl_estimator=estimator
  ).items():
    assert np.isnan(loss) and np.isnan(extras.kl), mode
