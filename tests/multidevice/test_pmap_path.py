"""The `jax.pmap` update (`config.parallelism='pmap'`) equals the Mesh path, alone and in a run.

The learner check: NUM_STEPS GMPO updates of two micro-batches on the 8 simulated devices, each
micro-batch split 8 ways by pmap, against `learner.make_update_fn` on the (8,1,1) mesh: loss,
gradient norm, every diagnostic (pooled over the devices), parameters and optimizer state after
every step, to 1e-5; once more with a token-mask importance correction, whose statistics are
pooled too. The runner check: `configs/smoke.py` on 8 devices logs the same metrics either way.
"""

import dataclasses

import jax
import learner_setup as setup
import numpy as np
import pytest
from learner_setup import ALGO, assert_trees_close

from configs import smoke
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.learner import pmap_update as pmap_step
from gmpo_jax.runner import loop, rl_step

MESH = (8, 1, 1)
ALGO_MASKED = dataclasses.replace(ALGO, is_correction="token_mask", is_cap=1.5)


@pytest.mark.parametrize("algo", [ALGO, ALGO_MASKED], ids=["uncorrected", "token_mask"])
def test_update_diagnostics_parameters_and_optimizer_state_equal_the_mesh_path(algo):
  got = setup.mesh_run(MESH, algo=algo, parallelism="pmap")
  want = setup.mesh_run(MESH, algo=algo)
  for step, (o, e) in enumerate(zip(got["outputs"], want["outputs"])):
    np.testing.assert_allclose(o.loss, e.loss, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    np.testing.assert_allclose(o.grad_norm, e.grad_norm, rtol=1e-5, err_msg=f"step {step}")
    assert int(o.skipped) == int(e.skipped) == 0 and float(o.grad_norm) > 1e-3
    assert_trees_close(o.metrics, e.metrics)
    assert_trees_close(got["states"][step], want["states"][step])
  importance = got["outputs"][0].metrics.importance
  if algo.is_correction == "none":
    assert importance is None
  else:  # some tokens masked, in some micro-batches more than in others
    assert 0 < float(importance.masked_fraction) < 0.5
  # One compile, and the state keeps the runner's shardings from step to step.
  assert got["compiles"] == 1
  for leaf, sharding in zip(
      jax.tree.leaves(got["params"]), jax.tree.leaves(got["param_shardings"])
  ):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_micro_batches_that_do_not_split_over_the_devices_are_an_error():
  graphdef, params = setup.model()
  optimizer = setup.optimizer()
  update = pmap_step.make_pmap_update_fn(
      graphdef, optimizer, setup.micro_loss(), devices=jax.devices(), donate=False
  )
  batch = setup.learner_batch(setup.rollout(seed=0), 1)
  batch = jax.tree.map(lambda x: x[:, :12], batch)  # 12 sequences, 8 devices
  with pytest.raises(ValueError, match="12 sequences do not split over 8 devices"):
    update(params, optimizer.init(params), batch)


def _smoke_records(workdir, parallelism):
  config = smoke.get_config()
  config.parallelism = parallelism
  config.num_steps, config.eval_every = 2, 2
  config.eval.num_examples, config.eval.num_samples, config.eval.k = 16, 1, (1,)
  loop.train_and_evaluate(config, workdir)
  return [
      {k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS}
      for r in metrics_lib.read_metrics(workdir)
  ]


def test_a_smoke_run_logs_the_same_metrics_with_mesh_and_pmap(tmp_path):
  want = _smoke_records(tmp_path / "mesh", "mesh")
  got = _smoke_records(tmp_path / "pmap", "pmap")
  assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2]
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key, value in w.items():
      if value is None:
        assert g[key] is None, (w["step"], key)
      else:
        np.testing.assert_allclose(
            g[key], value, rtol=1e-5, atol=1e-7, err_msg=f"step {w['step']} {key}"
        )
  # The smoke policy earns a constant reward in most groups; one of the steps updates it.
  assert max(r["grad_norm"] for r in want[1:]) > 0.1
  assert all(r["compiles/update"] == 1 for r in want[1:])
