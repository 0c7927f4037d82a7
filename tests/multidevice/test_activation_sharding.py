"""The model's hidden states are pinned to the batch axes under `jax.set_mesh`, and only there.

`sharding.constrain_to_batch_axes` runs after the embedding and at the top of every scanned
layer. Under a (data, fsdp, tensor) mesh it must appear in the lowered program, cut the update's
temporary memory on a 2x4x1 mesh, and leave every value unchanged; without a mesh, or with a
batch that data x fsdp does not divide, the program must be the one without it. Inside the
learner's shard_map over `data` it pins the rows to `fsdp`.
"""

import contextlib

import jax
import jax.numpy as jnp
import learner_setup as setup
import numpy as np
import pytest
from flax import nnx
from learner_setup import assert_trees_close

from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.infra import sharding
from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.runner import build

CONSTRAINT = "sdy.sharding_constraint"
BATCH_SPEC = '[{"data", "fsdp"}, {}, {}]'
GRAPHDEF, PARAMS = setup.model()


def _mesh_2x4x1():
  return sharding.make_mesh(data=2, fsdp=4, tensor=1)


@jax.jit
def _hidden(params, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return nnx.merge(GRAPHDEF, params)(tokens, positions)[0]


def _tokens(batch):
  return jnp.asarray(
      np.random.default_rng(batch).integers(0, setup.MODEL.vocab_size, (batch, 6)), jnp.int32
  )


def test_hidden_states_constrained_after_embedding_and_in_the_layer_body():
  with jax.set_mesh(_mesh_2x4x1()):
    text = _hidden.lower(PARAMS, _tokens(8)).as_text()
  lines = [line for line in text.splitlines() if CONSTRAINT in line]
  # One after the embedding, one at the top of the scanned layer body.
  assert len(lines) == 2, lines
  assert all(BATCH_SPEC in line and "tensor<8x6x64xf32>" in line for line in lines)


@pytest.mark.parametrize("batch, in_mesh", [(8, False), (6, True), (4, True)])
def test_no_constraint_without_a_mesh_or_with_an_indivisible_batch(batch, in_mesh):
  # data x fsdp = 8 divides neither 6 nor 4 (a sampler or eval batch): no constraint.
  with jax.set_mesh(_mesh_2x4x1()) if in_mesh else contextlib.nullcontext():
    text = _hidden.lower(PARAMS, _tokens(batch)).as_text()
  assert CONSTRAINT not in text


def test_no_constraint_on_manual_axes_inside_shard_map():
  mesh = _mesh_2x4x1()

  def per_shard(x):
    assert jax.sharding.get_abstract_mesh().manual_axes  # the case under test
    return sharding.constrain_to_batch_axes(x) * 2.0

  f = jax.jit(
      jax.shard_map(
          per_shard,
          mesh=mesh,
          in_specs=jax.P(sharding.BATCH_AXES),
          out_specs=jax.P(sharding.BATCH_AXES),
      )
  )
  x = jnp.arange(16 * 8 * 3, dtype=jnp.float32).reshape(16 * 8, 3)
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(f(x), 2.0 * x)


def test_hidden_states_under_the_mesh_equal_unconstrained():
  tokens = _tokens(8)
  want = _hidden(PARAMS, tokens)
  with jax.set_mesh(_mesh_2x4x1()):
    got = _hidden(PARAMS, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_update_temporaries_drop_on_2x4x1():
  # The benchmark's shape class (16 sequences x 256 tokens): compiled only, nothing is run.
  n, t = 16, 256
  mesh = _mesh_2x4x1()
  opt = setup.optimizer()
  param_shardings = sharding.state_shardings(PARAMS, mesh)
  opt_shardings = sharding.opt_state_shardings(opt, PARAMS, param_shardings, mesh)
  algo = AlgorithmConfig(advantage="gmpo", objective="geometric")
  loss = build.policy_loss(algo, temperature=1.0, chunk_size=64, max_length=t)
  shardings = (param_shardings, opt_shardings, None)
  # The step left to the partitioner, and the runner's, which runs it under a shard_map over
  # `data` (the gradient is reduced once per step) and so always traces under a mesh.
  partitioned = jax.jit(
      learner.update_step(GRAPHDEF, opt, loss), in_shardings=shardings, out_shardings=shardings
  )
  update = learner.make_update_fn(
      GRAPHDEF, opt, loss, param_shardings=param_shardings, opt_shardings=opt_shardings
  )
  mask = np.ones((1, n, t), bool)
  floats = np.zeros((1, n, t), np.float32)
  batch = learner.Batch(
      tokens=np.zeros((1, n, t), np.int32),
      positions=np.asarray(positions_from_mask(jnp.asarray(mask[0])))[None],
      key_mask=mask,
      loss_mask=mask,
      old_logp=floats,
      ref_logp=floats,
      advantages=np.zeros((1, n), np.float32),
  )

  def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )

  args = (
      abstract(PARAMS, param_shardings),
      abstract(jax.eval_shape(opt.init, PARAMS), opt_shardings),
      abstract(
          batch,
          jax.tree.map(lambda x: sharding.batch_sharding(mesh, ndim=x.ndim, batch_axis=1), batch),
      ),
  )
  temp = lambda f: f.lower(*args).compile().memory_analysis().temp_size_in_bytes
  free = temp(partitioned)
  with jax.set_mesh(mesh):
    constrained, in_mesh = temp(partitioned), temp(update)
  # Measured 15.1 MiB free, 6.6 MiB constrained, 6.8 MiB for the runner's update with or
  # without the mesh in context; require a clear drop, not an exact number.
  assert max(constrained, in_mesh) < 0.8 * free, (constrained, in_mesh, free)
  assert temp(update) == in_mesh


def test_update_under_the_mesh_equals_single_device():
  got = setup.mesh_run((2, 4, 1), in_mesh_context=True)
  want = setup.mesh_run(None)
  assert got["compiles"] == 1
  for o, e in zip(got["outputs"], want["outputs"]):
    np.testing.assert_allclose(o.loss, e.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o.grad_norm, e.grad_norm, rtol=1e-5)
    assert_trees_close(o.metrics, e.metrics)
  for g, w in zip(got["states"], want["states"]):
    assert_trees_close(g, w)
