"""The sampler on devices of its own (`config.rollout.devices`) trains like the shared run.

`configs/smoke.py` at max_staleness 1 on 8 simulated devices: the sampler and the learner share
all 8, or the sampler takes devices 0-3 and the learner's (4, 1, 1) mesh devices 4-7. The
metrics must agree to float tolerance (the learner's reductions run over 4 shards instead of 8),
and every parameter version the sampler gets lives on its own devices only.
"""

import jax
import numpy as np
import pytest

from configs import smoke
from gmpo_jax.config import ConfigError
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.rollout import backends as rollout_lib
from gmpo_jax.runner import build, loop, rl_step


def _config(devices):
  config = smoke.get_config()
  config.rollout.max_staleness = 1
  config.rollout.devices = devices
  config.optim.learning_rate, config.optim.warmup_steps = 3e-2, 0  # versions differ
  return config


def _records(workdir):
  return [
      {k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS}
      for r in metrics_lib.read_metrics(workdir)
  ]


def test_split_sampler_matches_the_shared_run_and_keeps_to_its_devices(tmp_path, monkeypatch):
  loop.train_and_evaluate(_config(None), tmp_path / "shared")
  pushed = []
  update_params = rollout_lib.JaxRollout.update_params

  def record_devices(self, state):
    pushed.append({d.id for leaf in jax.tree.leaves(state) for d in leaf.devices()})
    update_params(self, state)

  monkeypatch.setattr(rollout_lib.JaxRollout, "update_params", record_devices)
  loop.train_and_evaluate(_config(4), tmp_path / "split")
  assert len(pushed) == 4 and all(devices == {0, 1, 2, 3} for devices in pushed)
  shared, split = _records(tmp_path / "shared"), _records(tmp_path / "split")
  assert [r["rollout/staleness"] for r in split[1:]] == [0, 1, 1, 1]
  for got, want in zip(split, shared):
    assert got.keys() == want.keys()
    for key in want:
      if want[key] is None:
        assert got[key] is None, (want["step"], key)
      elif key == "mismatch/kl" and want[key] < 1e-6:  # float noise of two partitionings
        assert got[key] < 1e-6, want["step"]
      else:
        np.testing.assert_allclose(
            got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=f"step {want['step']} {key}"
        )


@pytest.mark.parametrize(
    "devices, match",
    [
        (8, "at least one of the 8 devices"),
        (3, "multiple of rollout.devices = 3"),
    ],
)
def test_a_split_that_leaves_no_learner_or_does_not_divide_the_batch_is_refused(
    tmp_path, devices, match
):
  with pytest.raises(ConfigError, match=match):
    build.build_run(_config(devices), tmp_path)
