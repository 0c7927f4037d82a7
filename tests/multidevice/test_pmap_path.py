"""The `jax.pmap` advantage -> loss -> gradient -> update path equals the Mesh path.

One group of G completions per device (8 devices, 8 groups): every device computes its
group's advantages, its share of the loss with psum'd global counts, and applies the psum'd
gradient. After every one of NUM_STEPS updates the loss, gradient norm, parameters and
optimizer state must equal the Mesh path on an (8,1,1) mesh, and the diagnostics must equal
one device's update split into the same 16 micro-batches (pmap's 8 devices x 2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax import pmap_step
from gmpo_jax.config import AlgorithmConfig
from learner_setup import ALGO, B, G, NUM_STEPS, assert_trees_close
import learner_setup as setup

D = 8


@functools.cache
def pmap_run():
  graphdef, params = setup.model()
  optimizer = setup.optimizer()
  step = pmap_step.make_pmap_update_fn(graphdef, optimizer, ALGO, setup.micro_loss())
  opt_state = pmap_step.replicate(optimizer.init(params), D)
  params = pmap_step.replicate(params, D)
  outputs, states = [], []
  for seed in range(NUM_STEPS):
    shard = pmap_step.split_across_devices(
        pmap_step.GroupShard(**setup.rollout(seed=seed)), D)
    params, opt_state, out = step(params, opt_state, shard)
    outputs.append(jax.device_get(out))
    states.append(jax.device_get((params, opt_state)))
  return outputs, states


def test_every_device_holds_the_same_parameters_and_reports_the_same_update():
  outputs, states = pmap_run()
  for out, state in zip(outputs, states):
    for leaf in jax.tree.leaves((state, out.update)):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    assert int(out.update.skipped[0]) == 0 and float(out.update.grad_norm[0]) > 1e-3


def test_advantages_per_device_equal_the_whole_batch_estimator():
  outputs, _ = pmap_run()
  data = setup.rollout(seed=NUM_STEPS - 1)
  want = setup.learner_batch(data, 1).advantages.reshape(B, G)
  np.testing.assert_allclose(outputs[-1].advantages.reshape(B, G), want, rtol=1e-6, atol=1e-6)
  assert np.all(want[3] == 0) and want[5, 1] == 0 and np.abs(want).max() > 0.5


def test_loss_gradient_parameters_and_optimizer_state_equal_the_mesh_path():
  outputs, states = pmap_run()
  mesh = setup.mesh_run((8, 1, 1))
  for step in range(NUM_STEPS):
    got, want = outputs[step].update, mesh["outputs"][step]
    np.testing.assert_allclose(got.loss[0], want.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.grad_norm[0], want.grad_norm, rtol=1e-5)
    assert_trees_close(pmap_step.unreplicate(states[step]), mesh["states"][step])
  # After the first step Adam's first moment is (1 - b1) x the clipped gradient.
  assert_trees_close(setup.adam_first_moment(pmap_step.unreplicate(states[0][1])),
                     setup.adam_first_moment(mesh["states"][0][1]))


def test_diagnostics_equal_one_device_with_the_same_shards_as_micro_batches():
  outputs, _ = pmap_run()
  single = setup.mesh_run(None, num_microbatches=D * ALGO.num_microbatches)
  for got, want in zip(outputs, single["outputs"]):
    assert_trees_close(pmap_step.unreplicate(got.update.metrics), want.metrics)
    np.testing.assert_allclose(got.update.loss[0], want.loss, rtol=1e-5, atol=1e-6)


def test_estimator_coupling_groups_is_refused():
  graphdef, _ = setup.model()
  algo = AlgorithmConfig(advantage="batch_std")
  with pytest.raises(ValueError, match="batch_std.*Mesh path"):
    pmap_step.make_pmap_update_fn(graphdef, setup.optimizer(), algo, setup.micro_loss(algo))


def test_uneven_split_is_an_error():
  with pytest.raises(ValueError, match="does not split over 8 devices"):
    pmap_step.split_across_devices({"rewards": jnp.zeros((12, G))}, D)
