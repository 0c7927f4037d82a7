"""Mixed precision that trains: float32 masters under bfloat16 compute, stochastic rounding for
bfloat16 storage, float32 gradient accumulation, the update's footprint metrics, the sampler's
bfloat16 copy, and the configs that choose them.

The model is the tiny one at N(0, 0.02²) weights with bfloat16 compute; the optimizer is the
runner's (`build.make_optimizer`: clip, AdamW) at the GMPO paper's lr 1e-6 from its first step,
with the qwen configs' weight decay.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default as default_config
from configs import qwen2_5_0_5b, qwen2_5_math
from gmpo_jax.config import ConfigError, ExperimentConfig, OptimConfig
from gmpo_jax.infra import sharding
from gmpo_jax.learner import precision
from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.runner import build

N, T = 8, 10
OPTIM = OptimConfig(
    learning_rate=1e-6,
    warmup_steps=0,
    end_lr_fraction=1.0,
    max_grad_norm=1.0,
    b1=0.9,
    b2=0.999,
    weight_decay=0.01,
)


def _model(param_dtype, dtype="bfloat16"):
  config = dataclasses.replace(
      TransformerConfig.from_name("tiny"), param_dtype=param_dtype, dtype=dtype
  )
  return nnx.split(Transformer(config, rngs=nnx.Rngs(0)))


def _batch(num_microbatches=1, n=N, seed=0):
  """A supervised batch [M, n / M, T]: a prompt of 2-4 tokens, then 1-5 trained tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 128, (n, T)).astype(np.int32)
  prompt = rng.integers(2, 5, n)
  length = prompt + rng.integers(1, T - 4, n)
  cols = np.arange(T)[None]
  key_mask = cols < length[:, None]
  zeros = jnp.zeros((n, T), jnp.float32)
  batch = learner.Batch(
      tokens=jnp.asarray(tokens),
      positions=positions_from_mask(jnp.asarray(key_mask)),
      key_mask=jnp.asarray(key_mask),
      loss_mask=jnp.asarray(key_mask & (cols >= prompt[:, None])),
      old_logp=zeros,
      ref_logp=zeros,
      advantages=jnp.zeros((n,), jnp.float32),
  )
  return jax.tree.map(lambda x: learner.to_microbatches(x, num_microbatches), batch)


LOSS = learner.supervised_loss(chunk_size=4)


def _one_update(graphdef, params, optimizer, batch=None, opt_state=None):
  update = learner.make_update_fn(graphdef, optimizer, LOSS, donate=False)
  opt_state = optimizer.init(precision.float32_view(params)) if opt_state is None else opt_state
  return update(params, opt_state, _batch() if batch is None else batch)


def _gradient(graphdef, params, batch):
  """The step's gradient, computed on its own: which entries the update's gradient reaches."""
  counts = learner.minibatch_counts(batch.loss_mask)
  grad_fn = jax.grad(lambda p, micro: LOSS(nnx.merge(graphdef, p), micro, counts)[0])
  return jax.tree.map(
      lambda *g: sum(g),
      *[
          grad_fn(params, jax.tree.map(lambda x, i=i: x[i], batch))
          for i in range(batch.tokens.shape[0])
      ],
  )


def _changed_fraction(old, new, grads):
  """Of the entries with a nonzero gradient, the fraction whose stored value changed."""
  reached = changed = 0
  for o, n, g in zip(*(jax.tree.leaves(t) for t in (old, new, grads))):
    mask = np.asarray(g) != 0
    reached += mask.sum()
    changed += (np.asarray(n) != np.asarray(o))[mask].sum()
  return changed / reached


class TestStochasticRounding:

  def test_picks_a_bfloat16_neighbour_and_is_unbiased(self):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=512) * 10.0 ** rng.uniform(-6, 3, 512)).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 4096)
    samples = np.asarray(
        jax.vmap(lambda k: precision.stochastic_round_to_bfloat16(jnp.asarray(x), k))(keys).astype(
            jnp.float32
        ),
        np.float64,
    )
    # The two neighbours: truncation of the float32 bits, and the next bfloat16 away from 0.
    toward_zero = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    away = ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    lo, hi = np.minimum(toward_zero, away).astype(np.float64), np.maximum(toward_zero, away)
    assert np.all((samples == lo) | (samples == hi))
    p_hi = (x - lo) / (hi - lo)
    std = (hi - lo) * np.sqrt(p_hi * (1 - p_hi) / len(keys))
    z = (samples.mean(axis=0) - x) / np.maximum(std, 1e-300)
    assert np.all(np.abs(z[std > 0]) < 5.5), np.abs(z).max()
    # Round-to-nearest fails the same test: a quarter ulp above 1 always rounds to 1.
    quarter = np.float32(1 + 2.0**-9)
    assert float(jnp.asarray(quarter).astype(jnp.bfloat16)) == 1.0
    rounded = jax.vmap(lambda k: precision.stochastic_round_to_bfloat16(jnp.full((), quarter), k))(
        keys
    ).astype(jnp.float32)
    np.testing.assert_allclose(float(rounded.mean()), quarter, atol=3 * 2.0**-7 / 64)

  def test_exact_values_stay_exact(self):
    x = jnp.asarray(np.array([0.0, -0.0, 1.0, -0.375, 2.0**-100, np.inf, -np.inf], np.float32))
    for seed in range(4):
      out = precision.stochastic_round_to_bfloat16(x, jax.random.key(seed))
      np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x))


class TestOneUpdateAtLearningRate1e6:
  """One update at lr 1e-6 with bfloat16 compute changes the stored parameters."""

  def test_float32_masters_change_99_percent_of_the_entries_with_a_gradient(self):
    graphdef, params = _model("float32")
    new, _, out = _one_update(graphdef, params, build.make_optimizer(OPTIM, 10))
    fraction = _changed_fraction(params, new, _gradient(graphdef, params, _batch()))
    assert fraction >= 0.99, fraction
    assert float(out.lost_fraction) < 0.01
    np.testing.assert_allclose(float(out.lost_fraction), 1 - fraction, atol=1e-3)
    assert 0 < float(out.relative_change) < 1e-3

  def test_naive_bfloat16_storage_changes_almost_nothing_and_the_metric_says_so(self, caplog):
    # The old qwen configs: bfloat16 parameters, the same optimizer, no stochastic rounding
    # (`make_optimizer` refuses to build it, so it is assembled here).
    graphdef, params = _model("bfloat16")
    optimizer = optax.chain(
        optax.clip_by_global_norm(OPTIM.max_grad_norm),
        optax.adamw(OPTIM.learning_rate, b1=OPTIM.b1, b2=OPTIM.b2, weight_decay=OPTIM.weight_decay),
    )
    new, _, out = _one_update(graphdef, params, optimizer)
    fraction = _changed_fraction(params, new, _gradient(graphdef, params, _batch()))
    assert fraction < 0.05, fraction
    assert float(out.lost_fraction) > 0.95
    np.testing.assert_allclose(float(out.lost_fraction), 1 - fraction, atol=1e-3)
    warning = precision.LostUpdateWarning()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
      for step in range(3):
        warning(float(out.lost_fraction), step=step + 1, where="RL")
    assert len(caplog.records) == 1 and "stochastic_rounding" in caplog.records[0].message
    with pytest.raises(ConfigError, match="stochastic_rounding"):
      build.make_optimizer(OPTIM, 10, param_dtype="bfloat16")

  def test_bfloat16_with_stochastic_rounding_takes_the_float32_step_in_expectation(self):
    """Stated precisely: for one update from fixed parameters, gradient and optimizer state,
    every stored bfloat16 entry moves to one of the two bfloat16 neighbours of w + u, where u
    is the float32 AdamW update of the same step (from float32 masters holding the same
    values), and over K rounding keys the mean step E_K[Δw] projects onto u with coefficient
    1 within 5%, while the fraction of (entry, key) pairs that changed matches its
    expectation Σ P(round away from w) within 5 standard deviations."""
    graphdef, params = _model("bfloat16")
    optimizer = build.make_optimizer(
        dataclasses.replace(OPTIM, stochastic_rounding=True), 10, param_dtype="bfloat16", seed=0
    )
    update = learner.make_update_fn(graphdef, optimizer, LOSS, donate=False)
    opt_state = optimizer.init(precision.float32_view(params))
    batch = _batch()
    runs = []
    for seed in range(16):
      state = opt_state[:-1] + (
          precision.StochasticRoundingState(key=jax.random.key_data(jax.random.key(seed))),
      )
      runs.append(update(params, state, batch))
    assert all(
        new_params_leaf.dtype == jnp.bfloat16 for new_params_leaf in jax.tree.leaves(runs[0][0])
    )
    assert all(float(out.lost_fraction) == 0.0 for _, _, out in runs)

    masters = precision.float32_view(params)
    reference, _, _ = _one_update(graphdef, masters, build.make_optimizer(OPTIM, 10), batch)
    grads = _gradient(graphdef, params, batch)
    dot = norm = changed = expected = variance = 0.0
    for i, (w, u_new, g) in enumerate(
        zip(*(jax.tree.leaves(t) for t in (masters, reference, grads)))
    ):
      w, target = np.asarray(w, np.float64), np.asarray(u_new, np.float64)
      u, mask = target - w, np.asarray(g) != 0
      steps = np.stack([np.asarray(jax.tree.leaves(r[0])[i], np.float64) - w for r in runs])
      # Every sample is a bfloat16 neighbour of the float32 result.
      lo = np.asarray(jnp.asarray(target, jnp.float32).astype(jnp.bfloat16), np.float64)
      neighbours = [
          lo,
          np.nextafter(lo.astype(ml_dtypes.bfloat16), np.inf).astype(np.float64),
          np.nextafter(lo.astype(ml_dtypes.bfloat16), -np.inf).astype(np.float64),
      ]
      assert np.all(np.any([w + steps == n for n in neighbours], axis=0))
      dot += np.sum(steps.mean(0)[mask] * u[mask])
      norm += np.sum(u[mask] ** 2)
      # P(change) for a step smaller than the ulp: |u| over the gap to the neighbour.
      gap = np.where(
          u >= 0,
          np.nextafter(w.astype(ml_dtypes.bfloat16), np.inf).astype(np.float64) - w,
          w - np.nextafter(w.astype(ml_dtypes.bfloat16), -np.inf).astype(np.float64),
      )
      p = np.clip(np.abs(u) / gap, 0, 1)[mask]
      changed += (steps[:, mask] != 0).sum()
      expected += len(runs) * p.sum()
      variance += len(runs) * (p * (1 - p)).sum()
    assert abs(dot / norm - 1) < 0.05, dot / norm
    assert abs(changed - expected) < 5 * np.sqrt(variance), (changed, expected, variance)
    assert expected > 100  # the expectation is not vacuous

  def test_a_skipped_update_reports_no_change(self):
    graphdef, params = _model("float32")

    def nan_loss(model, micro, counts):
      loss, metrics = LOSS(model, micro, counts)
      return loss * jnp.nan, metrics

    optimizer = build.make_optimizer(OPTIM, 10)
    update = learner.make_update_fn(graphdef, optimizer, nan_loss, donate=False)
    _, _, out = update(params, optimizer.init(params), _batch())
    assert int(out.skipped) == 1
    assert float(out.relative_change) == 0.0 and float(out.lost_fraction) == 0.0


def test_gradients_accumulate_in_float32():
  """The sum of 64 bfloat16 micro-batch gradients (of bfloat16 parameters) equals their exact
  float64 sum to float32 rounding; a bfloat16 running sum of the same gradients (the old
  carry) is off by more than 1e-3 of the largest entry. The gradients are given, not
  computed, so that both sums add the very same values."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros((8, 16), jnp.bfloat16), "b": jnp.zeros((64,), jnp.bfloat16)}
  micro_grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(64,) + p.shape), jnp.bfloat16), params
  )

  def grad_fn(p, micro):
    del p
    return (jnp.zeros((), jnp.float32), None), micro

  _, accumulated, _ = jax.jit(learner.accumulate_gradients, static_argnums=0)(
      grad_fn, params, micro_grads
  )
  for got, parts in zip(jax.tree.leaves(accumulated), jax.tree.leaves(micro_grads)):
    parts = np.asarray(parts)
    exact = parts.astype(np.float64).sum(axis=0)
    running = np.zeros(exact.shape, ml_dtypes.bfloat16)
    for part in parts:
      running = (running.astype(np.float32) + part.astype(np.float32)).astype(ml_dtypes.bfloat16)
    scale = np.abs(exact).max()
    assert got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - exact).max() < 1e-6 * scale
    assert np.abs(running.astype(np.float64) - exact).max() > 1e-3 * scale


def test_optimizer_state_is_float32_for_bfloat16_parameters():
  graphdef, params = _model("bfloat16")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params = jax.device_put(params, sharding.state_shardings(params, mesh))
  optimizer = build.make_optimizer(
      dataclasses.replace(OPTIM, stochastic_rounding=True), 10, param_dtype="bfloat16"
  )
  state = learner.init_opt_state(optimizer, params, mesh)
  mu = state[1][0].mu
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu))
  new, new_state, _ = learner.make_update_fn(graphdef, optimizer, LOSS, donate=False)(
      params, state, learner.place_batch(_batch(), mesh)
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  assert [x.dtype for x in jax.tree.leaves(new_state)] == [x.dtype for x in jax.tree.leaves(state)]


def _run(param_dtype, dtype, max_staleness=0):
  """A `build.Run` with just what `sampler_params` reads."""
  config_dict = default_config.get_config()
  config_dict.model.param_dtype, config_dict.model.dtype = param_dtype, dtype
  config_dict.rollout.max_staleness = max_staleness
  if param_dtype == "bfloat16":
    config_dict.optim.stochastic_rounding = True
    config_dict.warm_start.optim.stochastic_rounding = True
  config = ExperimentConfig.from_config(config_dict)
  graphdef, params = _model(param_dtype, dtype)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shardings = sharding.state_shardings(params, mesh)
  return build.Run(
      config=config,
      config_dict=config_dict,
      workdir=None,
      task=None,
      tokenizer=None,
      mesh=mesh,
      sampler_mesh=mesh,
      graphdef=graphdef,
      params=jax.device_put(params, shardings),
      param_shardings=shardings,
      sampler_shardings=shardings,
      sampling=None,
      train_examples=(),
      eval_examples=(),
  )


class TestSamplerCopy:

  def test_float32_masters_give_the_sampler_a_bfloat16_copy_on_the_same_shardings(self):
    run = _run("float32", "bfloat16")
    copy = run.sampler_params(run.params)
    for master, cast, want in zip(
        *(jax.tree.leaves(t) for t in (run.params, copy, run.param_shardings))
    ):
      assert master.dtype == jnp.float32 and cast.dtype == jnp.bfloat16
      assert cast.sharding == want
      np.testing.assert_array_equal(np.asarray(cast), np.asarray(master.astype(jnp.bfloat16)))
    # The sampler computes what the learner computes: the model casts each weight alike.
    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    hidden = [nnx.merge(run.graphdef, p)(tokens, positions)[0] for p in (run.params, copy)]
    np.testing.assert_array_equal(
        np.asarray(hidden[0], np.float32), np.asarray(hidden[1], np.float32)
    )

  def test_parameters_in_the_compute_dtype_are_shared_in_the_synchronous_loop(self):
    for param_dtype, dtype in (("float32", "float32"), ("bfloat16", "bfloat16")):
      run = _run(param_dtype, dtype)
      assert run.sampler_params(run.params) is run.params
      stale = _run(param_dtype, dtype, max_staleness=1)
      copy = stale.sampler_params(stale.params)
      assert copy is not stale.params
      assert jax.tree.leaves(copy)[0].dtype == jnp.dtype(dtype)


class TestConfigs:

  def test_bfloat16_storage_without_stochastic_rounding_is_an_error_naming_the_fix(self):
    config = default_config.get_config()
    config.model.param_dtype = "bfloat16"
    with pytest.raises(
        ConfigError, match=r"model.param_dtype='float32'.*" r"optim.stochastic_rounding=True"
    ):
      ExperimentConfig.from_config(config)
    config.optim.stochastic_rounding = True
    # The warm start trains the same parameters with an optimizer of its own.
    with pytest.raises(ConfigError, match="warm_start.optim.stochastic_rounding=True"):
      ExperimentConfig.from_config(config)
    config.warm_start.optim.stochastic_rounding = True
    assert ExperimentConfig.from_config(config).model.trained_dtype == jnp.bfloat16
    config.model.param_dtype = "float16"
    with pytest.raises(ConfigError, match="param_dtype='float16' is not one of"):
      ExperimentConfig.from_config(config)

  @pytest.mark.parametrize("module", [qwen2_5_0_5b, qwen2_5_math])
  def test_the_qwen_configs_train_float32_masters_with_bfloat16_compute(self, module):
    config = module.get_config()
    config.model.hf_path = "/unused"
    model = ExperimentConfig.from_config(config).model
    assert model.trained_dtype == jnp.float32 and model.dtype == "bfloat16"

  def test_a_bfloat16_checkpoint_trains_float32_masters_by_default(self, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch writes the checkpoint")
    pytest.importorskip("transformers")
    import hf_fixtures  # pylint: disable=import-outside-toplevel

    directory = hf_fixtures.save(
        hf_fixtures.torch_model("qwen2_bias_tied").to(torch.bfloat16),
        tmp_path / "bf16",
        sharded=False,
    )
    config = default_config.get_config()
    config.model.name, config.model.hf_path = None, str(directory)
    config.model.overrides = {}
    model = ExperimentConfig.from_config(config).model
    policy = build.build_model(model, tokenizer=None, seed=0)
    assert policy.config.param_dtype == jnp.float32 and policy.config.dtype == jnp.bfloat16
    embedding = policy.embedding[...]
    assert embedding.dtype == jnp.float32
    # The masters start at the checkpoint's values exactly.
    np.testing.assert_array_equal(
        np.asarray(embedding.astype(jnp.bfloat16).astype(jnp.float32)), np.asarray(embedding)
    )
