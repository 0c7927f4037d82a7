"""Tests for gmpo_jax.algo.reward_shape: diagnostics against float64 references, the advisor's rules,
and its calibration on the reward study's environments."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

import gmpo_jax
from experiments.reward_study import envs
from gmpo_jax.algo import reward_shape

KEYS = (
    "groups",
    "zero_std_group_fraction",
    "non_positive_fraction",
    "non_finite_fraction",
    "log10_span_mean",
    "log10_span_max",
    "tail_index",
    "skewness",
)


def reference_hill(samples):
  """Hill 1975: 1 / alpha = mean_{i <= k} log(x_(i) / x_(k+1)), k = n // 10."""
  x = np.sort(np.asarray(samples, np.float64))[::-1]
  k = x.size // 10
  return 1.0 / np.mean(np.log(x[:k] / x[k]))


def test_diagnostics_of_a_hand_made_batch():
  rewards = np.array(
      [
          [10.0, 10.0, 10.0, 1000.0],  # the founding document's example
          [1.0, 2.0, 3.0, 4.0],
          [0.0, 1.0, 0.0, 1.0],  # binary: half non-positive
          [5.0, 5.0, 5.0, 5.0],  # no spread
          [np.nan, 7.0, -3.0, 2.0],  # NaN masked out below
      ]
  )
  mask = np.ones(rewards.shape, bool)
  mask[4, 0] = False
  got = gmpo_jax.reward_diagnostics(rewards, mask)
  assert sorted(got) == sorted("reward_shape/" + k for k in KEYS)
  assert all(type(v) is float for v in got.values())
  spans = [2.0, math.log10(4.0), 0.0, 0.0, math.log10(7.0 / 2.0)]
  skews = [stats.skew(rewards[b, mask[b]]) for b in (0, 1, 2, 4)]
  np.testing.assert_allclose(
      [got["reward_shape/" + k] for k in KEYS[:6] + KEYS[7:]],
      [5, 1 / 5, 3 / 19, 0.0, np.mean(spans), 2.0, np.mean(skews)],
      rtol=1e-12,
  )
  assert math.isnan(got["reward_shape/tail_index"])  # 16 positive rewards < 20


def test_masked_entries_change_nothing_and_non_finite_are_counted():
  rng = np.random.default_rng(0)
  rewards = rng.lognormal(0.0, 1.0, (16, 8))
  mask = rng.uniform(size=rewards.shape) < 0.7
  clean = reward_shape.reward_diagnostics(rewards, mask)
  dirty = np.where(mask, rewards, rng.choice([np.nan, np.inf, -5.0], size=rewards.shape))
  assert reward_shape.reward_diagnostics(dirty, mask) == clean
  # A valid NaN is left out of the statistics and reported.
  with_nan = rewards.copy()
  with_nan[0, 0] = np.nan
  mask[0, 0] = True
  got = reward_shape.reward_diagnostics(with_nan, mask)
  assert got["reward_shape/non_finite_fraction"] == 1 / mask.sum()
  without = mask.copy()
  without[0, 0] = False
  expected = reward_shape.reward_diagnostics(rewards, without)
  for key in expected:
    if key != "reward_shape/non_finite_fraction":
      assert got[key] == expected[key], key


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_tail_index_recovers_a_pareto_tail(alpha):
  rng = np.random.default_rng(int(alpha))
  rewards = rng.pareto(alpha, (500, 8)) + 1.0  # P(R > r) = r^-alpha, r >= 1
  got = reward_shape.reward_diagnostics(rewards)["reward_shape/tail_index"]
  normalized = np.concatenate([row / np.median(row) for row in rewards])
  np.testing.assert_allclose(got, reference_hill(normalized), rtol=1e-12)
  np.testing.assert_allclose(got, alpha, rtol=0.15)  # 400 order statistics


def test_shape_errors():
  with pytest.raises(ValueError, match="rank 2"):
    reward_shape.reward_diagnostics(np.ones(4))
  with pytest.raises(ValueError, match="mask"):
    reward_shape.reward_diagnostics(np.ones((2, 3)), np.ones((2, 3)))


def _diagnostics(**values):
  base = dict(
      groups=8.0,
      zero_std_group_fraction=0.0,
      non_positive_fraction=0.0,
      non_finite_fraction=0.0,
      log10_span_mean=1.0,
      log10_span_max=2.0,
      tail_index=10.0,
      skewness=0.5,
  )
  base.update(values)
  return {"reward_shape/" + k: float(v) for k, v in base.items()}


@pytest.mark.parametrize(
    "values, name, cited",
    [
        (dict(zero_std_group_fraction=1.0), "grpo", "dynamic_sampling"),
        (dict(groups=0.0, zero_std_group_fraction=math.nan), "grpo", "dynamic_sampling"),
        (dict(non_positive_fraction=0.3, tail_index=1.0), "grpo", "counts: E[R] score 0.550"),
        (dict(tail_index=1.2), "gmpo", "lognormal E[R] score 0.976"),
        (dict(tail_index=1.2, zero_std_group_fraction=0.6), "gmpo", "dynamic_sampling"),
        (dict(tail_index=9.0), "grpo", "multiscale"),
        (dict(tail_index=math.nan), "grpo", "too few to measure a tail"),
    ],
)
def test_recommendation_rules(values, name, cited):
  got, reason = gmpo_jax.recommend_advantage(_diagnostics(**values))
  assert got == name and got in gmpo_jax.ADVANTAGE_ESTIMATORS
  assert cited in reason and "\n" not in reason


def _study_rewards(env, seeds, prompts=64, group=8):
  """Rewards at the study's initial (uniform) policy: [seeds, prompts, group].

  One batched (vmapped) eager call per environment: compiling it costs more than it saves.
  """
  repeats = seeds * (prompts // env.num_contexts)
  tokens_key, reward_key = jax.random.split(jax.random.PRNGKey(0))
  tokens = jax.random.randint(
      tokens_key, (repeats, env.num_contexts, group, envs.NUM_TOKENS), 0, envs.VOCAB_SIZE
  )
  rewards = jax.vmap(env.sample)(jax.random.split(reward_key, repeats), tokens)
  return np.asarray(rewards).reshape(seeds, -1, group)


def test_advisor_on_the_reward_study_environments():
  # The study measured the (normalized) log baseline ahead on lognormal and pareto and
  # nothing to gain on the light-tailed uniform and multiscale rewards; the advisor must
  # tell them apart from the rewards alone (counts and binary stop at the zeros rule).
  expected = {"uniform": "grpo", "lognormal": "gmpo", "pareto": "gmpo", "multiscale": "grpo"}
  for env in envs.study_envs():
    if env.name in expected:
      for seed, rewards in enumerate(_study_rewards(env, seeds=4)):
        diagnostics = reward_shape.reward_diagnostics(rewards)
        name, reason = reward_shape.recommend_advantage(diagnostics)
        assert name == expected[env.name], (env.name, seed, diagnostics, reason)
