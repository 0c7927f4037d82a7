"""`warm_start.init_from`: the points of an ablation start from one shared warm start per seed.

A warm start trained alone (`loop.warm_start_only`) and then named by `init_from` must give a
run identical to one that trains its own warm start (the run is deterministic), write no warm
start of its own, and refuse a warm start of another task or model, naming the fields.
"""

import json

import jax
import numpy as np
import pytest

from configs import smoke
from gmpo_jax.infra import preemption
from gmpo_jax.infra.metrics import read_metrics
from gmpo_jax.runner import loop
from gmpo_jax.runner import warm_start as warm_start_lib
from gmpo_jax.runner.build import build_run

# Timing and compile counts differ between runs whatever they compute.
_TIMING = ("time/", "perf/", "tokens_per_sec", "compiles/")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("shared_warm_start")
  return workdir, loop.warm_start_only(smoke.get_config(), workdir)


def _config(init_from=None, **model_overrides):
  config = smoke.get_config()
  config.warm_start.init_from = None if init_from is None else str(init_from)
  config.model.overrides = {**config.model.overrides, **model_overrides}
  return config


def _warm_start(config, workdir):
  run = build_run(config, workdir)
  with jax.set_mesh(run.mesh), preemption.install_preemption_handler() as handler:
    return run.params, *warm_start_lib.warm_start(run, handler)


def _comparable(records):
  return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in records]


def test_warm_start_only_records_its_result_and_fingerprint(shared):
  workdir, summary = shared
  assert json.loads((workdir / loop.WARM_START_SUMMARY).read_text()) == summary
  # The smoke config's target (0) is met at the first probe (step 3).
  assert summary["result"]["warm_start/steps"] == 3
  config = smoke.get_config()
  assert summary["fingerprint"] == warm_start_lib.fingerprint(
      json.loads(config.task.to_json()), json.loads(config.model.to_json())
  )
  assert not (workdir / "checkpoints").exists()  # no RL


@pytest.mark.parametrize("form", ["workdir", "warm_start directory"])
def test_init_from_loads_the_shared_policy_and_writes_no_warm_start(shared, tmp_path, form):
  source, summary = shared
  named = source if form == "workdir" else source / warm_start_lib.WARM_START_DIR
  initial, params, result = _warm_start(_config(named), tmp_path / "point")
  _, own, _ = _warm_start(_config(), source)  # the source's cache, reused
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(own)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and not the untrained policy.
  assert any(
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial))
  )
  assert result["warm_start/steps"] == summary["result"]["warm_start/steps"]
  assert result["warm_start/fingerprint"] == summary["fingerprint"]
  assert not (tmp_path / "point" / warm_start_lib.WARM_START_DIR).exists()


def test_a_run_from_the_shared_warm_start_equals_one_that_trains_its_own(shared, tmp_path):
  source, _ = shared
  own = loop.train_and_evaluate(_config(), tmp_path / "own")
  from_shared = loop.train_and_evaluate(_config(source), tmp_path / "from_shared")
  assert from_shared["warm_start"]["warm_start/init_from"] == str(
      (source / warm_start_lib.WARM_START_DIR).resolve()
  )
  assert from_shared["initial_eval"] == own["initial_eval"]
  assert _comparable(read_metrics(tmp_path / "from_shared")) == _comparable(
      read_metrics(tmp_path / "own")
  )


def test_a_warm_start_of_another_model_or_task_is_refused_naming_the_fields(shared, tmp_path):
  source, summary = shared
  with pytest.raises(
      warm_start_lib.IncompatibleWarmStartError,
      match=r"another task or model .*model\.overrides\.hidden_size: 32 there, " r"48 here",
  ) as error:
    _warm_start(_config(source, hidden_size=48), tmp_path / "wider")
  assert summary["fingerprint"] in str(error.value)
  config = _config(source)
  config.task.kwargs = {**config.task.kwargs, "num_train": 61}
  with pytest.raises(
      warm_start_lib.IncompatibleWarmStartError, match=r"task\.kwargs\.num_train: 60 there, 61 here"
  ):
    _warm_start(config, tmp_path / "other_task")


def test_init_from_without_a_finished_warm_start_is_refused(tmp_path):
  with pytest.raises(warm_start_lib.IncompatibleWarmStartError, match="no such directory"):
    _warm_start(_config(tmp_path / "missing"), tmp_path / "a")
  (tmp_path / "empty").mkdir()
  with pytest.raises(
      warm_start_lib.IncompatibleWarmStartError, match="holds no finished warm start"
  ):
    _warm_start(_config(tmp_path / "empty"), tmp_path / "b")
