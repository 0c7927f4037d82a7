"""Tests for gmpo_jax.infra.checkpointing: round trip, retention, manifests, corruption, other models,
permissions, config fingerprints, crashes, signals."""

import errno
import hashlib
import json
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
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.experimental import multihost_utils

from experiments import fault_table
from gmpo_jax.infra import disk_full
from gmpo_jax.infra.checkpointing import (
    CONFIG_METADATA_KEY,
    CORRUPTED_DIR,
    MANIFEST_FILE,
    MISSING,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointState,
    ConfigChange,
    ConfigMismatchError,
    CorruptCheckpointError,
    UnrestorableCheckpointsError,
    check_config,
    config_changes,
    config_fingerprint,
    config_record,
    integrity,
)
from gmpo_jax.infra.preemption import install_preemption_handler

_TX = optax.adamw(1e-2)


class TestSaveDecisions:

  def test_the_policy_decides_and_a_saved_step_is_not_due_again(self, tmp_path):
    policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(3),
            ocp.checkpoint_managers.FixedIntervalPolicy(5),
        ]
    )
    with Checkpointer(tmp_path, save_decision_policy=policy, async_save=False) as checkpointer:
      assert [s for s in range(1, 11) if checkpointer.should_save(s)] == [3, 5, 6, 9, 10]
      checkpointer.save(_make_state(6, 0)[1])
      assert not checkpointer.should_save(5) and not checkpointer.should_save(6)
      assert checkpointer.should_save(9)
    with Checkpointer(tmp_path / "none") as checkpointer:  # no policy: no periodic save
      assert not any(checkpointer.should_save(s) for s in range(1, 11))

  def test_the_preemption_step_comes_from_the_coordination_service(self, tmp_path, monkeypatch):
    with Checkpointer(tmp_path) as checkpointer:
      # Without jax.distributed there is no coordination service and no preemption step.
      assert not any(checkpointer.reached_preemption(s) for s in range(1, 5))
      monkeypatch.setattr(multihost_utils, "distributed", _FakeDistributed(sync_step=3))
      assert [s for s in range(1, 6) if checkpointer.reached_preemption(s)] == [3]


class _FakeDistributed:
  """What `jax.experimental.multihost_utils` reads of `jax.distributed` on a multi-host run
  whose coordination service agreed on `sync_step` after a preemption notice."""

  def __init__(self, sync_step: int):
    sync_manager = type("SyncManager", (), {"reached_sync_point": lambda _, s: s == sync_step})
    self.global_state = type(
        "State", (), {"client": object(), "preemption_sync_manager": sync_manager()}
    )()


def _make_state(step: int, seed: int) -> tuple[nnx.GraphDef, CheckpointState]:
  """A tiny model + adamw state after one update (count 1, mu/nu non-zero), distinct per seed."""
  graphdef, params = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)))
  opt_state = _TX.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  _, opt_state = _TX.update(grads, opt_state, params)
  key = jax.random.fold_in(jax.random.key(7), seed)
  metadata = {
      "data_position": 10 * step,
      "config": {"lr": 1e-2, "name": "tiny"},
      "best_metric": 0.25,
  }
  return graphdef, CheckpointState(
      step=step, model=params, opt_state=opt_state, key=key, metadata=metadata
  )


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
  for got, want in zip(
      jax.tree.leaves((restored.model, restored.opt_state)),
      jax.tree.leaves((expected["model"], expected["opt_state"])),
  ):
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
    np.testing.assert_array_equal(
        nnx.merge(graphdef, restored.model)(x), nnx.merge(graphdef, state.model)(x)
    )

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

  def test_host_arrays_come_back_as_saved_whatever_the_target(self, tmp_path):
    _, state = _make_state(step=2, seed=0)
    arrays = {
        "a": {
            "tokens": np.arange(6, dtype=np.int32).reshape(2, 3),
            "mask": np.array([True, False]),
        },
        "b": {"logp": np.float32([-1.5, -0.25, 0.0])},
    }
    with Checkpointer(tmp_path) as checkpointer:
      with pytest.raises(TypeError, match="NumPy"):
        checkpointer.save(state._replace(arrays={"x": jnp.zeros(2)}))
      checkpointer.save(state._replace(arrays=arrays))
      checkpointer.save(state._replace(step=3))
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.restore_latest(_abstract_target()).arrays is None
      restored = checkpointer.restore(2, _abstract_target()).arrays
      manifest = json.loads((tmp_path / "2" / MANIFEST_FILE).read_text())
    assert jax.tree.structure(restored) == jax.tree.structure(arrays)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(arrays)):
      assert isinstance(got, np.ndarray) and got.dtype == want.dtype
      np.testing.assert_array_equal(got, want)
    assert manifest["arrays"]["['a']['tokens']"] == {"shape": [2, 3], "dtype": "int32"}
    assert any(name.startswith("arrays/") for name in manifest["files"])

  def test_mismatched_target_raises(self, tmp_path):
    _save_steps(tmp_path, [1])
    target = _abstract_target()
    with Checkpointer(tmp_path) as checkpointer:
      with pytest.raises(ValueError, match="key"):
        checkpointer.restore(
            1, target._replace(key=jax.eval_shape(lambda: jax.random.key(0, impl="rbg")))
        )
      wider = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0))))
      with pytest.raises(CheckpointMismatchError, match=r"float32\[4\] in the checkpoint"):
        checkpointer.restore(1, target._replace(model=wider))


# Runs in its own process: JAX must see 8 CPU devices from its start.
_SHARDED_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from gmpo_jax.infra.checkpointing import Checkpointer, CheckpointState

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
  result = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
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

  def test_saves_without_metrics_are_quiet_and_never_the_best(self, tmp_path, caplog):
    # Orbax warns on every save without metrics when it tracks a metric; the Checkpointer
    # passes it empty metrics instead, which rank last.
    with (
        caplog.at_level(logging.WARNING),
        Checkpointer(tmp_path, max_to_keep=1, best_metric="acc") as checkpointer,
    ):
      for step in (1, 2):
        checkpointer.save(_make_state(step, seed=step)[1])
      checkpointer.wait_until_finished()
      assert checkpointer.all_steps() == [2] and checkpointer.best_step is None
      checkpointer.save(_make_state(3, seed=3)[1], metrics={"acc": 0.5})
      checkpointer.save(_make_state(4, seed=4)[1])
      checkpointer.wait_until_finished()
      assert checkpointer.all_steps() == [3, 4] and checkpointer.best_step == 3
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]

  def test_without_best_metric_keeps_latest_n(self, tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=2)
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [3, 4]
      assert checkpointer.best_step is None


# -- damaged checkpoints ------------------------------------------------------------------------
# The faults (truncate, garbage at three offsets, a single bit flip at three offsets, delete) are
# experiments/fault_table.py's, which runs every one of them on every file for docs/faults.md.

_STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """Steps 1, 2, 3 saved with best_metric, and their expected host values; copy before damaging."""
  directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
  expected = {}
  with Checkpointer(directory, best_metric="acc") as checkpointer:
    for step in _STEPS:
      _, state = _make_state(step, seed=step)
      expected[step] = _host_copy(state)
      checkpointer.save(state, metrics={"acc": float(step)})
  return directory, expected


def _copy(pristine, tmp_path, steps=_STEPS) -> pathlib.Path:
  source, _ = pristine
  directory = tmp_path / "checkpoints"
  keep = {str(s) for s in steps}
  shutil.copytree(
      source,
      directory,
      ignore=lambda d, names: [n for n in names if d == str(source) and n not in keep],
  )
  return directory


def _step_files(step_dir: pathlib.Path) -> list[str]:
  return fault_table.step_files(step_dir)


def _data_file(step_dir: pathlib.Path) -> str:
  """The largest array data file of a step (OCDBT `d/` files hold the arrays)."""
  names = [n for n in _step_files(step_dir) if "/d/" in n]
  return max(names, key=lambda n: (step_dir / n).stat().st_size)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _moved(directory: pathlib.Path) -> list[str]:
  return sorted(p.name.split(".")[0] for p in (directory / CORRUPTED_DIR).glob("*"))


def _assert_falls_back(directory, caplog, expected, *, to, damaged, **restore_kwargs) -> None:
  """restore_latest restores step `to` exactly, warns about and moves every `damaged` step."""
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
    with Checkpointer(directory, best_metric="acc") as checkpointer:
      restored = checkpointer.restore_latest(_abstract_target(), **restore_kwargs)
      assert checkpointer.all_steps() == [s for s in _STEPS if s <= to]
  _assert_restored_equals(restored, expected[to])
  for step in damaged:
    assert any(f"step {step}" in m for m in _warnings(caplog)), (step, _warnings(caplog))
  assert _moved(directory) == sorted(str(s) for s in damaged)


class TestManifest:

  @pytest.mark.parametrize("async_save", [True, False])
  def test_a_saved_step_has_a_complete_sealed_manifest(self, tmp_path, async_save):
    with Checkpointer(tmp_path, async_save=async_save, best_metric="acc") as checkpointer:
      _, state = _make_state(1, seed=1)
      checkpointer.save(state, metrics={"acc": 1.0})
    step_dir = tmp_path / "1"
    manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
    root_files = {MANIFEST_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert sorted(manifest["files"]) == [n for n in _step_files(step_dir) if n not in root_files]
    assert {"metadata/metadata", "metrics/metrics", "state/_METADATA"} <= set(manifest["files"])
    assert sorted(manifest["after_commit"]) == ["_CHECKPOINT_METADATA", "commit_success.txt"]
    assert manifest["tree"]["['model']['kernel'].value"] == {"shape": [3, 4], "dtype": "float32"}
    assert manifest["tree"]["['key']"] == {"shape": [], "dtype": "key<fry>"}
    for name, entry in manifest["files"].items():
      assert entry["sha256"] == hashlib.sha256((step_dir / name).read_bytes()).hexdigest(), name
    with Checkpointer(tmp_path, best_metric="acc") as checkpointer:
      checkpointer.verify(1)

  def test_every_fault_in_every_file_fails_verification(self, pristine, tmp_path):
    directory = _copy(pristine, tmp_path, steps=(3,))
    step_dir = directory / "3"
    names = _step_files(step_dir)
    assert len(names) >= 15, names
    with Checkpointer(directory, best_metric="acc") as checkpointer:
      for name in names:
        path = step_dir / name
        original = path.read_bytes()
        for fault_name, fault in fault_table.FAULTS.items():
          if not original and fault_name != "delete":
            continue
          fault(path)
          with pytest.raises(CorruptCheckpointError) as error:
            checkpointer.verify(3)
          assert path.name in str(error.value), (name, fault_name, error.value)
          path.write_bytes(original)
        checkpointer.verify(3)

  def test_extra_files_and_a_damaged_manifest_fail_verification(self, pristine, tmp_path):
    directory = _copy(pristine, tmp_path, steps=(3,))
    step_dir = directory / "3"
    data = step_dir / _data_file(step_dir)
    manifest_path = step_dir / MANIFEST_FILE
    manifest = manifest_path.read_text()
    with Checkpointer(directory, best_metric="acc") as checkpointer:
      # A half-written extra data file beside the real ones.
      extra = data.parent / "0123456789abcdef"
      extra.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
      with pytest.raises(CorruptCheckpointError, match="not in the manifest"):
        checkpointer.verify(3)
      extra.unlink()
      # Valid JSON, one hash changed: the manifest's own digest no longer matches.
      edited = json.loads(manifest)
      edited["files"]["metadata/metadata"]["sha256"] = "0" * 64
      manifest_path.write_text(json.dumps(edited))
      with pytest.raises(CorruptCheckpointError, match="self-digest"):
        checkpointer.verify(3)
      manifest_path.unlink()
      with pytest.raises(CorruptCheckpointError, match="missing"):
        checkpointer.verify(3)
      manifest_path.write_text(manifest)
      checkpointer.verify(3)

  def test_before_sealing_orbax_files_are_checked_for_structure(self, tmp_path, monkeypatch):
    # A process killed right after Orbax's commit leaves the manifest without the hashes of the
    # two files Orbax writes at the commit: those get the weaker check.
    monkeypatch.setattr(Checkpointer, "_seal", lambda self: None)
    expected = _save_steps(tmp_path, [1, 2])
    monkeypatch.undo()
    step_dir = tmp_path / "2"
    assert json.loads((step_dir / MANIFEST_FILE).read_text())["after_commit"] is None
    step_metadata = step_dir / "_CHECKPOINT_METADATA"
    original = step_metadata.read_bytes()
    with Checkpointer(tmp_path) as checkpointer:
      # The last digit of the commit timestamp: not used to restore, tolerated.
      position = (
          original.index(b'"commit_timestamp_nsecs": ') + len(b'"commit_timestamp_nsecs": ') + 18
      )
      assert original[position : position + 1].isdigit()
      flipped = bytearray(original)
      flipped[position] ^= 1
      step_metadata.write_bytes(bytes(flipped))
      checkpointer.verify(2)
      _assert_restored_equals(checkpointer.restore(2, _abstract_target()), expected[2])
      for fault in ("truncate", "garbage@start", "delete"):
        fault_table.FAULTS[fault](step_metadata)
        with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
          checkpointer.verify(2)
        step_metadata.write_bytes(original)
      (step_dir / "commit_success.txt").unlink()
      with pytest.raises(CorruptCheckpointError, match="commit_success.txt is missing"):
        checkpointer.verify(2)

  def test_a_failing_manifest_write_commits_nothing(self, tmp_path, monkeypatch):
    expected = _save_steps(tmp_path, [1])

    def fail(*args):
      raise OSError("disk full")

    monkeypatch.setattr(integrity, "build_manifest", fail)
    with Checkpointer(tmp_path, async_save=True) as checkpointer:
      _, state = _make_state(2, seed=2)
      checkpointer.save(state)
      with pytest.raises(Exception, match="disk full"):
        checkpointer.wait_until_finished()
      assert checkpointer.all_steps() == [1]
    monkeypatch.undo()
    assert not (tmp_path / "2").exists()
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [1]
      _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected[1])


_ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# What tensorstore raises when a write finds the disk full: a ValueError that quotes strerror.
_TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "x/ocdbt.process_0/d/1": Failed to write 71900 '
    "bytes to file 21: No space left on device [os_error_code='28']"
)


class TestFullDisk:

  @pytest.mark.parametrize("async_save", [True, False])
  @pytest.mark.parametrize("error", [_ENOSPC, _TENSORSTORE_ENOSPC], ids=["OSError", "tensorstore"])
  def test_a_save_out_of_space_is_one_error_and_leaves_nothing(
      self, tmp_path, monkeypatch, async_save, error
  ):
    expected = _save_steps(tmp_path, [1])

    def fail(*args):
      raise error

    monkeypatch.setattr(integrity, "build_manifest", fail)
    _, state = _make_state(2, seed=2)
    with pytest.raises(disk_full.DiskFullError) as raised:
      with Checkpointer(tmp_path, async_save=async_save) as checkpointer:
        checkpointer.save(state)
        checkpointer.save(_make_state(3, seed=3)[1])  # an asynchronous save fails here
    assert str(raised.value) == (
        f"No space left on device while saving step 2 to {tmp_path / '2'}; "
        "the last complete step is 1"
    )
    assert (raised.value.step, raised.value.last_complete) == (2, 1)
    assert sorted(os.listdir(tmp_path)) == ["1"]  # no Orbax tmp directory, no manifest tmp file
    monkeypatch.undo()
    # Once there is space again, the same step saves and restores.
    with Checkpointer(tmp_path, async_save=async_save) as checkpointer:
      assert checkpointer.save(state)
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [1, 2]
      _assert_restored_equals(checkpointer.restore(1, _abstract_target()), expected[1])

  def test_saving_on_after_a_full_disk_removes_the_failed_step_first(self, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "build_manifest", lambda *args: (_ for _ in ()).throw(_ENOSPC))
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
      with pytest.raises(disk_full.DiskFullError):
        checkpointer.save(_make_state(1, seed=1)[1])
      monkeypatch.undo()
      assert checkpointer.save(_make_state(2, seed=2)[1])
      assert checkpointer.all_steps() == [2]
    assert sorted(os.listdir(tmp_path)) == ["2"]

  def test_without_a_complete_step_the_error_says_so(self, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "build_manifest", lambda *args: (_ for _ in ()).throw(_ENOSPC))
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
      with pytest.raises(disk_full.DiskFullError, match=r"step 1 to .*; no step is complete yet"):
        checkpointer.save(_make_state(1, seed=1)[1])
    assert os.listdir(tmp_path) == []

  def test_a_manifest_not_sealed_for_lack_of_space_keeps_its_step(
      self, tmp_path, monkeypatch, caplog
  ):
    write = integrity.write_atomically
    calls = []

    def write_then_fail(path, data):
      calls.append(path)
      if len(calls) > 1:  # the manifest goes in; sealing it finds the disk full
        raise _ENOSPC
      write(path, data)

    monkeypatch.setattr(integrity, "write_atomically", write_then_fail)
    _, state = _make_state(1, seed=1)
    with caplog.at_level(logging.INFO):
      with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(state)
    assert len(calls) == 2
    assert not _warnings(caplog)  # the next write reports the full disk, if any
    assert integrity.read_manifest(tmp_path / "1")["after_commit"] is None
    monkeypatch.undo()
    with Checkpointer(tmp_path) as checkpointer:
      checkpointer.verify(1)
      _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), _host_copy(state))

  def test_an_atomic_write_that_fails_leaves_no_temporary_file(self, tmp_path, monkeypatch):
    (tmp_path / "file").write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(_ENOSPC))
    with pytest.raises(OSError):
      integrity.write_atomically(tmp_path / "file", b"new")
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_bytes() == b"old"


class TestCorruption:

  @pytest.mark.parametrize("position", ["latest", "fallback"])
  def test_a_bit_flip_in_any_file_falls_back(self, pristine, tmp_path, caplog, position):
    # latest: step 3 is damaged, the run resumes from 2. fallback: step 3 is already bad (no
    # manifest) and the step the run then resumes from, 2, is damaged too: it resumes from 1.
    step = 3 if position == "latest" else 2
    names = _step_files(pristine[0] / str(step))
    for i, name in enumerate(names):
      directory = _copy(pristine, tmp_path / str(i))
      fault_table.FAULTS["bit_flip@middle"](directory / str(step) / name)
      if position == "fallback":
        (directory / "3" / MANIFEST_FILE).unlink()
      _assert_falls_back(directory, caplog, pristine[1], to=step - 1, damaged=range(step, 4))

  @pytest.mark.parametrize("position", ["latest", "fallback"])
  @pytest.mark.parametrize(
      "fault", ["truncate", "garbage@start", "garbage@middle", "garbage@end", "delete"]
  )
  @pytest.mark.parametrize("file", ["data", "metadata/metadata", "state/_METADATA"])
  def test_damaged_file_falls_back(self, pristine, tmp_path, caplog, position, fault, file):
    step = 3 if position == "latest" else 2
    directory = _copy(pristine, tmp_path)
    step_dir = directory / str(step)
    fault_table.FAULTS[fault](step_dir / (_data_file(step_dir) if file == "data" else file))
    if position == "fallback":
      (directory / "3" / "state" / "_METADATA").unlink()
    _assert_falls_back(directory, caplog, pristine[1], to=step - 1, damaged=range(step, 4))

  @pytest.mark.parametrize(
      "damage",
      [
          "delete manifest",
          "garbage manifest",
          "edited manifest",
          "extra truncated file",
          "wrong metadata",
          "wrong metrics",
      ],
  )
  def test_other_damage_of_the_latest_falls_back(self, pristine, tmp_path, caplog, damage):
    directory = _copy(pristine, tmp_path)
    step_dir = directory / "3"
    manifest = step_dir / MANIFEST_FILE
    if damage == "delete manifest":
      manifest.unlink()
    elif damage == "garbage manifest":
      manifest.write_bytes(b'{"format": ')
    elif damage == "edited manifest":  # claims another shape: must not be believed
      edited = json.loads(manifest.read_text())
      edited["tree"]["['model']['kernel'].value"]["shape"] = [9, 9]
      manifest.write_text(json.dumps(edited))
    elif damage == "extra truncated file":
      data = step_dir / _data_file(step_dir)
      (data.parent / "0123456789abcdef").write_bytes(data.read_bytes()[:10])
    elif damage == "wrong metadata":  # valid JSON, wrong content (the data position 0)
      metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
      (step_dir / "metadata" / "metadata").write_text(json.dumps({**metadata, "data_position": 0}))
    else:  # valid JSON that would make step 3 the best forever
      (step_dir / "metrics" / "metrics").write_text(json.dumps({"acc": 1e9}))
    _assert_falls_back(directory, caplog, pristine[1], to=2, damaged=[3])

  def test_changed_metrics_of_an_older_step_are_moved_aside_at_open(
      self, pristine, tmp_path, caplog
  ):
    directory = _copy(pristine, tmp_path)
    (directory / "2" / "metrics" / "metrics").write_text(json.dumps({"acc": 1e9}))
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
      with Checkpointer(directory, best_metric="acc") as checkpointer:
        assert checkpointer.all_steps() == [1, 3]
        assert checkpointer.best_step == 3
    assert _moved(directory) == ["2"]
    assert any("step 2" in m and "SHA-256" in m for m in _warnings(caplog))

  @pytest.mark.parametrize("fault", ["truncate", "garbage@middle", "bit_flip@middle", "delete"])
  @pytest.mark.parametrize("file", ["data", "metadata/metadata", "metrics/metrics", MANIFEST_FILE])
  def test_a_damaged_only_step_is_an_error_and_nothing_moves(self, pristine, tmp_path, fault, file):
    directory = _copy(pristine, tmp_path, steps=(3,))
    step_dir = directory / "3"
    fault_table.FAULTS[fault](step_dir / (_data_file(step_dir) if file == "data" else file))
    before = _step_files(step_dir)
    with pytest.raises(RuntimeError, match="nothing was moved") as raised:
      with Checkpointer(directory, best_metric="acc") as checkpointer:
        checkpointer.restore_latest(_abstract_target())
    if file != "metrics/metrics":  # (those fail as the Checkpointer opens)
      assert isinstance(raised.value, UnrestorableCheckpointsError)
      assert raised.value.steps == (3,) and raised.value.problems.startswith("step 3: ")
    assert _step_files(step_dir) == before
    assert not (directory / CORRUPTED_DIR).exists()

  def test_unrestorable_steps_can_be_moved_aside(self, pristine, tmp_path):
    # What a cache does before it is rebuilt (the warm start).
    directory = _copy(pristine, tmp_path)
    for step in _STEPS:
      (directory / str(step) / MANIFEST_FILE).unlink()
    with Checkpointer(directory, best_metric="acc") as checkpointer:
      with pytest.raises(UnrestorableCheckpointsError) as raised:
        checkpointer.restore_latest(_abstract_target())
      checkpointer.move_aside(raised.value.steps)
      assert checkpointer.restore_latest(_abstract_target()) is None
      assert checkpointer.save(_make_state(1, seed=1)[1], metrics={"acc": 0.5})
    assert sorted(_moved(directory)) == sorted(str(s) for s in _STEPS)

  def test_a_step_committed_without_manifest_is_never_listed_nor_restored(
      self, pristine, tmp_path, caplog
  ):
    # What a save cut short between Orbax's commit and its manifest would leave (the manifest is
    # written before the commit, so it cannot happen; an older format or a deleted manifest can).
    directory = _copy(pristine, tmp_path)
    shutil.copytree(directory / "3", directory / "4")
    (directory / "4" / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
      with Checkpointer(directory, best_metric="acc") as checkpointer:
        assert checkpointer.all_steps() == [1, 2, 3]
        assert checkpointer.latest_step == 3
        _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), pristine[1][3])
        _, state = _make_state(4, seed=40)
        assert checkpointer.save(state, metrics={"acc": 4.0})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps()[-1] == 4
    assert _moved(directory) == ["4"]
    assert any("step 4" in m and MANIFEST_FILE in m for m in _warnings(caplog))

  def test_interrupted_save_is_ignored_then_cleaned_up(self, tmp_path):
    expected = _save_steps(tmp_path, [1])
    # A crash during the save of step 2: Orbax's temporary directory is left behind,
    # half written (here: a copy of a complete step with its array data cut short).
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "1", leftover)
    fault_table.truncate(leftover / _data_file(leftover))
    with Checkpointer(tmp_path) as checkpointer:
      assert checkpointer.all_steps() == [1]
      _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected[1])
      _, state = _make_state(2, seed=2)
      assert checkpointer.save(state)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# Runs in its own process: the preemption handler's second SIGTERM kills it while the manifest of
# step 2 is being written (slowed down here), as a user pressing Ctrl-C twice would.
_SECOND_SIGTERM_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
from gmpo_jax.infra import checkpointing, preemption
from gmpo_jax.infra.checkpointing import integrity
build = integrity.build_manifest
def slow_build(*args):
  print("WRITING MANIFEST", flush=True)
  time.sleep(60)
  return build(*args)
integrity.build_manifest = slow_build
ckpt = checkpointing.Checkpointer(sys.argv[1])
with preemption.install_preemption_handler():
  ckpt.save(checkpointing.CheckpointState(2, {"w": jnp.full(3, 2.0)}, {}, jax.random.key(2), {}))
  ckpt.wait_until_finished()
"""


def test_second_sigterm_during_a_save_leaves_no_listed_step(tmp_path):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory) as checkpointer:
    checkpointer.save(CheckpointState(1, {"w": jnp.full(3, 1.0)}, {}, jax.random.key(1), {}))
  process = subprocess.Popen(
      [sys.executable, "-c", _SECOND_SIGTERM_SCRIPT, str(directory)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  try:
    assert process.stdout.readline().strip() == "WRITING MANIFEST", process.stderr.read()[-3000:]
    process.send_signal(signal.SIGTERM)  # the handler asks the loop to stop after the save ...
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # ... the second one goes to the default handler
    assert process.wait(timeout=60) == -signal.SIGTERM
  finally:
    process.kill()
  assert [p.name for p in directory.iterdir() if p.name.startswith("2")] == [
      "2.orbax-checkpoint-tmp"
  ]
  target = CheckpointState(
      0,
      {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
      {},
      jax.eval_shape(lambda: jax.random.key(0)),
      {},
  )
  with Checkpointer(directory) as checkpointer:
    assert checkpointer.all_steps() == [1]
    restored = checkpointer.restore_latest(target)
  assert restored.step == 1
  np.testing.assert_array_equal(restored.model["w"], np.full(3, 1.0))


class TestOtherModel:

  def test_another_model_in_the_latest_step_falls_back_with_a_warning(
      self, tmp_path, caplog, capfd
  ):
    expected = _save_steps(tmp_path, [1, 2])
    wider = nnx.split(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))[1]
    _, state = _make_state(3, seed=3)
    with Checkpointer(tmp_path) as checkpointer:
      checkpointer.save(CheckpointState(3, wider, _TX.init(wider), state.key, {}))
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
      with Checkpointer(tmp_path) as checkpointer:
        _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected[2])
    assert any(
        "step 3" in m
        and "['model']['bias'].value is float32[5] in the checkpoint, the target "
        "has float32[4]" in m
        for m in _warnings(caplog)
    ), _warnings(caplog)
    assert _moved(tmp_path) == ["3"]
    assert "Event loop is closed" not in capfd.readouterr().err

  def test_another_model_in_every_step_is_a_clear_error(self, pristine, tmp_path, capfd):
    directory = _copy(pristine, tmp_path)
    wider = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0))))
    target = _abstract_target()._replace(model=wider)
    with Checkpointer(directory) as checkpointer:
      with pytest.raises(
          CheckpointMismatchError,
          match=r"configured model: step 3: \['model'\]\['bias'\]\.value is float32\[4\] "
          r"in the checkpoint, the target has float32\[5\]\. Nothing was moved",
      ):
        checkpointer.restore_latest(target)
      with pytest.raises(CheckpointMismatchError, match=r"float32\[3, 4\] in the checkpoint"):
        checkpointer.restore(
            1, target._replace(model={**wider, "bias": _abstract_target().model["bias"]})
        )
      assert checkpointer.all_steps() == [1, 2, 3]
    assert not (directory / CORRUPTED_DIR).exists()
    assert "Event loop is closed" not in capfd.readouterr().err

  def test_missing_and_extra_parameters_are_named(self, pristine, tmp_path):
    directory = _copy(pristine, tmp_path, steps=(3,))
    target = _abstract_target()
    extra = {**target.model, "scale": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(directory) as checkpointer:
      with pytest.raises(CheckpointMismatchError, match=r"the target has \['model'\]\['scale'\]"):
        checkpointer.restore(3, target._replace(model=extra))
      with pytest.raises(
          CheckpointMismatchError, match=r"checkpoint holds \['model'\]\['kernel'\]"
      ):
        checkpointer.restore(3, target._replace(model={"bias": target.model["bias"]}))


class TestUnreadable:
  """A step this process may not read is skipped with one warning, never moved, never counted."""

  @pytest.fixture
  def gapped(self, tmp_path):
    """Steps 1, 2 and 5 without best_metric: 5 will be unreadable, the run resumes from 2."""
    directory = tmp_path / "checkpoints"
    return directory, _save_steps(directory, [1, 2, 5])

  def _check_skipped(self, directory, caplog, expected, unreadable_path) -> None:
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
      with Checkpointer(directory, max_to_keep=1) as checkpointer:
        _assert_restored_equals(checkpointer.restore_latest(_abstract_target()), expected[2])
        # The run goes on from step 2. Counted among the latest, step 5 would make retention
        # (max_to_keep=1) delete every new step right after its save.
        for step in (3, 4):
          _, state = _make_state(step, seed=step)
          assert checkpointer.save(state)
          checkpointer.wait_until_finished()
          assert checkpointer.all_steps() == [step]
        # Step 5 itself cannot be replaced: not saved, with a warning.
        _, state = _make_state(5, seed=50)
        assert not checkpointer.save(state)
    skipped = [m for m in _warnings(caplog) if "not readable by this process" in m]
    assert len(skipped) == 1 and str(unreadable_path) in skipped[0], _warnings(caplog)
    assert any("Not saving checkpoint step 5" in m for m in _warnings(caplog))
    assert not (directory / CORRUPTED_DIR).exists()

  def test_unreadable_step_is_skipped_with_one_warning_and_left_in_place(
      self, gapped, caplog, monkeypatch
  ):
    # Root ignores file modes: simulate what a mode-000 step directory gives another user.
    directory, expected = gapped
    step_dir = directory / "5"
    read_manifest = integrity.read_manifest

    def denied(path):
      if pathlib.Path(os.fspath(path)) == step_dir:
        raise PermissionError(13, "Permission denied", os.fspath(path / MANIFEST_FILE))
      return read_manifest(path)

    monkeypatch.setattr(integrity, "read_manifest", denied)
    monkeypatch.setattr(
        Checkpointer, "_quarantine", lambda self, steps: pytest.fail(f"moved {steps}")
    )
    self._check_skipped(directory, caplog, expected, step_dir / MANIFEST_FILE)
    assert (step_dir / MANIFEST_FILE).exists()

  @pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; see the test above")
  @pytest.mark.parametrize("what", ["step", "data file"])
  def test_chmod_000(self, gapped, caplog, what):
    directory, expected = gapped
    path = directory / "5" if what == "step" else directory / "5" / _data_file(directory / "5")
    os.chmod(path, 0)
    try:
      self._check_skipped(
          directory, caplog, expected, path / MANIFEST_FILE if what == "step" else path
      )
    finally:
      os.chmod(path, 0o755)


class TestConfig:

  CONFIG = {
      "seed": 0,
      "num_steps": 10,
      "eval_every": 5,
      "optim": {"learning_rate": 1e-4, "b1": 0.9},
      "algorithm": {
          "advantage": "gmpo",
          "advantage_kwargs": {"normalize": True},
          "num_generations": 8,
          "objective_kwargs": {},
      },
      "task": {"kwargs": {"operations": ("+",)}, "data_dir": ""},
      "checkpoint": {"every": 10, "keep": 2},
      "mesh": {"data": -1},
  }

  def _with(self, **changes):
    config = json.loads(json.dumps(self.CONFIG))
    for dotted, value in changes.items():
      *parents, last = dotted.split("__")
      node = config
      for name in parents:
        node = node[name]
      node[last] = value
    return config

  def test_fingerprint_ignores_order_tuples_and_resumable_fields(self):
    fingerprint = config_fingerprint(self.CONFIG)
    assert len(fingerprint) == 64
    reordered = dict(reversed(list(json.loads(json.dumps(self.CONFIG)).items())))
    assert config_fingerprint(reordered) == fingerprint  # and ("+",) == ["+"]
    resumed = self._with(
        num_steps=20, eval_every=1, checkpoint__every=1, task__data_dir="/d", mesh__data=8
    )
    assert config_fingerprint(resumed) == fingerprint
    for change in (
        {"seed": 1},
        {"optim__learning_rate": 3e-4},
        {"algorithm__num_generations": 4},
        {"algorithm__advantage": "grpo"},
        {"algorithm__objective_kwargs": {"x": 1}},
    ):
      assert config_fingerprint(self._with(**change)) != fingerprint, change

  def test_config_changes_name_every_differing_field(self):
    record = config_record(self.CONFIG)
    assert record["fields"]["algorithm.advantage_kwargs.normalize"] is True
    assert record["fields"]["algorithm.objective_kwargs"] == {}
    config = self._with(seed=1, optim__learning_rate=3e-4, num_steps=99)
    config["algorithm"]["advantage_kwargs"]["offset"] = 1
    assert config_changes(record, config) == [
        ConfigChange("algorithm.advantage_kwargs.offset", MISSING, 1),
        ConfigChange("optim.learning_rate", 1e-4, 3e-4),
        ConfigChange("seed", 0, 1),
    ]
    with pytest.raises(TypeError, match="optim.lr"):
      config_record({"optim": {"lr": object()}})

  def test_restore_latest_refuses_another_config(self, tmp_path, caplog):
    _, state = _make_state(3, seed=3)
    expected = _host_copy(
        state._replace(metadata={CONFIG_METADATA_KEY: config_record(self.CONFIG)})
    )
    with Checkpointer(tmp_path) as checkpointer:
      checkpointer.save(state._replace(metadata=expected["metadata"]))
    with Checkpointer(tmp_path) as checkpointer:
      target = _abstract_target()
      _assert_restored_equals(checkpointer.restore_latest(target, config=self.CONFIG), expected)
      _assert_restored_equals(
          checkpointer.restore_latest(target, config=self._with(num_steps=20)), expected
      )
      with pytest.raises(ConfigMismatchError, match="num_steps: 10 -> 20"):
        checkpointer.restore_latest(target, config=self._with(num_steps=20), resumable=())
      other = self._with(seed=1, optim__learning_rate=3e-4)
      with pytest.raises(
          ConfigMismatchError, match=r"optim\.learning_rate: 0\.0001 -> 0\.0003; " r"seed: 0 -> 1"
      ) as error:
        checkpointer.restore_latest(target, config=other)
      assert [c.field for c in error.value.changes] == ["optim.learning_rate", "seed"]
      with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.checkpointing"):
        _assert_restored_equals(
            checkpointer.restore_latest(target, config=other, allow_config_changes=True), expected
        )
      assert any("seed: 0 -> 1" in m for m in _warnings(caplog))
      assert checkpointer.all_steps() == [3]

  def test_a_step_without_config_record_is_refused_when_a_config_is_given(self, pristine, tmp_path):
    directory = _copy(pristine, tmp_path, steps=(3,))
    with Checkpointer(directory) as checkpointer:
      with pytest.raises(ConfigMismatchError, match="holds no config record"):
        checkpointer.restore_latest(_abstract_target(), config=self.CONFIG)
      assert (
          checkpointer.restore_latest(
              _abstract_target(), config=self.CONFIG, allow_config_changes=True
          ).step
          == 3
      )
      check_config(config_record(self.CONFIG), self.CONFIG)


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
