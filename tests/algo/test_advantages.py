"""Tests for gmpo_jax.algo.advantages against float64 NumPy references written from the formulas."""

import functools
import zlib

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax.algo import advantages

# ---------------------------------------------------------------------------------------
# float64 references, one group at a time, straight from the formulas.


def _valid_rows(rewards, mask):
  rewards = np.asarray(rewards, np.float64)
  mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask, bool)
  return rewards, mask


def _reference_group_relative(values, mask, *, normalize, eps):
  """(v_i - mean_valid v) [/ (std_valid(v, ddof=1) + eps)] per row; 0 elsewhere."""
  out = np.zeros(values.shape)
  for b in range(values.shape[0]):
    v = values[b, mask[b]]
    if v.size < 2:
      continue  # a group of one (or none) has no baseline to compare with: 0
    a = v - v.mean()
    if normalize:
      denominator = v.std(ddof=1) + eps
      # eps = 0 and no spread: the documented 0 / 0 = 0.
      a = a / denominator if denominator > 0 else np.zeros_like(a)
    out[b, mask[b]] = a
  return out


def reference_gmpo(rewards, mask=None, *, normalize=False, eps=1e-6, floor=1e-8, offset=0.0):
  """Founding document §2.2 / §3.1: L = log(max(R + offset, floor)), centered per group."""
  rewards, mask = _valid_rows(rewards, mask)
  log_rewards = np.log(np.maximum(rewards + offset, floor))
  return _reference_group_relative(log_rewards, mask, normalize=normalize, eps=eps)


def reference_grpo(rewards, mask=None, *, normalize=True, eps=1e-6):
  """Shao et al. 2024: (R_i - mean R) / (std R + eps), std with ddof = 1."""
  rewards, mask = _valid_rows(rewards, mask)
  return _reference_group_relative(rewards, mask, normalize=normalize, eps=eps)


def reference_dr_grpo(rewards, mask=None):
  """Liu et al. 2025: R_i - mean R."""
  rewards, mask = _valid_rows(rewards, mask)
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    v = rewards[b, mask[b]]
    out[b, mask[b]] = v - v.mean() if v.size else v
  return out


def reference_rloo(rewards, mask=None):
  """Ahmadian et al. 2024: R_i - mean_{j != i} R_j, by explicit leave-one-out."""
  rewards, mask = _valid_rows(rewards, mask)
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    if idx.size < 2:
      continue
    for i in idx:
      others = rewards[b, idx[idx != i]]
      out[b, i] = rewards[b, i] - others.mean()
  return out


def reference_batch_std(rewards, mask=None, *, eps=1e-6):
  """Group mean baseline, std (ddof = 1) over every valid reward of the batch."""
  rewards, mask = _valid_rows(rewards, mask)
  all_valid = rewards[mask]
  std = all_valid.std(ddof=1) if all_valid.size > 1 else 0.0
  return reference_dr_grpo(rewards, mask) / (std + eps)


def reference_power_mean(
    rewards, mask=None, *, p, normalize=False, eps=1e-6, floor=1e-8, offset=0.0
):
  """Box-Cox: R' = max(R + offset, floor), L = (R'^p - 1) / p (log R' at p = 0), centered."""
  rewards, mask = _valid_rows(rewards, mask)
  shifted = np.maximum(rewards + offset, floor)
  with np.errstate(invalid="ignore"):  # NaN in masked entries
    transformed = np.log(shifted) if p == 0 else (shifted**p - 1) / p
  return _reference_group_relative(transformed, mask, normalize=normalize, eps=eps)


def reference_maxrl(rewards, mask=None, *, eps=1e-6):
  """Tajwar et al. 2026: (R_i - mean R) / (mean R + eps); 0 / 0 = 0; NaN for a negative reward."""
  rewards, mask = _valid_rows(rewards, mask)
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    v = rewards[b, mask[b]]
    if (v < 0).any():
      out[b, mask[b]] = np.nan
    elif v.size and v.mean() + eps > 0:
      out[b, mask[b]] = (v - v.mean()) / (v.mean() + eps)
  return out


REFERENCES = {
    "grpo": reference_grpo,
    "gmpo": reference_gmpo,
    "dr_grpo": reference_dr_grpo,
    "rloo": reference_rloo,
    "batch_std": reference_batch_std,
    "power_mean": reference_power_mean,
    "maxrl": reference_maxrl,
}
# Hyperparameters without a default, for the checks of every estimator.
REQUIRED = {"power_mean": {"p": 0.5}}
# Estimators defined only for non-negative rewards get |R| in the shared cases.
NON_NEGATIVE = {"maxrl"}


def in_domain(name, rewards):
  return np.abs(rewards) if name in NON_NEGATIVE else rewards


# (estimator name, hyperparameters): every configuration the comparisons cover.
# grpo with normalize=False is dr_grpo (same code path), so it is not repeated.
CONFIGS = [
    ("gmpo", {}),
    ("gmpo", {"normalize": True}),
    ("gmpo", {"normalize": True, "eps": 1e-4, "floor": 1e-3, "offset": 0.5}),
    ("grpo", {}),
    ("grpo", {"eps": 0.0}),
    ("dr_grpo", {}),
    ("rloo", {}),
    ("batch_std", {}),
    ("power_mean", {"p": 0.5}),
    ("power_mean", {"p": -0.5, "normalize": True}),
    ("power_mean", {"p": -1.0, "floor": 1e-3, "offset": 0.5}),
    ("power_mean", {"p": 2.0, "normalize": True, "eps": 0.0}),
    ("maxrl", {}),
]
CONFIG_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CONFIGS
]
# One configuration per estimator, for the checks of code paths that do not depend on
# the hyperparameters (no mask, vmap, a group of one).
DEFAULTS = [(name, REQUIRED.get(name, {})) for name in REFERENCES]


@functools.cache
def _compiled(name, hyperparameters, transform):
  """One jitted (or vmapped + jitted) callable per configuration, shared by all tests."""
  fn = advantages.get_advantage_fn(name, **dict(hyperparameters))
  if transform == "vmap":
    fn = jax.vmap(fn)
  return jax.jit(fn) if transform in ("jit", "vmap") else fn


def estimator(name, transform="jit", **hyperparameters):
  return _compiled(name, tuple(sorted(hyperparameters.items())), transform)


# One shape for (almost) every test, so that each jitted estimator compiles once.
B, G = 6, 5


def random_case(seed, batch=B, group=G, name=None):
  """Rewards and mask with every degenerate kind of group mixed into random ones.

  Rewards in [-1, 5) ([0, 5) for estimators of non-negative rewards): the negative
  ones exercise the log-reward baseline's floor. Row 1: all-equal rewards; row 2:
  all masked; row 3: one valid completion; masked entries hold NaN, inf or garbage
  that must not leak.
  """
  rng = np.random.default_rng(seed)
  rewards = rng.uniform(-1.0, 5.0, (batch, group))
  rewards[1] = rng.uniform(-1.0, 5.0)
  mask = rng.uniform(size=(batch, group)) < 0.75
  mask[0] = True
  mask[1] = True
  mask[2] = False
  mask[3] = False
  mask[3, 1] = True
  garbage = rng.choice([np.nan, np.inf, -np.inf, -7.0, 1e30], size=(batch, group))
  rewards = np.where(mask, in_domain(name, rewards), garbage).astype(np.float32)
  return rewards, mask


def assert_close(actual, expected, *, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize(
    ("name", "hyperparameters", "transform"),
    [(*config, "jit") for config in CONFIGS] + [(*config, "eager") for config in DEFAULTS],
    ids=[f"{i}-jit" for i in CONFIG_IDS] + [f"{name}-eager" for name in REFERENCES],
)
def test_matches_reference_with_mask(name, hyperparameters, transform):
  rewards, mask = random_case(
      seed=zlib.crc32(f"{name}{hyperparameters}{transform}".encode()), name=name
  )
  got = estimator(name, transform, **hyperparameters)(jnp.asarray(rewards), jnp.asarray(mask))
  assert got.dtype == jnp.float32 and got.shape == rewards.shape
  assert_close(got, REFERENCES[name](rewards, mask, **hyperparameters))


@pytest.mark.parametrize(("name", "hyperparameters"), DEFAULTS, ids=list(REFERENCES))
def test_matches_reference_without_mask(name, hyperparameters):
  rewards = np.random.default_rng(7).lognormal(0.0, 1.5, (B, G)).astype(np.float32)
  rewards[1] = 0.0  # a group without a success (MaxRL), all floored (log baselines)
  got = estimator(name, **hyperparameters)(jnp.asarray(rewards))
  assert_close(got, REFERENCES[name](rewards, **hyperparameters))


@pytest.mark.parametrize(("name", "hyperparameters"), DEFAULTS, ids=list(REFERENCES))
def test_vmap_over_batches_matches_reference(name, hyperparameters):
  # vmap over a leading axis of independent batches: [N, B, G] -> [N, B, G].
  cases = [random_case(seed, name=name) for seed in (11, 12, 13)]
  rewards = np.stack([r for r, _ in cases])
  mask = np.stack([m for _, m in cases])
  got = estimator(name, "vmap", **hyperparameters)(jnp.asarray(rewards), jnp.asarray(mask))
  expected = np.stack([REFERENCES[name](r, m, **hyperparameters) for r, m in cases])
  assert_close(got, expected)


@pytest.mark.parametrize(("name", "hyperparameters"), CONFIGS, ids=CONFIG_IDS)
def test_float64_matches_reference_to_1e_12(name, hyperparameters):
  # With x64 the only differences left are float64 rounding: any formula slip shows.
  rewards, mask = random_case(seed=5, name=name)
  with jax.enable_x64(True):
    fn = jax.jit(advantages.get_advantage_fn(name, **hyperparameters))
    got = fn(jnp.asarray(rewards, jnp.float64), jnp.asarray(mask))
    assert got.dtype == jnp.float64
  assert_close(got, REFERENCES[name](rewards, mask, **hyperparameters), rtol=1e-12, atol=1e-12)


def test_low_precision_rewards_are_computed_in_float32():
  rewards, mask = random_case(seed=3)
  got = advantages.grpo_advantages(jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(mask))
  assert got.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(rewards, jnp.bfloat16), np.float32)
  assert_close(got, reference_grpo(rounded, mask))


# ---------------------------------------------------------------------------------------
# The founding document's worked example (§1.1–1.2): R = [10, 10, 10, 1000].

EXAMPLE = jnp.array([[10.0, 10.0, 10.0, 1000.0]])


def test_worked_example_log_reward_baseline():
  np.testing.assert_allclose(
      estimator("gmpo")(EXAMPLE)[0], np.log(10) * np.array([-0.5, -0.5, -0.5, 1.5]), atol=1e-5
  )
  np.testing.assert_allclose(
      estimator("gmpo", normalize=True)(EXAMPLE)[0], [-0.5, -0.5, -0.5, 1.5], atol=1e-5
  )


def test_worked_example_grpo_unnormalized():
  expected = [-247.5, -247.5, -247.5, 742.5]
  np.testing.assert_allclose(estimator("dr_grpo")(EXAMPLE)[0], expected, rtol=1e-6)
  np.testing.assert_allclose(estimator("grpo", normalize=False)(EXAMPLE)[0], expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Degenerate input.


@pytest.mark.parametrize(("name", "hyperparameters"), DEFAULTS, ids=list(REFERENCES))
def test_group_of_one_is_zero(name, hyperparameters):
  rewards = jnp.asarray(in_domain(name, np.array([[3.0], [0.25], [-1.0]], np.float32)))
  got = estimator(name, **hyperparameters)(rewards)
  np.testing.assert_array_equal(got, np.zeros((3, 1)))


@pytest.mark.parametrize(("name", "hyperparameters"), CONFIGS, ids=CONFIG_IDS)
def test_all_equal_groups_are_exactly_zero(name, hyperparameters):
  # Values whose float32 mean does not round back to themselves (0.1 * 3 / 3, ...):
  # a plain mean leaves ~1e-8 noise that eps would blow up to O(0.1) advantages.
  values = [0.1, 1000.1, 0.0, 1e-8, 7.3e12, -2.7]  # 0.0: all clamped to the floor
  rewards = np.repeat(np.array(values, np.float32)[:, None], G, axis=1)
  rewards = jnp.asarray(in_domain(name, rewards))
  got = estimator(name, **hyperparameters)(rewards, jnp.ones(rewards.shape, bool))
  np.testing.assert_array_equal(got, np.zeros(rewards.shape))
  # Same with some completions masked out.
  mask = jnp.array(np.random.default_rng(0).uniform(size=rewards.shape) < 0.6)
  np.testing.assert_array_equal(
      estimator(name, **hyperparameters)(rewards, mask), np.zeros(rewards.shape)
  )


@pytest.mark.parametrize(("name", "hyperparameters"), CONFIGS, ids=CONFIG_IDS)
def test_masked_entries_are_zero_and_excluded(name, hyperparameters):
  rewards, mask = random_case(seed=21, name=name)
  got = np.asarray(estimator(name, **hyperparameters)(jnp.asarray(rewards), jnp.asarray(mask)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[~mask], 0.0)
  np.testing.assert_array_equal(got[2], 0.0)  # the all-masked group
  # Changing what the masked entries hold changes nothing.
  other = np.where(mask, rewards, np.float32(123.0))
  np.testing.assert_array_equal(
      estimator(name, **hyperparameters)(jnp.asarray(other), jnp.asarray(mask)), got
  )


def test_non_positive_rewards_are_clamped_to_the_floor():
  rewards = jnp.array([[0.0, -3.0, 1.0, 2.0]])
  floor = 1e-8
  expected_log = np.log([floor, floor, 1.0, 2.0])
  np.testing.assert_allclose(
      estimator("gmpo")(rewards)[0], expected_log - expected_log.mean(), rtol=1e-6
  )
  # An offset moves the rewards into the positive range before the log.
  shifted = np.log(np.array([0.0, -3.0, 1.0, 2.0]) + 4.0)
  np.testing.assert_allclose(
      advantages.gmpo_advantages(rewards, offset=4.0)[0], shifted - shifted.mean(), rtol=1e-6
  )


@functools.cache
def _compiled_gradient(name, hyperparameters):
  fn = advantages.get_advantage_fn(name, **dict(hyperparameters))
  return jax.jit(jax.grad(lambda r, m, w: jnp.sum(w * fn(r, m))))


@pytest.mark.parametrize(("name", "hyperparameters"), CONFIGS, ids=CONFIG_IDS)
def test_gradient_is_finite_and_matches_finite_differences(name, hyperparameters):
  # Gradients through masks, an all-equal group (sqrt'(0)), a single and an all-masked
  # group must be finite; away from the all-equal kink they must match central
  # differences of the float64 reference.
  rewards, mask = random_case(seed=8, name=name)
  rewards = np.where(mask, rewards, np.float32(-7.0))
  weights = np.random.default_rng(9).normal(size=rewards.shape)
  grad = np.asarray(
      _compiled_gradient(name, tuple(sorted(hyperparameters.items())))(
          rewards, mask, weights.astype(np.float32)
      )
  )
  assert np.all(np.isfinite(grad))

  def objective(r):
    return np.sum(weights * REFERENCES[name](r, mask, **hyperparameters))

  r64 = rewards.astype(np.float64)
  expected = np.zeros(r64.shape)
  for index in np.ndindex(r64.shape):
    step = 1e-6 * max(1.0, abs(r64[index]))
    up, down = r64.copy(), r64.copy()
    up[index] += step
    down[index] -= step
    expected[index] = (objective(up) - objective(down)) / (2 * step)
  smooth = np.ones(r64.shape, bool)
  smooth[1] = False  # the all-equal group, where normalized estimators have a kink
  np.testing.assert_allclose(grad[smooth], expected[smooth], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Properties (fixed shapes: each jitted function compiles once).

SETTINGS = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
masks = hnp.arrays(bool, (B, G))


def positive_rewards(low=1e-3, high=1e3):
  return hnp.arrays(np.float64, (B, G), elements=st.floats(low, high)).map(
      lambda r: r.astype(np.float32)
  )


def _std_tolerance(values, mask, eps):
  """Tolerance for a normalized output: float32 error of the inputs over (std + eps)."""
  stds = [values[b, mask[b]].std(ddof=1) if mask[b].sum() > 1 else 0.0 for b in range(B)]
  magnitude = np.abs(values).max(axis=1)
  return np.array([1e-5 + 1e-6 * (1 + m) / (s + eps) for m, s in zip(magnitude, stds)])[:, None]


@SETTINGS
@hypothesis.given(rewards=positive_rewards(), mask=masks, c=st.floats(1e-3, 1e3))
def test_log_reward_baseline_is_scale_invariant(rewards, mask, c):
  scaled = (rewards.astype(np.float64) * c).astype(np.float32)
  unnormalized = estimator("gmpo")
  np.testing.assert_allclose(
      unnormalized(scaled, mask), unnormalized(rewards, mask), rtol=0, atol=1e-5
  )
  normalized = estimator("gmpo", normalize=True)
  tolerance = _std_tolerance(np.log(rewards.astype(np.float64)), mask, 1e-6)
  difference = np.abs(np.asarray(normalized(scaled, mask)) - np.asarray(normalized(rewards, mask)))
  assert np.all(difference <= tolerance)


@SETTINGS
@hypothesis.given(
    rewards=hnp.arrays(np.float32, (B, G), elements=st.floats(-10, 10, width=32)),
    mask=masks,
    shift=st.floats(-100, 100, width=32),
)
def test_grpo_is_shift_invariant(rewards, mask, shift):
  shifted = rewards + np.float32(shift)
  for name in ("grpo", "dr_grpo", "rloo"):
    fn = estimator(name)
    if name == "grpo":
      tolerance = _std_tolerance(shifted.astype(np.float64), mask, 1e-6)
    else:
      tolerance = 1e-4
    difference = np.abs(np.asarray(fn(shifted, mask)) - np.asarray(fn(rewards, mask)))
    assert np.all(difference <= tolerance), name


@SETTINGS
@hypothesis.given(rewards=positive_rewards(1e-6, 1e6), mask=masks)
def test_centered_estimators_have_zero_masked_mean(rewards, mask):
  for name, hyperparameters in CONFIGS:
    got = np.asarray(estimator(name, **hyperparameters)(rewards, mask), np.float64)
    np.testing.assert_array_equal(got[~mask], 0.0)
    # Sum over each group's valid entries: zero up to float32 rounding of the terms.
    tolerance = 1e-6 * G * np.abs(got).max(axis=1) + 1e-30
    assert np.all(np.abs(got.sum(axis=1)) <= tolerance), (name, hyperparameters)


@SETTINGS
@hypothesis.given(
    rewards=hnp.arrays(
        np.float64, (B, G), elements=st.floats(-30, 30).map(lambda e: 10.0**e)
    ).map(lambda r: r.astype(np.float32)),
    mask=masks,
)
def test_finite_output_for_any_positive_reward(rewards, mask):
  # 1e-30 .. 1e30 in one batch, one group.
  for name, hyperparameters in CONFIGS:
    got = np.asarray(estimator(name, **hyperparameters)(rewards, mask))
    assert np.all(np.isfinite(got)), (name, hyperparameters, rewards)


@SETTINGS
@hypothesis.given(
    rewards=hnp.arrays(
        np.float32, (B, G), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    ),
    mask=masks,
)
def test_no_nan_for_any_finite_reward(rewards, mask):
  # Any finite float32, sign and magnitude included (up to +-3.4e38; |R| for MaxRL).
  # The normalized estimators, the log-reward baselines and MaxRL stay finite; the
  # other unnormalized ones may only reach +-inf where the true advantage itself
  # exceeds the float range.
  for name, hyperparameters in CONFIGS:
    got = np.asarray(estimator(name, **hyperparameters)(in_domain(name, rewards), mask))
    assert not np.any(np.isnan(got)), (name, hyperparameters)
    if name in ("gmpo", "batch_std", "power_mean", "maxrl") or (
        name == "grpo" and hyperparameters.get("normalize", True)
    ):
      assert np.all(np.isfinite(got)), (name, hyperparameters)


@SETTINGS
@hypothesis.given(
    rewards=hnp.arrays(np.bool_, (B, G)).map(lambda r: r.astype(np.float32)), mask=masks
)
def test_binary_rewards_log_baseline_vs_grpo(rewards, mask):
  # Normalized, the log-reward baseline of 0/1 rewards is GRPO (up to eps).
  np.testing.assert_allclose(
      estimator("gmpo", normalize=True)(rewards, mask),
      estimator("grpo")(rewards, mask),
      atol=1e-4,
  )
  # Unnormalized it is Dr.GRPO scaled by |log floor| (18.4 for floor = 1e-8).
  np.testing.assert_allclose(
      estimator("gmpo")(rewards, mask),
      abs(np.log(1e-8)) * np.asarray(estimator("dr_grpo")(rewards, mask)),
      rtol=1e-5,
      atol=1e-4,
  )


# ---------------------------------------------------------------------------------------
# The power-mean family: its special cases and its continuity in p.


def positive_case(seed):
  """Positive rewards spanning orders of magnitude (above every floor), with a mask."""
  rng = np.random.default_rng(seed)
  rewards = rng.lognormal(0.0, 1.5, (B, G)).astype(np.float32)
  mask = rng.uniform(size=(B, G)) < 0.8
  mask[:, :2] = True
  return rewards, mask


@pytest.mark.parametrize("normalize", [False, True])
def test_power_mean_at_p_1_is_dr_grpo_and_grpo(normalize):
  rewards, mask = positive_case(31)
  got = estimator("power_mean", p=1.0, normalize=normalize)(rewards, mask)
  want = estimator("grpo" if normalize else "dr_grpo")(rewards, mask)
  assert np.abs(np.asarray(want)).max() > 0.1
  assert_close(got, np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_power_mean_at_p_0_is_the_log_reward_baseline(normalize):
  rewards, mask = random_case(seed=32)
  log_baseline = np.asarray(estimator("gmpo", normalize=normalize)(rewards, mask))
  np.testing.assert_array_equal(
      estimator("power_mean", p=0.0, normalize=normalize)(rewards, mask), log_baseline
  )
  for p in (-1e-7, 1e-7):
    assert_close(
        estimator("power_mean", p=p, normalize=normalize)(rewards, mask),
        log_baseline,
        rtol=1e-5,
        atol=1e-5 * np.abs(log_baseline).max(),
    )


def test_power_mean_is_continuous_across_p_0():
  # Near p = 0 the float32 result follows the float64 formula (R^p - 1) / p, and its
  # distance to the log baseline shrinks linearly with |p|: no jump at 0.
  rewards, mask = positive_case(33)
  at_zero = reference_power_mean(rewards, mask, p=0.0)
  slope = np.abs(reference_power_mean(rewards, mask, p=1e-3) - at_zero).max() / 1e-3
  assert slope > 0.1
  for p in (-1e-2, -1e-4, -1e-6, 1e-6, 1e-4, 1e-2):
    got = np.asarray(estimator("power_mean", p=p)(rewards, mask), np.float64)
    assert_close(got, reference_power_mean(rewards, mask, p=p), rtol=1e-5, atol=1e-5)
    assert np.abs(got - at_zero).max() <= 2 * slope * abs(p) + 1e-5, p


@pytest.mark.parametrize("p", [-8.0, 8.0])
def test_power_mean_extreme_powers_stay_finite(p):
  # R from 1e-15 to 1e15: R^p spans 1e-120 .. 1e120 (float64 holds it; float32 does
  # not). Normalized advantages are O(1) and must match; unnormalized ones beyond the
  # float range saturate: finite, and in the right proportions within each group.
  rng = np.random.default_rng(34)
  rewards = (10.0 ** rng.uniform(-15, 15, (B, G))).astype(np.float32)
  mask = np.ones((B, G), bool)
  normalized = estimator("power_mean", p=p, normalize=True)(rewards, mask)
  assert_close(normalized, reference_power_mean(rewards, mask, p=p, normalize=True), atol=1e-4)
  unnormalized = np.asarray(estimator("power_mean", p=p)(rewards, mask))
  assert np.all(np.isfinite(unnormalized))
  expected = reference_power_mean(rewards, mask, p=p)
  relative = lambda a: a / np.abs(a).max(axis=1, keepdims=True)
  assert_close(relative(unnormalized), relative(expected), atol=1e-5)


def test_maxrl_worked_example():
  # 0/1 rewards with success rate 1/4: (R - 1/4) / (1/4) = [3, -1, -1, -1].
  rewards = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
  np.testing.assert_allclose(
      advantages.maxrl_advantages(rewards, eps=0.0),
      [[3.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, -1.0, -1.0]],
      rtol=1e-6,
  )
  # A hard prompt (1 success in 4) weighs more than under GRPO, an easy one less.
  np.testing.assert_allclose(
      estimator("maxrl")(rewards)[:, 0], reference_maxrl(rewards)[:, 0], rtol=1e-6
  )


def test_maxrl_negative_reward_gives_nan():
  rewards = jnp.array([[1.0, -0.5, 2.0], [1.0, 0.5, 2.0]])
  got = np.asarray(estimator("maxrl")(rewards))
  assert np.all(np.isnan(got[0])) and np.all(np.isfinite(got[1]))


# ---------------------------------------------------------------------------------------
# One rule for non-finite input, for every estimator in the registry.

ALL_ESTIMATORS = sorted(advantages.ADVANTAGE_ESTIMATORS)


def test_configs_cover_every_estimator():
  assert {name for name, _ in CONFIGS} == set(ALL_ESTIMATORS)


@SETTINGS
@hypothesis.given(
    name=st.sampled_from(ALL_ESTIMATORS),
    seed=st.integers(0, 2**16),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_non_finite_valid_reward_gives_nan_and_masked_garbage_nothing(name, seed, bad):
  fn = estimator(name, **REQUIRED.get(name, {}))
  rewards, mask = random_case(seed, name=name)
  clean = np.asarray(fn(rewards, mask))
  assert np.all(np.isfinite(clean))
  rng = np.random.default_rng(seed)
  # Masked garbage changes nothing, to the bit.
  garbage = rewards.copy()
  garbage[~mask] = bad
  np.testing.assert_array_equal(fn(garbage, mask), clean)
  # A non-finite valid reward: NaN on every valid entry of its group (of the batch
  # for batch_std), never a plausible zero; masked entries 0; other groups unchanged.
  group = rng.choice([0, 1, 3])  # a random, an all-equal and a one-valid group
  poisoned = rewards.copy()
  poisoned[group, rng.choice(np.flatnonzero(mask[group]))] = bad
  got = np.asarray(fn(poisoned, mask))
  rows = np.arange(B) if name == "batch_std" else np.array([group])
  others = np.setdiff1d(np.arange(B), rows)
  assert np.all(np.isnan(got[rows][mask[rows]])), (name, got[rows])
  np.testing.assert_array_equal(got[~mask], 0.0)
  np.testing.assert_array_equal(got[others], clean[others])


# ---------------------------------------------------------------------------------------
# Registry, static checks, hyperparameter checks.


def test_registry_names_and_lookup():
  assert set(advantages.ADVANTAGE_ESTIMATORS) == {
      "grpo",
      "gmpo",
      "dr_grpo",
      "rloo",
      "batch_std",
      "power_mean",
      "maxrl",
  }
  assert set(advantages.ADVANTAGE_ESTIMATORS) == set(REFERENCES)
  rewards, mask = random_case(seed=4)
  fn = advantages.get_advantage_fn("gmpo", normalize=True, floor=1e-4)
  np.testing.assert_array_equal(
      fn(rewards, mask), advantages.gmpo_advantages(rewards, mask, normalize=True, floor=1e-4)
  )


def test_get_advantage_fn_errors_list_the_valid_choices():
  with pytest.raises(
      ValueError,
      match=r"'ppo'.*\['batch_std', 'dr_grpo', 'gmpo', 'grpo', 'maxrl', 'power_mean', 'rloo'\]",
  ):
    advantages.get_advantage_fn("ppo")
  with pytest.raises(ValueError, match=r"'power_mean' needs hyperparameter\(s\) \['p'\]"):
    advantages.get_advantage_fn("power_mean", normalize=True)
  with pytest.raises(ValueError, match=r"\['floor'\].*\['normalize', 'eps'\]"):
    advantages.get_advantage_fn("grpo", floor=1e-8)
  with pytest.raises(ValueError, match=r"\['normalize'\].*valid: none"):
    advantages.get_advantage_fn("rloo", normalize=True)


@pytest.mark.parametrize("name", sorted(advantages.ADVANTAGE_ESTIMATORS))
def test_static_checks(name):
  fn = advantages.get_advantage_fn(name, **REQUIRED.get(name, {}))
  with pytest.raises(AssertionError, match="rank"):
    fn(jnp.ones((4,)))
  with pytest.raises(AssertionError, match="type"):
    fn(jnp.ones((2, 4), jnp.int32))
  with pytest.raises(AssertionError, match="shape"):
    fn(jnp.ones((2, 4)), jnp.ones((2, 3), bool))
  with pytest.raises(AssertionError, match="type"):
    fn(jnp.ones((2, 4)), jnp.ones((2, 4), jnp.float32))


def test_invalid_hyperparameters_raise():
  rewards = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="eps"):
    advantages.grpo_advantages(rewards, eps=-1.0)
  with pytest.raises(ValueError, match="floor"):
    advantages.gmpo_advantages(rewards, floor=0.0)
  with pytest.raises(ValueError, match="floor"):
    advantages.gmpo_advantages(rewards, floor=1e-50)  # flushes to 0 in float32
  with pytest.raises(ValueError, match="floor"):
    advantages.power_mean_advantages(rewards, p=0.5, floor=0.0)
  with pytest.raises(ValueError, match="p must be a finite"):
    advantages.power_mean_advantages(rewards, p=float("nan"))
  with pytest.raises(ValueError, match="eps"):
    advantages.maxrl_advantages(rewards, eps=-1e-6)


# ---------------------------------------------------------------------------------------
# validate_rewards.


def test_validate_rewards_accepts_and_returns_numpy():
  rewards = [[1.0, 2.0], [3.0, 4.0]]
  out = advantages.validate_rewards(rewards, require_positive=True)
  assert isinstance(out, np.ndarray) and out.dtype == np.float64
  np.testing.assert_array_equal(out, rewards)
  ints = advantages.validate_rewards(np.array([[1, 0]]), require_positive=False)
  assert ints.dtype == np.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_rewards_names_the_non_finite_group(bad):
  rewards = np.ones((4, 3), np.float32)
  rewards[2, 1] = bad
  with pytest.raises(ValueError, match=r"(?s)Non-finite.*group 2: positions \[1\]"):
    advantages.validate_rewards(rewards, require_positive=False)
  with pytest.raises(ValueError, match=r"group 2 \('prompt-c'\)"):
    advantages.validate_rewards(
        rewards, require_positive=False, group_names=["prompt-a", "prompt-b", "prompt-c", "d"]
    )
  # A masked-out NaN is padding, not an error.
  mask = np.ones((4, 3), bool)
  mask[2, 1] = False
  advantages.validate_rewards(rewards, mask, require_positive=False)


def test_validate_rewards_require_positive():
  rewards = np.array([[1.0, 2.0], [0.5, 0.0], [-1.0, 3.0]])
  with pytest.raises(
      ValueError,
      match=r"(?s)R \+ offset <= 0.*2 group\(s\).*group 1: positions \[1\].*group 2: positions \[0\]",
  ):
    advantages.validate_rewards(rewards, require_positive=True)
  advantages.validate_rewards(rewards, require_positive=False)
  advantages.validate_rewards(rewards, require_positive=True, offset=1.5)
  with pytest.raises(ValueError, match="group 2"):
    advantages.validate_rewards(rewards, require_positive=True, offset=1.0)


def test_validate_rewards_shape_errors():
  with pytest.raises(ValueError, match="rank 2"):
    advantages.validate_rewards(np.ones(3), require_positive=False)
  with pytest.raises(ValueError, match="mask"):
    advantages.validate_rewards(np.ones((2, 3)), np.ones((2, 2), bool), require_positive=False)
  with pytest.raises(ValueError, match="mask"):
    advantages.validate_rewards(np.ones((2, 3)), np.ones((2, 3)), require_positive=False)
  with pytest.raises(ValueError, match="group_names"):
    advantages.validate_rewards(np.ones((2, 3)), require_positive=False, group_names=["a"])


def test_validate_rewards_require_non_negative():
  rewards = np.array([[1.0, 0.0], [0.5, -0.25]])
  with pytest.raises(ValueError, match=r"(?s)Negative rewards.*MaxRL.*group 1: positions \[1\]"):
    advantages.validate_rewards(rewards, require_positive=False, require_non_negative=True)
  advantages.validate_rewards(rewards[:1], require_positive=False, require_non_negative=True)
  mask = np.array([[True, True], [True, False]])
  advantages.validate_rewards(rewards, mask, require_positive=False, require_non_negative=True)


@pytest.mark.parametrize(
    ("name", "hyperparameters", "domain"),
    [
        ("gmpo", {}, "positive"),
        ("power_mean", {"p": -0.5}, "positive"),
        ("power_mean", {"p": 0.0}, "positive"),
        ("power_mean", {"p": 0.5}, "real"),
        ("maxrl", {}, "non_negative"),
        ("grpo", {"normalize": False}, "real"),
    ],
)
def test_reward_domain_and_the_runner_default(name, hyperparameters, domain):
  from gmpo_jax.config import AlgorithmConfig

  assert advantages.reward_domain(name, **hyperparameters) == domain
  algo = AlgorithmConfig(advantage=name, advantage_kwargs=tuple(sorted(hyperparameters.items())))
  assert algo.require_positive_rewards == (domain == "positive")
  with pytest.raises(ValueError, match="needs hyperparameter"):
    advantages.reward_domain("power_mean")
