"""The compiled update step: micro-batch invariance and refusal of non-finite updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from learner_fixtures import CONFIG, N, T
from learner_fixtures import sequences as _sequences

from gmpo_jax.algo import importance
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import sequence_logprobs
from gmpo_jax.models.transformer import Transformer
from gmpo_jax.runner import build


def _model():
  return nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))


def _split(batch, m):
  return jax.tree.map(lambda x: x.reshape((m, N // m) + x.shape[1:]), batch)


@pytest.mark.parametrize(
    "objective,agg,kwargs",
    [
        ("geometric", None, ()),
        ("token_clip", "token-mean", ()),
        ("gspo", "seq-mean-token-sum-norm", ()),
        ("power_mean", None, (("p", -1.0),)),
    ],
)
def test_update_does_not_depend_on_the_micro_batch_split(objective, agg, kwargs):
  algo = AlgorithmConfig(objective=objective, objective_kwargs=kwargs, loss_agg_mode=agg, beta=0.02)
  graphdef, params = _model()
  optimizer = optax.sgd(1.0)
  update = learner.make_update_fn(
      graphdef,
      optimizer,
      build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T),
      donate=False,
  )
  batch = _sequences(seed=len(objective))
  results = [update(params, optimizer.init(params), _split(batch, m)) for m in (1, 2, 4)]
  p1, _, o1 = results[0]
  assert float(o1.grad_norm) > 0
  for p, _, o in results[1:]:
    np.testing.assert_allclose(o.loss, o1.loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(o.grad_norm, o1.grad_norm, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p, p1)


def test_non_finite_loss_leaves_parameters_and_optimizer_untouched():
  graphdef, params = _model()
  optimizer = optax.adam(1e-2)

  def poisoned(model, batch, counts):
    loss, metrics = learner.supervised_loss(chunk_size=4)(model, batch, counts)
    return loss * jnp.where(batch.advantages[0] > 0, jnp.nan, 1.0), metrics

  update = learner.make_update_fn(graphdef, optimizer, poisoned, donate=False)
  batch = _sequences(seed=3)
  opt_state = optimizer.init(params)
  bad = batch._replace(advantages=jnp.ones_like(batch.advantages))
  new_params, new_opt_state, out = update(params, opt_state, _split(bad, 1))
  assert int(out.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new_params, params)
  jax.tree.map(np.testing.assert_array_equal, new_opt_state, opt_state)

  good = batch._replace(advantages=-jnp.ones_like(batch.advantages))
  new_params, _, out = update(params, opt_state, _split(good, 1))
  assert int(out.skipped) == 0 and np.isfinite(float(out.loss))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params, params))
  assert any(changed)


def test_importance_correction_weighs_the_loss_and_reports_its_weights():
  graphdef, params = _model()
  optimizer = optax.sgd(1.0)
  batch = _sequences(seed=5)
  rng = np.random.default_rng(5)
  behav = batch.old_logp + jnp.asarray(rng.normal(0.0, 0.5, batch.old_logp.shape), jnp.float32)
  algo = AlgorithmConfig(is_correction="token_tis", is_cap=1.5)
  update = learner.make_update_fn(
      graphdef,
      optimizer,
      build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T),
      donate=False,
  )
  run = lambda behav_logp: update(
      params, optimizer.init(params), _split(batch._replace(behav_logp=behav_logp), 2)
  )[2]
  # Sampler and learner agree: every weight is 1 (all-ones weights leave the loss exactly
  # unchanged: test_losses).
  on_policy = run(batch.old_logp)
  assert on_policy.metrics.combine().as_record()["is/weight_max"] == 1.0
  # They disagree: the loss is reweighted, and the statistics are those of each micro-batch's
  # weights, averaged (the maximum: the largest).
  out = run(behav)
  assert not np.isclose(float(out.loss), float(on_policy.loss), rtol=1e-3)
  micro = [
      importance.correction_weights(
          b.old_logp, b.behav_logp, b.loss_mask, mode="token_tis", cap=1.5
      )[1]
      for b in (
          jax.tree.map(lambda x, i=i: x[i], _split(batch._replace(behav_logp=behav), 2))
          for i in range(2)
      )
  ]
  record = out.metrics.combine().as_record()
  np.testing.assert_allclose(
      record["is/weight_mean"], np.mean([s.weight_mean for s in micro]), rtol=1e-6
  )
  assert record["is/weight_max"] == 1.5 and record["is/masked_fraction"] == 0.0
  # Without a correction nothing is computed or logged; with one, the sampler's log-probs
  # are required.
  model = nnx.merge(graphdef, params)
  counts = learner.minibatch_counts(batch.loss_mask)
  plain = build.policy_loss(AlgorithmConfig(), temperature=1.0, chunk_size=4, max_length=T)
  assert jax.eval_shape(plain, model, batch, counts)[1].importance is None
  with pytest.raises(ValueError, match="needs the sampler's log-probs"):
    jax.eval_shape(
        build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T), model, batch, counts
    )


def test_on_policy_update_equals_the_rescored_one_without_reading_old_logp():
  algo = AlgorithmConfig(
      objective="token_clip", loss_agg_mode="token-mean", is_correction="token_tis"
  )
  graphdef, params = _model()
  optimizer = optax.sgd(1.0)
  batch = _sequences(seed=11)
  # The learner's own log-probs at these parameters: what the runner's rescoring returns.
  rescored = sequence_logprobs(
      nnx.merge(graphdef, params), batch.tokens, batch.positions, batch.key_mask, chunk_size=4
  )
  behav = jnp.where(
      batch.loss_mask,
      rescored
      + 0.05 * jnp.asarray(np.random.default_rng(0).normal(size=rescored.shape), jnp.float32),
      0.0,
  )

  def update(on_policy, old_logp):
    fn = learner.make_update_fn(
        graphdef,
        optimizer,
        build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T, on_policy=on_policy),
        donate=False,
    )
    return fn(
        params,
        optimizer.init(params),
        _split(batch._replace(old_logp=old_logp, behav_logp=behav), 1),
    )

  p_on, _, on = update(True, None)
  p_off, _, off = update(False, rescored)
  assert float(on.grad_norm) > 0
  np.testing.assert_allclose(on.loss, off.loss, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(on.grad_norm, off.grad_norm, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_on, p_off)
  # pi_old is the current policy itself: every ratio is exactly 1.
  assert float(on.metrics.extras.ratio_min) == float(on.metrics.extras.ratio_max) == 1.0
  np.testing.assert_allclose(
      on.metrics.importance.weight_mean, off.metrics.importance.weight_mean, rtol=1e-5
  )
  # The sampler/learner drift, measured in the update: k3 of the two log-probs.
  x = np.where(batch.loss_mask, np.asarray(rescored, np.float64) - np.asarray(behav), 0.0)
  k3 = (np.exp(x) - x - 1)[np.asarray(batch.loss_mask)].mean()
  np.testing.assert_allclose(on.metrics.mismatch_kl, k3, rtol=1e-3)
  assert off.metrics.mismatch_kl is None


def test_metrics_combine_on_the_host_stays_numpy_and_matches_the_device(backend_compiles):
  graphdef, params = _model()
  optimizer = optax.sgd(1.0)
  algo = AlgorithmConfig(is_correction="token_tis", is_cap=1.5)
  update = learner.make_update_fn(
      graphdef,
      optimizer,
      build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T),
      donate=False,
  )
  batch = _sequences(seed=11)
  rng = np.random.default_rng(11)
  behav = batch.old_logp + jnp.asarray(rng.normal(0.0, 0.5, batch.old_logp.shape), jnp.float32)
  metrics = [
      update(
          params,
          optimizer.init(params),
          _split(batch._replace(behav_logp=behav, advantages=sign * batch.advantages), 2),
      )[2].metrics
      for sign in (1.0, -1.0, 0.5)
  ]
  stacked = jax.tree.map(lambda *v: np.stack(v), *jax.device_get(metrics))
  backend_compiles.clear()
  host = stacked.combine()
  assert not backend_compiles  # NumPy all the way
  device = jax.jit(learner.PolicyMetrics.combine)(stacked)
  assert all(isinstance(x, (np.ndarray, np.generic)) for x in jax.tree.leaves(host))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), host, device)
  assert host.extras.ratio_max == stacked.extras.ratio_max.max()
  assert host.importance.weight_max == stacked.importance.weight_max.max()


def test_learner_programs_compile_without_fusion_emitters_on_the_cpu_to_the_same_values():
  assert learner.compilation.learner_compiler_options("cpu") == {
      "xla_cpu_use_fusion_emitters": False
  }
  assert learner.compilation.learner_compiler_options("tpu") is None
  assert learner.compilation.learner_compiler_options("gpu") is None
  graphdef, params = _model()
  optimizer = optax.adamw(1e-2)
  algo = AlgorithmConfig(objective="geometric", beta=0.02)
  micro_loss = build.policy_loss(algo, temperature=0.7, chunk_size=4, max_length=T)
  lean = learner.make_update_fn(graphdef, optimizer, micro_loss, donate=False)
  default = jax.jit(learner.update_step(graphdef, optimizer, micro_loss))
  batch = _split(_sequences(seed=13), 2)
  opt_state = optimizer.init(params)
  (p_lean, s_lean, o_lean), (p_default, s_default, o_default) = (
      f(params, opt_state, batch) for f in (lean, default)
  )
  # Equal bits on some CPUs (the 2-core Intel Xeon); on the AMD EPYC machines the two
  # programs fuse differently and round differently, within float32 noise.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, p_lean, p_default)
  jax.tree.map(close, s_lean, s_default)
  np.testing.assert_allclose(o_lean.loss, o_default.loss, rtol=1e-6)
  np.testing.assert_allclose(o_lean.grad_norm, o_default.grad_norm, rtol=1e-5)
  assert float(o_lean.grad_norm) > 0
