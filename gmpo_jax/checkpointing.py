"""Checkpoints for the experiment runner: the one module that talks to Orbax.

A checkpoint is a `CheckpointState`: the NNX model state (`nnx.state(model)` or
the state half of `nnx.split`), the optax optimizer state, the step, the typed
PRNG key and a JSON metadata dict (data position, config, best metric ...).

On disk, one Orbax step directory per step::

    <directory>/<step>/state      model state, optimizer state and PRNG key (OCDBT)
    <directory>/<step>/metadata   the JSON metadata
    <directory>/<step>/metrics    the metrics given to `save` (only with `best_metric`)
    <directory>/corrupted/<step>.<ns>   steps that could not be read, moved aside

Guarantees:
  * Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when
    complete, so a save interrupted by a crash is never listed nor restored; such
    leftovers are deleted by the primary process before the next save.
  * Retention keeps the `max_to_keep` latest steps AND the best step by
    `best_metric` (never deleted, whatever its age); steps saved without metrics
    live only while they are among the latest.
  * `restore_latest` walks back from the newest step: a step that fails to
    restore (truncated, missing or garbage file; Orbax's OCDBT format carries
    checksums, so flipped bytes fail too) is reported with `logging.warning` and
    the previous one is tried. Failing steps are moved to `corrupted/` only once
    an older step has restored into the same target: if every step fails, the
    cause is the target (a code or config change), nothing is moved and a
    `RuntimeError` is raised.
  * Saves are asynchronous by default: `save` returns once the arrays are copied
    to host memory (so the caller may donate or delete them), the files are
    written in a background thread; `wait_until_finished`/`close` (or leaving
    the `with` block) wait for it, and an error in the background surfaces there
    or at the next `save`.
  * Multi-host: every process calls `save`/`restore*` (they are collective);
    Orbax writes from the primary process only, and the only file operation
    done here (moving a corrupted step aside) runs on the primary process
    between barriers. Restore failures are assumed to be the same on every
    process (a shared file system).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import os
import signal
import time
import types
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from gmpo_jax.metrics import to_python_scalar

logger = logging.getLogger(__name__)

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
CORRUPTED_DIR = "corrupted"
_BARRIER_IDS = itertools.count()


class CheckpointState(NamedTuple):
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: number of completed updates; the Orbax step of the checkpoint.
    model: the NNX model state (`nnx.State`, e.g. `nnx.state(model)`), or any
      pytree of arrays.
    opt_state: the optax optimizer state (any pytree of arrays).
    key: a typed PRNG key array (`jax.random.key`), any shape.
    metadata: JSON-serializable dict (data position, config, best metric ...).
      Restored as plain JSON: tuples come back as lists.
  """

  step: int
  model: Any
  opt_state: Any
  key: jax.Array
  metadata: Mapping[str, Any]


class Checkpointer:
  """Saves and restores `CheckpointState`s under one directory with Orbax.

  Example::

    with Checkpointer(workdir / "checkpoints", max_to_keep=3,
                      best_metric="eval/accuracy", best_mode="max") as ckpt:
      state = ckpt.restore_latest(initial_state) or initial_state
      ...
      ckpt.save(state, metrics={"eval/accuracy": acc})

  Args:
    directory: root directory of the checkpoints (local path or any path
      `etils.epath` understands, e.g. `gs://`).
    max_to_keep: how many of the latest steps to keep (>= 1).
    best_metric: name of the metric (in `save(..., metrics=)`) that ranks
      checkpoints; the best step is kept in addition to the latest ones.
      None: keep only the latest ones, and `save` takes no metrics.
    best_mode: 'max' or 'min': which direction of `best_metric` is better.
      NaN, +-inf or a missing value rank as the worst.
    async_save: write in a background thread (see the module docstring).
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      max_to_keep: int = 3,
      best_metric: str | None = None,
      best_mode: Literal["max", "min"] = "max",
      async_save: bool = True,
  ):
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if best_metric is not None and not (isinstance(best_metric, str) and best_metric):
      raise ValueError(f"best_metric must be a non-empty string or None, got {best_metric!r}.")
    # Orbax needs absolute local paths; URLs (gs://...) are left as they are.
    directory = os.fspath(directory)
    self._directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self._best_metric = best_metric
    self._best_sign = 1.0 if best_mode == "max" else -1.0
    self._name_format = ocp.step.standard_name_format()
    latest = ocp.checkpoint_managers.LatestN(n=max_to_keep)
    if best_metric is None:
      preservation = latest
    else:
      # Orbax's legacy `max_to_keep` + `best_fn` keeps the best N only, so the
      # newest step (the one to resume from) could be deleted; keep both sets.
      preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
          latest,
          ocp.checkpoint_managers.BestN(
              get_metric_fn=self._score,
              n=1,
              keep_checkpoints_without_metrics=False,
          ),
      ])
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        # `best_fn` makes Orbax write the metrics and answer `best_step()`;
        # `_score` is already oriented so that higher is better.
        best_fn=None if best_metric is None else self._score,
        best_mode="max",
        step_name_format=self._name_format,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = self._open_manager()

  # -- properties ---------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps present on disk (committed ones only), ascending."""
    return sorted(self._manager.all_steps())

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  @property
  def best_step(self) -> int | None:
    """Step with the best `best_metric`; None without `best_metric` or metrics."""
    if self._best_metric is None:
      return None
    return self._manager.best_step()

  # -- save ---------------------------------------------------------------------

  def save(
      self,
      state: CheckpointState,
      *,
      metrics: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state` at step `state.step` (collective: call on every process).

    Args:
      state: the state to save; `state.key` must be a typed PRNG key array and
        `state.metadata` JSON-serializable.
      metrics: scalar metrics ranking this checkpoint; must contain
        `best_metric`. Only allowed when the Checkpointer has a `best_metric`.
        A checkpoint saved without metrics is kept only while among the latest.

    Returns:
      True if written; False if `state.step` is already the latest saved step
      (e.g. a preemption save right after a periodic one).

    Raises:
      ValueError: a negative step, a step older than the latest saved one, or bad metrics.
      TypeError: key not a typed PRNG key, metadata not JSON-serializable.
    """
    step = operator.index(state.step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      if step == latest:
        logger.info("Checkpoint for step %d already saved in %s; skipping.", step, self._directory)
        return False
      raise ValueError(
          f"Cannot save step {step}: {self._directory} already holds the later step {latest}.")
    _check_typed_key(state.key)
    metadata = dict(state.metadata)
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as error:
      raise TypeError(f"CheckpointState.metadata must be JSON-serializable: {error}") from error
    self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(_state_tree(state)),
            _METADATA_ITEM: ocp.args.JsonSave(metadata),
        }),
        metrics=self._checked_metrics(metrics),
        force=True,  # the save-interval decision belongs to the runner
    )
    return True

  def _checked_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
      return None
    if self._best_metric is None:
      raise ValueError("metrics were given but this Checkpointer has no best_metric to rank them.")
    if self._best_metric not in metrics:
      raise ValueError(
          f"metrics must contain best_metric {self._best_metric!r}; got keys {sorted(metrics)}.")
    return {name: float(to_python_scalar(name, value)) for name, value in metrics.items()}

  def _score(self, metrics: Mapping[str, Any]) -> float:
    """Higher is better; NaN/inf/missing rank last so they never evict a real best."""
    value = metrics.get(self._best_metric)
    if value is None or not math.isfinite(value):
      return -math.inf
    return self._best_sign * value

  # -- restore ------------------------------------------------------------------

  def restore(
      self,
      step: int,
      target: CheckpointState,
      *,
      mesh: jax.sharding.Mesh | None = None,
  ) -> CheckpointState:
    """Restores `step` into the structure, shapes, dtypes and shardings of `target`.

    Args:
      step: a step in `all_steps()`.
      target: its `model`, `opt_state` and `key` leaves are concrete arrays or
        `jax.ShapeDtypeStruct`s (e.g. from `nnx.eval_shape` + `nnx.split`);
        their shardings are used (required on multi-host). `target.step` and
        `target.metadata` are ignored.
      mesh: the device mesh for target leaves whose `NamedSharding` is over an
        `AbstractMesh` (what `jax.eval_shape` returns for sharded inputs); it
        must have the same axis names and sizes.

    Returns:
      The restored state (arrays cast to the target's dtypes).

    Raises:
      TypeError: a target leaf that is neither an array nor a ShapeDtypeStruct.
      ValueError: an AbstractMesh sharding without a matching `mesh`; on
        multi-host, a leaf without sharding; a restored dtype (e.g. another
        PRNG implementation) or shape that differs from the target.
      Whatever Orbax raises for an unreadable step or a mismatched target
      (ValueError for shape/structure mismatches, FileNotFoundError, ...).
    """
    return self._restore(step, _abstract_tree(target, mesh))

  def _restore(self, step: int, abstract: dict[str, Any]) -> CheckpointState:
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(abstract),
            _METADATA_ITEM: ocp.args.JsonRestore(),
        }),
    )
    tree = restored[_STATE_ITEM]
    # Orbax restores a PRNG key with the implementation it was saved with,
    # whatever the target says; any dtype drift is a mismatch, not a cast.
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(abstract)):
      if got.dtype != want.dtype or got.shape != want.shape:
        raise ValueError(
            f"Restored {jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)}, "
            f"target wants {want.dtype}{list(want.shape)}.")
    return CheckpointState(
        step=step,
        model=tree["model"],
        opt_state=tree["opt_state"],
        key=tree["key"],
        metadata=restored[_METADATA_ITEM],
    )

  def restore_latest(
      self,
      target: CheckpointState,
      *,
      mesh: jax.sharding.Mesh | None = None,
  ) -> CheckpointState | None:
    """Restores the newest readable step into `target` (see `restore` for `target` and `mesh`).

    Returns:
      None if the directory holds no checkpoint, else the restored state of the
      newest step that restores; newer steps that failed are warned about and
      moved to `<directory>/corrupted/`.

    Raises:
      RuntimeError: checkpoints exist but none restores into `target` (nothing
        is moved; the first error is chained).
      ValueError, TypeError: `target` itself is unusable (see `restore`).
    """
    # A bad target raises here, before any step is blamed.
    abstract = _abstract_tree(target, mesh)
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        restored = self._restore(step, abstract)
      except Exception as error:  # noqa: BLE001 - every read failure means "try an older step"
        logger.warning(
            "Could not restore checkpoint step %d from %s (%s: %s); trying an older step.",
            step, self._directory, type(error).__name__, error)
        failures.append((step, error))
        continue
      if failures:
        self._quarantine([s for s, _ in failures])
        self._manager.reload()
        logger.warning("Resuming from step %d; steps %s were moved to %s.", step,
                       [s for s, _ in failures], self._directory / CORRUPTED_DIR)
      return restored
    if failures:
      raise RuntimeError(
          f"None of the checkpoints {steps} in {self._directory} could be restored into the "
          f"given target; nothing was moved. First error (step {failures[0][0]}): "
          f"{type(failures[0][1]).__name__}: {failures[0][1]}") from failures[0][1]
    return None

  # -- corrupted steps ------------------------------------------------------------

  def _open_manager(self) -> ocp.CheckpointManager:
    """Opens the manager; a step whose metrics file is unreadable is moved aside.

    Orbax reads every step's metrics when it opens a directory and fails as a
    whole on one bad file, so the bad steps are found one by one first.
    """
    try:
      return ocp.CheckpointManager(self._directory, options=self._options)
    except Exception:  # noqa: BLE001 - re-raised below unless a metrics file explains it
      bad_steps = self._steps_with_unreadable_metrics()
      if not bad_steps:
        raise
      for step, step_error in bad_steps:
        logger.warning(
            "Checkpoint step %d in %s has an unreadable metrics file (%s: %s).",
            step, self._directory, type(step_error).__name__, step_error)
      self._quarantine([step for step, _ in bad_steps])
      return ocp.CheckpointManager(self._directory, options=self._options)

  def _steps_with_unreadable_metrics(self) -> list[tuple[int, Exception]]:
    probe = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            read_only=True, lightweight_initialize=True, step_name_format=self._name_format))
    bad = []
    try:
      for step in probe.all_steps():
        try:
          probe.metrics(step)
        except Exception as error:  # noqa: BLE001 - any failure to parse is corruption
          bad.append((step, error))
    finally:
      probe.close()
    return bad

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves `steps` to `corrupted/<step>.<ns>` (kept for inspection, out of the way)."""
    self._barrier("quarantine_start")
    if ocp.multihost.is_primary_host(0):
      destination = self._directory / CORRUPTED_DIR
      destination.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = self._name_format.find_step(self._directory, step).path
        target = destination / f"{step}.{time.time_ns()}"
        source.rename(target)
        logger.warning("Moved unreadable checkpoint step %d to %s.", step, target)
    self._barrier("quarantine_done")

  def _barrier(self, name: str) -> None:
    # Orbax barrier names must never repeat within a process; every process
    # makes the same calls in the same order, so the counters agree.
    ocp.multihost.sync_global_processes(f"gmpo_jax_checkpointer_{name}_{next(_BARRIER_IDS)}")

  # -- lifecycle ------------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until a background save is on disk; raises its error if it failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _state_tree(state: CheckpointState) -> dict[str, Any]:
  return {"model": state.model, "opt_state": state.opt_state, "key": state.key}


def _check_typed_key(key: Any) -> None:
  if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise TypeError(
        "CheckpointState.key must be a typed PRNG key array (jax.random.key), got "
        f"{getattr(key, 'dtype', type(key))}; wrap raw uint32 keys with jax.random.wrap_key_data.")


def _abstract_tree(target: CheckpointState, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  abstract = jax.tree.map(lambda leaf: _abstract_leaf(leaf, mesh), _state_tree(target))
  if jax.process_count() > 1:
    unsharded = [jax.tree_util.keystr(path) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(abstract) if leaf.sharding is None]
    if unsharded:
      raise ValueError(f"On multi-host every target leaf needs a sharding; missing for {unsharded[:5]}.")
  return abstract


def _abstract_leaf(leaf: Any, mesh: jax.sharding.Mesh | None) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    raise TypeError(f"Restore target leaves must be jax.Array or jax.ShapeDtypeStruct, got {type(leaf)}.")
  sharding = leaf.sharding
  if not (isinstance(sharding, jax.sharding.NamedSharding)
          and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
    return leaf
  # Orbax needs devices to place the shards on; an abstract mesh has none.
  if mesh is None:
    raise ValueError(
        f"A restore target leaf is sharded over an AbstractMesh {dict(sharding.mesh.shape)} "
        "(as jax.eval_shape returns); pass the concrete mesh with mesh=.")
  if dict(mesh.shape) != dict(sharding.mesh.shape):
    raise ValueError(
        f"mesh {dict(mesh.shape)} does not match the target's abstract mesh {dict(sharding.mesh.shape)}.")
  return leaf.update(sharding=jax.sharding.NamedSharding(mesh, sharding.spec))


class PreemptionHandler:
  """Turns SIGTERM/SIGINT into a flag the training loop polls.

  The first signal sets `requested` (the loop saves and exits cleanly); a
  second one means the loop did not stop in time: the previous handlers are put
  back and the signal is delivered to them (default SIGINT: KeyboardInterrupt;
  default SIGTERM: termination). `close()` (or leaving the `with` block) puts
  the previous handlers back. Install from the main thread only.
  """

  def __init__(self, signals: Sequence[int]):
    self._requested = False
    self._previous: dict[int, Any] = {}
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  @property
  def requested(self) -> bool:
    return self._requested

  def requested_on_any_process(self) -> bool:
    """True if any process got a signal. Collective: call on every process at the same step."""
    flags = multihost_utils.process_allgather(np.asarray(self._requested))
    return bool(np.any(flags))

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self._requested:
      self.close()
      signal.raise_signal(signum)
      return
    self._requested = True
    logger.warning("Received %s: saving a checkpoint and stopping at the end of this step.",
                   signal.Signals(signum).name)

  def close(self) -> None:
    for signum, previous in self._previous.items():
      # None: the previous handler was installed outside Python; the default is closest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __enter__(self) -> PreemptionHandler:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def install_preemption_handler(
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
) -> PreemptionHandler:
  """Installs a `PreemptionHandler` for `signals` (main thread only) and returns it."""
  return PreemptionHandler(signals)
