"""Tests of the reward-distribution study (experiments/reward_study).

The quick run (`--quick`: one environment, 30 steps, 3 seeds) is executed once per
module and shared by the tests that read its outputs.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reward_study import envs, run, study

LN10 = math.log(10.0)


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('reward_study')
  result = run.main(['--quick', '--out', str(out)])
  return out, result


def _rows(summary, rewards):
  (example,) = [e for e in summary['checks']['worked_examples'] if e['rewards'] == rewards]
  return {row['method']: row for row in example['rows']}


class TestQuickRun:

  def test_writes_outputs(self, quick):
    out, result = quick
    for name in ('results.md', 'results.json', 'advantage_scatter.png', 'curves_uniform.png'):
      assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / 'results.json').read_text())
    assert list(summary['envs']) == ['uniform']
    assert (
        summary['checks']['binary_identities'] == result['summary']['checks']['binary_identities']
    )
    rows = summary['envs']['uniform']['runs']
    assert len(rows) == len(study.METHODS) * len(study.OBJECTIVES)
    markdown = (out / 'results.md').read_text()
    assert '| log d=1e-8 | geometric |' in markdown
    assert 'python -m experiments.reward_study --quick' in markdown

  def test_every_method_improves_on_the_easy_env(self, quick):
    _, result = quick
    _, train = result['raw']['uniform']
    arith = train.arith_score[..., 0]  # [M, O, S, steps + 1]
    # Uniform policy: E[R] = 0.8 between the extremes 0.35 and 1.25, score 0.5.
    np.testing.assert_allclose(arith[..., 0], 0.5, atol=1e-5)
    assert np.all(arith[..., -1] > 0.7), arith[..., -1]

  def test_vmapped_seeds_differ(self, quick):
    _, result = quick
    _, train = result['raw']['uniform']
    spread = np.ptp(train.arith_score[..., 1:, 0], axis=2)  # over seeds: [M, O, steps]
    assert np.all(spread.max(axis=-1) > 1e-3)

  def test_worked_example_of_the_founding_document(self, quick):
    summary = quick[1]['summary']
    rows = _rows(summary, [10.0, 10.0, 10.0, 1000.0])
    base = np.array([-0.5, -0.5, -0.5, 1.5])
    np.testing.assert_allclose(rows['GRPO']['advantages'], base, rtol=1e-5)
    np.testing.assert_allclose(rows['Dr.GRPO']['advantages'], [-247.5] * 3 + [742.5], rtol=1e-6)
    np.testing.assert_allclose(rows['log d=1e-8']['advantages'], LN10 * base, rtol=1e-5)
    # Two distinct values: every normalized estimator gives the same advantages,
    # and the log baseline penalizes the three ordinary samples as GRPO does.
    np.testing.assert_allclose(rows['log-norm d=1e-8']['advantages'], base, rtol=1e-5)
    assert rows['GRPO']['negative'] == rows['log d=1e-8']['negative'] == 3

  def test_samples_between_the_means_are_penalized_only_by_grpo(self, quick):
    rows = _rows(quick[1]['summary'], [1.0, 5.0, 10.0, 20.0, 30.0, 1000.0])
    # Median 15, geometric mean 17.6, arithmetic mean 177.7: 20 and 30 lie between.
    for method in ('GRPO', 'Dr.GRPO', 'RLOO'):
      assert (rows[method]['penalized'], rows[method]['above_median']) == (2, 3)
    for method in ('log d=1e-8', 'log-norm d=1e-8'):
      assert (rows[method]['penalized'], rows[method]['above_median']) == (0, 3)

  def test_the_floor_dominates_zero_rewards(self, quick):
    rows = _rows(quick[1]['summary'], [0.0, 1.0, 50.0, 100.0])
    log = np.asarray(rows['log d=1e-8']['advantages'])
    # log(1e-8) = -18.4 against log 1 = 0: one passed test counts as "good".
    assert log[1] > 0 > rows['GRPO']['advantages'][1]
    assert log[1] - log[0] > 4 * (log[3] - log[1])

  def test_advantage_identities_and_scale_invariance(self, quick):
    checks = quick[1]['summary']['checks']
    assert all(v < 1e-5 for v in checks['binary_identities'].values())
    scale = checks['scale_invariance']
    deviation = {
        r['method']: dict(zip(scale['scales'], r['max_relative_deviation'])) for r in scale['rows']
    }
    for method in ('log d=1e-8', 'log-norm d=1e-8'):
      assert deviation[method][1e-3] < 1e-5 and deviation[method][1e3] < 1e-5
    np.testing.assert_allclose(deviation['Dr.GRPO'][1e3], 999, rtol=1e-4)
    # The offset breaks it: log(1000 R + 1) - log(R + 1) is not a constant.
    assert deviation['log(R+1)'][1e3] > 0.1
    # Unnormalized power means scale as c^p; normalized ones and MaxRL are invariant
    # up to their eps (MaxRL's eps sits next to the mean: visible at c = 1e-3).
    for method in ('pow-norm p=0.5', 'pow-norm p=-0.5', 'MaxRL'):
      assert deviation[method][1e3] < 1e-4, method
    np.testing.assert_allclose(deviation['pow p=0.5'][1e3], 1e3**0.5 - 1, rtol=1e-4)
    np.testing.assert_allclose(deviation['pow p=-0.5'][1e-3], 1e-3**-0.5 - 1, rtol=1e-4)

  def test_power_mean_family_reduces_to_its_ends(self, quick):
    checks = quick[1]['summary']['checks']
    # p = 1 is Dr.GRPO (normalized: GRPO), p -> 0 the log baseline.
    assert set(checks['power_mean_ends']) == {
        'pow p=1 vs Dr.GRPO',
        'pow-norm p=1 vs GRPO',
        'pow p=1e-6 vs log d=1e-8',
        'pow-norm p=1e-6 vs log-norm d=1e-8',
    }
    assert all(v < 2e-5 for v in checks['power_mean_ends'].values()), checks
    assert 'pow p=-0.5 vs 19998 x Dr.GRPO' in checks['binary_identities']

  def test_the_power_decides_who_is_penalized(self, quick):
    rows = _rows(quick[1]['summary'], [1.0, 5.0, 10.0, 20.0, 30.0, 1000.0])
    # Power means of this group: M_1 = 177.7 > M_0.5 = 64.0 > 20, 30 > M_0 = 17.6 >
    # M_-0.5 = 7.4. The baseline falls with p, and with it the penalized count.
    for method in ('pow p=0.5', 'pow-norm p=0.5', 'MaxRL'):
      assert (rows[method]['penalized'], rows[method]['above_median']) == (2, 3), method
    for method in ('pow p=-0.5', 'pow-norm p=-0.5'):
      assert (rows[method]['penalized'], rows[method]['above_median']) == (0, 3), method
    assert (
        rows['pow p=-0.5']['negative']
        < rows['log d=1e-8']['negative']
        < rows['pow p=0.5']['negative']
    )
    # MaxRL is Dr.GRPO divided by the group mean.
    np.testing.assert_allclose(
        np.multiply(rows['MaxRL']['advantages'], 1066 / 6), rows['Dr.GRPO']['advantages'], rtol=1e-5
    )


# A few sequences per environment: all A, all B, all D, and ABCD.
_SEQUENCES = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [3, 3, 3, 3], [0, 1, 2, 3]])
_SEQUENCE_INDEX = _SEQUENCES @ (envs.VOCAB_SIZE ** np.arange(envs.NUM_TOKENS)[::-1])


@pytest.mark.parametrize('env', envs.study_envs(), ids=lambda env: env.name)
def test_exact_moments_match_monte_carlo(env):
  num = 20_000
  tokens = np.broadcast_to(
      np.repeat(_SEQUENCES, num, axis=0), (env.num_contexts, len(_SEQUENCES) * num, envs.NUM_TOKENS)
  )
  rewards = np.asarray(
      jax.jit(env.sample)(jax.random.key(1), jnp.asarray(tokens)), np.float64
  ).reshape(env.num_contexts, len(_SEQUENCES), num)
  # MaxRL needs R >= 0 and the study runs it everywhere; only counts and binary
  # have zeros, which the log and power-mean (p <= 0) rows clamp to their floor.
  assert rewards.min() >= 0
  assert (rewards.min() > 0) == (env.name not in ('counts', 'binary')), env.name
  tables = env.exact_tables()
  for values, table in (
      (rewards, tables.mean_reward),
      (np.log(rewards + env.geo_offset), tables.mean_log_reward),
  ):
    se = values.std(axis=-1, ddof=1) / math.sqrt(num)
    z = (values.mean(axis=-1) - table[:, _SEQUENCE_INDEX]) / se
    assert np.all(np.abs(z) < 5), z


def test_optima_are_as_designed():
  by_name = {env.name: env for env in envs.study_envs()}
  expected = {
      'uniform': ('AAAA', 'AAAA'),
      'lognormal': ('AAAA', 'AAAA'),
      'kelly': ('BBBB', 'AAAA'),
      'pareto': ('AAAA', 'AAAA'),
      'product': ('AAAA', 'AAAA'),
      'counts': ('AAAA', 'BBBB'),
      'binary': ('AAAA', 'AAAA'),
      'multiscale': ('AAAA', 'AAAA'),
  }
  for name, (arith, geo) in expected.items():
    tables = by_name[name].exact_tables()
    sequences = envs.all_sequences()
    for c in range(by_name[name].num_contexts):
      types = by_name[name].token_types()[c]
      label = lambda n: ''.join(envs.TYPE_NAMES[t] for t in types[sequences[n]])
      assert label(tables.mean_reward[c].argmax()) == arith, name
      assert label(tables.mean_log_reward[c].argmax()) == geo, name


def test_scorer_matches_numpy_reference():
  env = envs.study_envs()[2]  # kelly: the two objectives disagree.
  score = jax.jit(study.make_scorer(env))
  tables = env.exact_tables()
  logits = np.random.default_rng(0).normal(size=(1, envs.NUM_TOKENS, envs.VOCAB_SIZE))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  sequences = envs.all_sequences()
  prob = np.exp(logp[0, np.arange(envs.NUM_TOKENS), sequences].sum(-1))
  got = score(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(got.sequence_prob[0], prob, rtol=1e-5)
  for value, table in ((got.arith, tables.mean_reward), (got.geo, tables.mean_log_reward)):
    expected = (prob @ table[0] - table[0].min()) / (table[0].max() - table[0].min())
    np.testing.assert_allclose(value[0], expected, rtol=1e-5)
  # A deterministic policy on the E[R]-optimal sequence BBBB scores 1 there.
  one_hot = np.full((1, envs.NUM_TOKENS, envs.VOCAB_SIZE), -30.0)
  one_hot[..., 1] = 30.0
  np.testing.assert_allclose(score(jnp.asarray(one_hot, jnp.float32)).arith, [1.0], rtol=1e-5)


def test_penalized_counts():
  rewards = jnp.array([[1.0, 5.0, 10.0, 20.0, 30.0, 1000.0], [2.0] * 6])
  advantage = jnp.array([[-3.0, -2.0, -1.0, -0.5, 0.5, 2.0], [0.0] * 6])
  penalized, above = study.penalized_counts(rewards, advantage)
  assert (int(penalized), int(above)) == (1, 3)


def test_objectives_share_the_on_policy_gradient():
  # make_diagnostics relies on it: at ratio 1 with equal lengths, token-clip
  # (token-mean) and geometric (seq-mean-token-mean) give the same gradient.
  rng = np.random.default_rng(1)
  params = jnp.asarray(rng.normal(size=(1, envs.NUM_TOKENS, envs.VOCAB_SIZE)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, envs.VOCAB_SIZE, (1, 6, envs.NUM_TOKENS)))
  advantage = jnp.asarray(rng.normal(size=6), jnp.float32)
  old = study.token_logprobs(params, tokens)[0]
  mask = jnp.ones(old.shape, bool)

  @jax.jit
  def gradients(params):
    return [
        jax.grad(
            lambda p, fn=o.loss_fn(): fn(study.token_logprobs(p, tokens)[0], old, advantage, mask)[
                0
            ]
        )(params)
        for o in study.OBJECTIVES
    ]

  token_clip, geometric = gradients(params)
  np.testing.assert_allclose(token_clip, geometric, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(token_clip))) > 1e-3


def test_config_validation():
  with pytest.raises(ValueError, match='group_size'):
    study.TrainConfig(env=envs.study_envs()[0], group_size=1)
  with pytest.raises(ValueError, match='mix_contexts'):
    envs.UniformEnv(name='x', summary='', context_scales=(1.0, 2.0), mix_contexts=True)
  with pytest.raises(ValueError, match='geo_offset'):
    envs.BinaryEnv(name='x', summary='', context_scales=(1.0, 2.0))
  with pytest.raises(ValueError, match='integers'):
    envs.BetaProductEnv(name='x', summary='', mean=(0.9, 0.57))
  with pytest.raises(ValueError, match='Unknown'):
    run.StudyConfig(stress_methods=('GRPO', 'PPO'))
