"""Tests for gmpo_jax.checkpointing: round trip, retention, corruption, crashes, signals."""

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gmpo_jax.checkpointing import (
    CORRUPTED_DIR,
    Checkpointer,
    CheckpointState,
    install_preemption_handler,
)

# A failed Orbax read (the corruption and mismatch tests) leaves coroutines and
# event-loop callbacks behind; Python reports them whenever they are collected,
# i.e. during whichever test runs next. They are Orbax's internals, not failures.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

_TX = optax.adamw(1e-2)


def _make_state(step: int, seed: int) -> tuple[nnx.GraphDef, CheckpointState]:
  """A tiny model + adamw state after one update (count 1, mu/nu non-zero), distinct per seed."""
  graphdef, params = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)))
  opt_state = _TX.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  _, opt_state = _TX.update(grads, opt_state, params)
  key = jax.random.fold_in(jax.random.key(7), seed)
  metadata = {"data_position": 10 * step, "config": {"lr": 1e-2, "name": "tiny"}, "best_metric": 0.25}
  return graphdef, CheckpointState(step=step, model=params, opt_state=opt_state, key=key, metadata=metadata)


def _abstract_target() -> CheckpointState:
  """What the runner builds before restoring: shapes and dtypes only."""
  _, params = nnx.split(nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
  return CheckpointState(
      step=0,
      model=params,
      opt_state=jax.eval_shape(_TX.init, params),
      key=jax.eval_shape(lambda: jax.random.key(0)),
      metadata={},
  )


def _host_copy(state: CheckpointState) -> dict:
  return {
      "model": jax.tree.map(np.array, state.model),
      "opt_state": jax.tree.map(np.array, state.opt_state),
      "key_data": np.array(jax.random.key_data(state.key)),
      "key_dtype": state.key.dtype,
      "structure": jax.tree.structure((state.model, state.opt_state)),
      "step": state.step,
      "metadata": state.metadata,
  }


def _assert_restored_equals(restored: CheckpointState, expected: dict) -> None:
  assert restored.step == expected["step"]
  assert restored.metadata == expected["metadata"]
  assert isinstance(restored.model, nnx.State)
  assert jax.tree.structure((restored.model, restored.opt_state)) == expected["structure"]
  for got, want in zip(jax.tree.leaves((restored.model, restored.opt_state)),
                       jax.tree.leaves((expected["model"], expected["opt_state"]))):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
  assert restored.key.dtype == expected["key_dtype"]
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored.key)), expected["key_data"])


def _save_steps(directory: pathlib.Path, steps, **kwargs) -> dict[int, dict]:
  expected = {}
  with Checkpointer(directory, **kwargs) as checkpointer:
    for step in steps:
      _, state = _make_state(step, seed=step)
      expected[step] = _host_copy(state)
      checkpointer.save(state)
  return expected


class TestRoundTrip:

  def test_save_then_restore_latest_in_a_new_checkpointer(self, tmp_path):
    graphdef, state = _make_state(step=5, seed=3)
    expected = _host_copy(state)
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.save(state)
    with Checkpointer(tmp_path) as checkpointer:
      restored = checkpointer.restore_latest(_abstract_target())
      # A concrete target (the runner's freshly initialized state) works the same.
      _, fresh = _make_state(step=0, seed=99)
      restored_concrete = checkpointer.restore_latest(fresh)
    _assert_restored_equals(restored, expected)
    _assert_restored_equals(restored_concrete, expected)
    # The restored state drives the same model.
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(nnx.merge(graphdef, restored.model)(x), nnx.merge(graphdef, state.model)(x))

  def test_empty_directory_gives_none(self, tmp_path):
    with Checkpointer(tmp_path / "none_yet") as checkpointer:
      assert checkpointer.restore_latest(_abstract_target()) is None
      assert checkpointer.latest_step is None

  def test_async_save_is_safe_when_buffers_are_deleted_right_after(self, tmp_path):
    # The runner donates the state to the next jitted step: the save must not read it later.
    _, state = _make_state(step=1, seed=1)
    expected = _host_copy(state)
    with Checkpointer(tmp_path, async_save=True) as checkpointer:
      checkpointer.save(state)
      for leaf in jax.tree.leaves((state.model, state.opt_state, state.key)):
        leaf.delete()
      checkpointer.wait_until_finished()
      _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected)

  def test_save_rejects_bad_input_and_skips_a_repeated_step(self, tmp_path):
    _, state = _make_state(step=3, seed=0)
    with Checkpointer(tmp_path) as checkpointer:
      with pytest.raises(TypeError, match="typed PRNG key"):
        checkpointer.save(state._replace(key=jax.random.PRNGKey(0)))
      with pytest.raises(TypeError, match="JSON"):
        checkpointer.save(state._replace(metadata={"bad": object()}))
      with pytest.raises(ValueError, match="no best_metric"):
        checkpointer.save(state, metrics={"acc": 1.0})
      assert checkpointer.save(state)
      assert not checkpointer.save(state)
      with pytest.raises(ValueError, match="later step 3"):
        checkpointer.save(state._replace(step=2))
    with Checkpointer(tmp_path / "best", best_metric="acc") as checkpointer:
      with pytest.raises(ValueError, match="must contain best_metric"):
        checkpointer.save(state, metrics={"loss": 1.0})

  def test_mismatched_target_raises(self, tmp_path):
    _save_steps(tmp_path, [1])
    target = _abstract_target()
    with Checkpointer(tmp_path) as checkpointer:
      with pytest.raises(ValueError, match="key"):
        checkpointer.restore(1, target._replace(key=jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))))
      wider = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0))))
      with pytest.raises(ValueError):
        checkpointer.restore(1, target._replace(model=wider))


# Runs in its own process: JAX must see 8 CPU devices from its start.
_SHARDED_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from gmpo_jax.checkpointing import Checkpointer, CheckpointState

assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("data", "model"))
_, params = nnx.split(nnx.Linear(8, 16, rngs=nnx.Rngs(0)))
params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(*[None] * (x.ndim - 1), "model"))), params)
tx = optax.adamw(1e-2)
key = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
with Checkpointer(sys.argv[1]) as checkpointer:
  checkpointer.save(CheckpointState(1, params, tx.init(params), key, {}))

# Restore with other shardings and dtypes: model sharded over "data" in bfloat16;
# optimizer state as jax.eval_shape gives it (an AbstractMesh, bound with mesh=).
abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(8, 16, rngs=nnx.Rngs(0))))
model_sharding = NamedSharding(mesh, P("data"))
abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=model_sharding), abstract)
target = CheckpointState(0, abstract, jax.eval_shape(tx.init, params), jax.eval_shape(lambda: jax.random.key(0)), {})
with Checkpointer(sys.argv[1]) as checkpointer:
  restored = checkpointer.restore_latest(target, mesh=mesh)
for got, want in zip(jax.tree.leaves(restored.model), jax.tree.leaves(params)):
  assert got.dtype == jnp.bfloat16 and got.sharding == model_sharding, got.sharding
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))
for got, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(tx.init(params))):
  assert got.sharding == want.sharding, (got.sharding, want.sharding)
print("OK")
"""


def test_restore_into_other_shardings_on_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


class TestRetention:

  @pytest.mark.parametrize("best_mode, best_step", [("max", 2), ("min", 3)])
  def test_keeps_latest_n_and_the_best(self, tmp_path, best_mode, best_step):
    # NaN must never win; step 5 has no metrics and lives only while among the latest.
    values = {1: 0.5, 2: 0.9, 3: 0.1, 4: float("nan"), 5: None, 6: 0.3}
    options = dict(max_to_keep=2, best_metric="acc", best_mode=best_mode)
    with Checkpointer(tmp_path, **options) as checkpointer:
      for step, value in values.items():
        _, state = _make_state(step, seed=step)
        checkpointer.save(state, metrics=None if value is None else {"acc": np.float32(value)})
      checkpointer.wait_until_finished()
      assert checkpointer.all_steps() == sorted({best_step, 5, 6})
      assert checkpointer.best_step == best_step
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == sorted({best_step, 5, 6})

    # Reopened, the ranking comes from disk; a better step replaces the best.
    better = 2.0 if best_mode == "max" else -1.0
    with Checkpointer(tmp_path, **options) as checkpointer:
      assert checkpointer.best_step == best_step
      _, state = _make_state(7, seed=7)
      checkpointer.save(state, metrics={"acc": better})
      checkpointer.wait_until_finished()
      assert checkpointer.best_step == 7
      assert checkpointer.all_steps() == [6, 7]

  def test_without_best_metric_keeps_latest_n(self, tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=2)
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [3, 4]
      assert checkpointer.best_step is None


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with largest.open("r+b") as file:
    file.truncate(largest.stat().st_size // 2)


def _delete_array_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "state" / "_METADATA").unlink()


def _garbage_metadata_json(step_dir: pathlib.Path) -> None:
  (step_dir / "metadata" / "metadata").write_bytes(b"\x00{not json")


def _garbage_metrics_json(step_dir: pathlib.Path) -> None:
  (step_dir / "metrics" / "metrics").write_bytes(b"{\"acc\": ")


class TestCorruption:

  @pytest.mark.parametrize("corrupt", [
      _truncate_largest_array_file, _delete_array_metadata, _garbage_metadata_json, _garbage_metrics_json,
  ])
  def test_corrupted_latest_is_reported_and_the_previous_restored(self, tmp_path, caplog, corrupt):
    options = dict(best_metric="acc")
    expected = {}
    with Checkpointer(tmp_path, **options) as checkpointer:
      for step in (1, 2, 3):
        _, state = _make_state(step, seed=step)
        expected[step] = _host_copy(state)
        checkpointer.save(state, metrics={"acc": float(step)})
    corrupt(tmp_path / "3")

    with caplog.at_level(logging.WARNING, logger="gmpo_jax.checkpointing"):
      with Checkpointer(tmp_path, **options) as checkpointer:
        restored = checkpointer.restore_latest(_abstract_target())
        assert checkpointer.all_steps() == [1, 2]
        # The run goes on from step 2 and can save step 3 again.
        _, state = _make_state(3, seed=30)
        assert checkpointer.save(state, metrics={"acc": 3.0})
    _assert_restored_equals(restored, expected[2])
    step_3_warnings = [r.getMessage() for r in caplog.records
                       if r.levelno == logging.WARNING and "step 3" in r.getMessage()]
    assert any("Error" in message for message in step_3_warnings), step_3_warnings
    moved = list((tmp_path / CORRUPTED_DIR).iterdir())
    assert [p.name.split(".")[0] for p in moved] == ["3"]

  def test_all_steps_failing_raises_and_moves_nothing(self, tmp_path):
    _save_steps(tmp_path, [1, 2])
    wider = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0))))
    with Checkpointer(tmp_path) as checkpointer:
      with pytest.raises(RuntimeError, match="nothing was moved"):
        checkpointer.restore_latest(_abstract_target()._replace(model=wider))
      assert checkpointer.all_steps() == [1, 2]
    assert not (tmp_path / CORRUPTED_DIR).exists()

  def test_interrupted_save_is_ignored_then_cleaned_up(self, tmp_path):
    expected = _save_steps(tmp_path, [1])
    # A crash during the save of step 2: Orbax's temporary directory is left behind,
    # half written (here: a copy of a complete step with its array data cut short).
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "1", leftover)
    _truncate_largest_array_file(leftover)
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [1]
      _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected[1])
      _, state = _make_state(2, seed=2)
      assert checkpointer.save(state)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def _wait_for(predicate, timeout=2.0):
  deadline = time.monotonic() + timeout
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.01)


class TestPreemptionHandler:

  @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
  def test_signal_sets_flag_and_close_restores_previous(self, signum):
    previous = signal.getsignal(signum)
    handler = install_preemption_handler()
    try:
      assert not handler.requested
      assert not handler.requested_on_any_process()
      os.kill(os.getpid(), signum)
      _wait_for(lambda: handler.requested)
      assert handler.requested
      assert handler.requested_on_any_process()
    finally:
      handler.close()
    assert signal.getsignal(signum) is previous

  def test_second_signal_goes_to_the_previous_handler(self):
    received = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
      with install_preemption_handler(signals=(signal.SIGTERM,)) as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: handler.requested)
        assert handler.requested and received == []
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: received)
        assert received == [signal.SIGTERM]
    finally:
      signal.signal(signal.SIGTERM, original)
