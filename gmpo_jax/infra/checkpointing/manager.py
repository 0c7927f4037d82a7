"""Checkpoints for the experiment runner: the one module that talks to Orbax.

One concept, the `Checkpointer` (its save / restore / retention protocol), hence its length.

A checkpoint is a `CheckpointState`: the NNX model state (`nnx.state(model)` or
the state half of `nnx.split`), the optax optimizer state, the step, the typed
PRNG key, a JSON metadata dict (data position, config record, best metric ...)
and optionally host arrays whose shapes the restoring run cannot know in advance
(the runner's in-flight rollouts).

On disk, one Orbax step directory per step::

    <directory>/<step>/state                 model state, optimizer state, PRNG key (OCDBT)
    <directory>/<step>/metadata              the JSON metadata
    <directory>/<step>/arrays                the host arrays (only when there are any)
    <directory>/<step>/metrics               the metrics given to `save` (only with `best_metric`)
    <directory>/<step>/gmpo_manifest.json    the integrity manifest (see below)
    <directory>/corrupted/<step>.<ns>        steps that failed verification, moved aside

Guarantees:
  * Integrity manifest. Every step holds `gmpo_manifest.json`: the size and
    SHA-256 of every file of the step, and the shape and dtype of every saved
    array. It is written atomically (temporary file + `os.replace`) into
    Orbax's temporary step directory once all files are written and before
    Orbax commits the step (renames the directory), in Orbax's finalize thread
    for asynchronous saves (`AsyncOptions.post_finalization_callback`). So a
    committed step always holds its manifest, and a step without one (a save
    killed by a second SIGTERM or kill -9, an older format, a deleted
    manifest) is neither listed nor restored. The host arrays' shapes and
    dtypes are recorded too and checked after they are read. Two files are written by Orbax
    at the commit itself: its step metadata (`_CHECKPOINT_METADATA`, which gets
    the commit timestamp) and its commit marker (`commit_success.txt`); their
    hashes are added to the manifest once the save has finished (`save` of the
    next step, `wait_until_finished`, `close`). Until then (a process killed
    right after a commit) the first is only checked to be a JSON object and the
    second to exist; nothing in either is used to restore.
  * Verified restores. Before anything is read through Orbax, the step's files
    are checked against its manifest (a missing, extra, truncated, extended or
    changed file, a missing or damaged manifest all fail), then the stored
    shapes against the target's. So a damaged step or another model's
    checkpoint never reaches Orbax's restore (whose failures leave
    `Event loop is closed` tracebacks behind).
  * `restore_latest` walks back from the newest step. A step that fails
    verification or restore is reported with `logging.warning` and the previous
    one is tried; the failing steps are moved to `corrupted/` once an older step
    has restored. If none restores, nothing is moved and an error says why
    (`CheckpointMismatchError` naming the first mismatched parameter and both
    shapes when the checkpoints are of another model). A step the process may
    not read (permissions) is skipped with one warning naming the path, never
    moved (moving it would fail too), and kept out of retention.
  * Config check. `restore_latest(..., config=)` compares the config record
    saved in the step's metadata (`config_record`, under `CONFIG_METADATA_KEY`)
    with the run's config before restoring, and raises `ConfigMismatchError`
    listing the differing fields (fields in `RESUMABLE_FIELDS` may differ).
  * Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when
    complete, so a save interrupted by a crash is never listed nor restored; such
    leftovers are deleted by the primary process before the next save.
  * Retention keeps the `max_to_keep` latest steps AND the best step by
    `best_metric` (never deleted, whatever its age); steps saved without metrics
    live only while they are among the latest.
  * Saves are asynchronous by default: `save` returns once the arrays are copied
    to host memory (so the caller may donate or delete them), the files are
    written and hashed in a background thread; `wait_until_finished`/`close` (or
    leaving the `with` block) wait for it, and an error in the background
    surfaces there or at the next `save`.
  * A full disk (ENOSPC, EDQUOT) during a save raises `disk_full.DiskFullError`
    (the step, its directory, the newest complete step); `close` (or the next
    `save`) removes what the save wrote, once Orbax's threads are done with it:
    Orbax's temporary directory, or the committed directory when it does not
    verify. A step whose manifest could not be sealed for lack of space stays
    (it keeps the weaker check of an unsealed step).
  * Multi-host: every process calls `save`/`restore*` (they are collective);
    Orbax writes from the primary process only, the manifest is written by the
    primary process, and the only file operation done here (moving a corrupted
    step aside) runs on the primary process between barriers. Verification runs
    on every process and is assumed to give the same answer everywhere (a shared
    file system); each process reads every file of the step it verifies.

Cost: SHA-256 runs at about 0.75 GB/s per core here (hashlib, files hashed in
parallel threads); a step is hashed once when saved and once when restored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import operator
import os
import time
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gmpo_jax.infra import disk_full
from gmpo_jax.infra.checkpointing import identity, integrity
from gmpo_jax.infra.metrics import to_python_scalar

logger = logging.getLogger(__name__)


_STATE_ITEM = "state"


_METADATA_ITEM = "metadata"


_ARRAYS_ITEM = "arrays"


_METRICS_PREFIX = "metrics/"  # Orbax's metrics item inside a step directory


CORRUPTED_DIR = "corrupted"


# After a save failed for lack of space: how long its removed files must stay gone, and how long
# to wait for that at most.
_SETTLE_S = 1.0
_SETTLE_LIMIT_S = 15.0


_BARRIER_IDS = itertools.count()


class CheckpointState(NamedTuple):
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: number of completed updates; the Orbax step of the checkpoint.
    model: the NNX model state (`nnx.State`, e.g. `nnx.state(model)`), or any
      pytree of arrays.
    opt_state: the optax optimizer state (any pytree of arrays).
    key: a typed PRNG key array (`jax.random.key`), any shape.
    metadata: JSON-serializable dict (data position, config record, best metric ...).
      Restored as plain JSON: tuples come back as lists.
    arrays: None, or a pytree of NumPy arrays saved beside the state and restored as saved
      (shapes and dtypes from the checkpoint, whatever the restore target says): data whose
      shape the restoring run cannot know, such as rollouts in flight. Restored as None
      when the step holds none.
  """

  step: int
  model: Any
  opt_state: Any
  key: jax.Array
  metadata: Mapping[str, Any]
  arrays: Any = None


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameter tree does not match the restore target (another model)."""


class UnrestorableCheckpointsError(RuntimeError):
  """Checkpoints exist, but none verifies and restores (damaged, unreadable, half-written).

  Attributes:
    steps: the steps that were tried, newest first.
    problems: what failed, step by step.
  """

  def __init__(self, message: str, *, steps: Sequence[int], problems: str):
    super().__init__(message)
    self.steps, self.problems = tuple(steps), problems


def _is_key_dtype(dtype: Any) -> bool:
  return str(dtype).startswith("key<")


def _tree_mismatch(stored: Mapping[str, Any], abstract: Any) -> str | None:
  """The first difference between the stored tree record and the target, in words; None if none.

  Shapes must agree; dtypes may differ (a restore casts), except PRNG key implementations.
  """
  target = integrity.tree_record(abstract)
  for name, want in target.items():
    got = stored.get(name)
    if got is None:
      return (
          f"the target has {name} ({want['dtype']}{want['shape']}), which the checkpoint "
          "does not hold"
      )
    if list(got["shape"]) != want["shape"] or (
        (_is_key_dtype(got["dtype"]) or _is_key_dtype(want["dtype"]))
        and got["dtype"] != want["dtype"]
    ):
      return (
          f"{name} is {got['dtype']}{list(got['shape'])} in the checkpoint, the target has "
          f"{want['dtype']}{want['shape']}"
      )
  for name, got in stored.items():
    if name not in target:
      return f"the checkpoint holds {name} ({got['dtype']}{list(got['shape'])}), which the target lacks"
  return None


@dataclasses.dataclass
class _ExceptSteps:
  """A preservation policy: `policy` over the steps not in `excluded()`; the excluded are kept.

  For steps this process cannot read (Orbax could not delete them, and
  counting them among the latest would evict the steps the run is writing) and
  steps with damaged metrics (which must not rank as the best).
  """

  policy: Any
  excluded: Callable[[], set[int]]

  def should_preserve(self, checkpoints, *, context):
    excluded = self.excluded()
    considered = [c for c in checkpoints if c.step not in excluded]
    decisions = iter(self.policy.should_preserve(considered, context=context))
    return [True if c.step in excluded else bool(next(decisions)) for c in checkpoints]


class Checkpointer:
  """Saves and restores `CheckpointState`s under one directory with Orbax.

  Example::

    with Checkpointer(workdir / "checkpoints", max_to_keep=3,
                      best_metric="eval/accuracy", best_mode="max") as ckpt:
      state = ckpt.restore_latest(initial_state, config=config_dict) or initial_state
      ...
      ckpt.save(state._replace(metadata={..., CONFIG_METADATA_KEY: config_record(config_dict)}),
                metrics={"eval/accuracy": acc})

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
    save_decision_policy: when a periodic save is due (`should_save`), as an Orbax
      `SaveDecisionPolicy` (e.g. `FixedIntervalPolicy(100)`, several under `AnySavePolicy`).
      None: none is; `save` writes whatever it is given in either case.
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      max_to_keep: int = 3,
      best_metric: str | None = None,
      best_mode: Literal["max", "min"] = "max",
      async_save: bool = True,
      save_decision_policy: ocp.checkpoint_managers.SaveDecisionPolicy | None = None,
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
    self._async_save = async_save
    self._name_format = ocp.step.standard_name_format()
    # Steps this process cannot read, and steps whose metrics differ from their
    # manifest: not listed, skipped by retention (kept, not counted).
    self._unreadable: set[int] = set()
    self._suspect: set[int] = set()
    # (step, tree record, host arrays record or None) of the save in flight, for the
    # manifest callback.
    self._pending: tuple[int, dict[str, Any], dict[str, Any] | None] | None = None
    # A committed step whose manifest still lacks the hash of Orbax's step metadata.
    self._unsealed: int | None = None
    # The step whose save ran out of space (`DiskFullError`), if any.
    self._failed_save: int | None = None
    latest = ocp.checkpoint_managers.LatestN(n=max_to_keep)
    if best_metric is None:
      preservation = latest
    else:
      # Orbax's legacy `max_to_keep` + `best_fn` keeps the best N only, so the
      # newest step (the one to resume from) could be deleted; keep both sets.
      preservation = ocp.checkpoint_managers.AnyPreservationPolicy(
          [
              latest,
              ocp.checkpoint_managers.BestN(
                  get_metric_fn=self._score,
                  n=1,
                  keep_checkpoints_without_metrics=False,
              ),
          ]
      )
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=_ExceptSteps(preservation, lambda: self._unreadable | self._suspect),
        # `best_fn` makes Orbax write the metrics and answer `best_step()`;
        # `_score` is already oriented so that higher is better.
        best_fn=None if best_metric is None else self._score,
        best_mode="max",
        step_name_format=self._name_format,
        save_decision_policy=save_decision_policy
        or ocp.checkpoint_managers.SpecificStepsPolicy(steps=()),
        cleanup_tmp_directories=True,
        # Always Orbax's async checkpointer: the manifest callback exists only
        # there; `async_save=False` waits at the end of `save`.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifest),
    )
    self._manager = self._open_manager()

  # -- properties ---------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def all_steps(self) -> list[int]:
    """Committed steps with an intact manifest (their data is verified on restore), ascending."""
    skipped = self._unreadable | self._suspect
    return [
        step
        for step in sorted(self._manager.all_steps())
        if step not in skipped and self._has_manifest(step)
    ]

  @property
  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  @property
  def best_step(self) -> int | None:
    """Step with the best `best_metric`; None without `best_metric` or metrics."""
    if self._best_metric is None:
      return None
    best = self._manager.best_step()
    if best is None or best not in self.all_steps():
      return None
    # Steps saved without metrics rank last; one of them is never "the best".
    return best if math.isfinite(self._score(self._manager.metrics(best) or {})) else None

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / self._name_format.build_name(step)

  def _has_manifest(self, step: int) -> bool:
    try:
      integrity.read_manifest(self._step_dir(step))
    except (integrity.CorruptCheckpointError, OSError):
      return False
    return True

  # -- save ---------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """Whether the policy asks for a save after `step` (False once `step` is saved or older).

    Orbax evaluates the policy; its context includes `reached_preemption`, so call this on
    every process at the same step.
    """
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """Whether `step` is the step all processes agreed to save at after a preemption notice.

    On a multi-process run the JAX coordination service relays the cluster's notice (SIGTERM on
    one host) to every process and picks the step after the highest one any of them has
    reached; this is True at that step on all of them, so they save together. Call it on every
    process at every step (Orbax's `reached_preemption`; always False without
    `jax.distributed`).
    """
    return self._manager.reached_preemption(step)

  def save(
      self,
      state: CheckpointState,
      *,
      metrics: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state` at step `state.step` (collective: call on every process).

    Args:
      state: the state to save; `state.key` must be a typed PRNG key array and
        `state.metadata` JSON-serializable. Put `config_record(config)` under
        `CONFIG_METADATA_KEY` in it for `restore_latest(config=)` to check.
      metrics: scalar metrics ranking this checkpoint; must contain
        `best_metric`. Only allowed when the Checkpointer has a `best_metric`.
        A checkpoint saved without metrics is kept only while among the latest
        (Orbax gets empty metrics for it, which rank last, so every save of a
        best-tracking manager carries metrics).

    Returns:
      True if written; False if `state.step` is already the latest saved step
      (e.g. a preemption save right after a periodic one), or exists but could
      not be read by `restore_latest` (warned; it cannot be replaced).

    Raises:
      ValueError: a negative step, a step older than the latest saved one, or bad metrics.
      TypeError: key not a typed PRNG key, metadata not JSON-serializable.
    """
    step = operator.index(state.step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    # The previous save's manifest callback must be done before `_pending` changes.
    self.wait_until_finished()
    if self._failed_save is not None:  # saving on after a full disk: its files go first
      self._remove_partial(self._failed_save)
      self._failed_save = None
    if step in self._unreadable:
      logger.warning(
          "Not saving checkpoint step %d: %s exists and this process cannot read it "
          "(restore its permissions or remove it).",
          step,
          self._step_dir(step),
      )
      return False
    on_disk = [s for s in self._manager.all_steps() if s not in self._unreadable]
    latest = max(on_disk, default=None)
    if latest is not None and step <= latest:
      if step == latest:
        logger.info("Checkpoint for step %d already saved in %s; skipping.", step, self._directory)
        return False
      raise ValueError(
          f"Cannot save step {step}: {self._directory} already holds the later step {latest}."
      )
    _check_typed_key(state.key)
    metadata = dict(state.metadata)
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as error:
      raise TypeError(f"CheckpointState.metadata must be JSON-serializable: {error}") from error
    tree = _state_tree(state)
    items = {_STATE_ITEM: ocp.args.StandardSave(tree), _METADATA_ITEM: ocp.args.JsonSave(metadata)}
    arrays = _host_arrays(state.arrays)
    if arrays is not None:
      items[_ARRAYS_ITEM] = ocp.args.StandardSave(arrays)
    checked_metrics = self._checked_metrics(metrics)
    self._pending = (
        step,
        integrity.tree_record(tree),
        None if arrays is None else integrity.tree_record(arrays),
    )
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(**items),
          metrics=checked_metrics,
          force=True,  # the save-interval decision belongs to the runner
      )
    except Exception as error:  # noqa: BLE001 - re-raised unless the disk is full
      if not disk_full.is_disk_full(error):
        raise
      # Orbax's save has not started its background work: nothing will call the manifest back.
      self._pending = None
      raise self._disk_full(step) from error
    if not self._async_save:
      self.wait_until_finished()
    return True

  def _write_pending_manifest(self) -> None:
    """Orbax's post-finalization callback: primary process, all files written, not yet committed.

    An exception here fails the save: Orbax does not commit the step.
    """
    if self._pending is None:
      raise RuntimeError("checkpoint manifest callback without a pending save")
    step, tree, arrays = self._pending
    final = self._step_dir(step)
    # AtomicRename (local disks): <step>.orbax-checkpoint-tmp, renamed at commit;
    # CommitFile (object stores): the final directory, marked at commit.
    temporary = final.parent / (final.name + ocp.path.atomicity.TMP_DIR_SUFFIX)
    step_dir = temporary if temporary.exists() else final
    if not step_dir.exists():
      raise RuntimeError(f"Orbax's directory for step {step} is neither {temporary} nor {final}")
    manifest = integrity.build_manifest(step_dir, step, tree, arrays)
    integrity.write_atomically(
        step_dir / integrity.MANIFEST_FILE, json.dumps(manifest, indent=1).encode()
    )
    self._unsealed = step

  def _seal(self) -> None:
    """Hashes the files Orbax writes at commit into the committed step's manifest (primary only)."""
    step, self._unsealed = self._unsealed, None
    if step is None or not ocp.multihost.is_primary_host(0):
      return
    step_dir = self._step_dir(step)
    try:
      manifest = integrity.read_manifest(step_dir)
      manifest["after_commit"] = {
          name: integrity.sha256_file(step_dir / name) for name in integrity.AFTER_COMMIT_FILES
      }
      integrity.write_atomically(
          step_dir / integrity.MANIFEST_FILE,
          json.dumps(integrity.with_self_digest(manifest), indent=1).encode(),
      )
    except (integrity.CorruptCheckpointError, OSError) as error:
      # Deleted by retention, damaged meanwhile, or no space for the sealed manifest: the unsealed
      # one stays whole (written atomically), and for a full disk the next write reports it.
      log = logger.info if disk_full.is_disk_full(error) else logger.warning
      log(
          "Could not complete the manifest of checkpoint step %d (%s); %s keeps the weaker check.",
          step,
          error,
          integrity.AFTER_COMMIT_FILES,
      )

  def _checked_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
      return None if self._best_metric is None else {}
    if self._best_metric is None:
      raise ValueError("metrics were given but this Checkpointer has no best_metric to rank them.")
    if self._best_metric not in metrics:
      raise ValueError(
          f"metrics must contain best_metric {self._best_metric!r}; got keys {sorted(metrics)}."
      )
    return {name: float(to_python_scalar(name, value)) for name, value in metrics.items()}

  def _score(self, metrics: Mapping[str, Any]) -> float:
    """Higher is better; NaN/inf/missing rank last so they never evict a real best."""
    value = metrics.get(self._best_metric)
    if value is None or not math.isfinite(value):
      return -math.inf
    return self._best_sign * value

  # -- verify / restore -----------------------------------------------------------

  def verify(self, step: int) -> None:
    """Checks every file of `step` against its integrity manifest.

    Raises:
      integrity.CorruptCheckpointError: a missing or damaged manifest; a missing, extra,
        truncated, extended or changed file.
      OSError: a file this process cannot read (PermissionError ...).
    """
    integrity.verify_step_dir(self._step_dir(step))

  def restore(
      self,
      step: int,
      target: CheckpointState,
      *,
      mesh: jax.sharding.Mesh | None = None,
  ) -> CheckpointState:
    """Restores `step` into the structure, shapes, dtypes and shardings of `target`.

    The step is verified against its manifest and its stored shapes compared
    with the target's before Orbax reads anything.

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
      integrity.CorruptCheckpointError: the step fails verification (see `verify`).
      CheckpointMismatchError: the stored tree differs from the target's (a
        missing or extra parameter, another shape or PRNG implementation); the
        message names the first such parameter and both shapes.
      TypeError: a target leaf that is neither an array nor a ShapeDtypeStruct.
      ValueError: an AbstractMesh sharding without a matching `mesh`; on
        multi-host, a leaf without sharding.
      OSError: a file this process cannot read.
    """
    self.wait_until_finished()
    abstract = _abstract_tree(target, mesh)
    manifest = integrity.verify_step_dir(self._step_dir(step))
    mismatch = _tree_mismatch(manifest["tree"], abstract)
    if mismatch:
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self._directory} does not match the restore target "
          f"(another model?): {mismatch}."
      )
    return self._restore(step, abstract, manifest.get("arrays"))

  def restore_metadata(self, step: int) -> dict[str, Any]:
    """The JSON metadata of `step` alone, e.g. its config record, to build a `restore` target.

    The step is verified against its manifest first, like `restore` (which verifies again).

    Raises:
      CorruptCheckpointError, OSError: see `verify`.
    """
    self.wait_until_finished()
    integrity.verify_step_dir(self._step_dir(step))
    return self._restore_metadata(step)

  def _restore(
      self, step: int, abstract: dict[str, Any], arrays_record: dict[str, Any] | None
  ) -> CheckpointState:
    items = {
        _STATE_ITEM: ocp.args.StandardRestore(abstract),
        _METADATA_ITEM: ocp.args.JsonRestore(),
    }
    if arrays_record is not None:
      items[_ARRAYS_ITEM] = ocp.args.StandardRestore()  # as saved: NumPy arrays
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    arrays = restored[_ARRAYS_ITEM] if arrays_record is not None else None
    if arrays is not None and integrity.tree_record(arrays) != arrays_record:
      raise integrity.CorruptCheckpointError(
          f"Checkpoint step {step} in {self._directory}: the host arrays read back differ in "
          "shape or dtype from the ones its manifest records."
      )
    tree = restored[_STATE_ITEM]
    # Orbax restores a PRNG key with the implementation it was saved with,
    # whatever the target says; any dtype drift is a mismatch, not a cast.
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(abstract)
    ):
      if got.dtype != want.dtype or got.shape != want.shape:
        raise CheckpointMismatchError(
            f"Restored {jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)}, "
            f"target wants {want.dtype}{list(want.shape)}."
        )
    return CheckpointState(
        step=step,
        model=tree["model"],
        opt_state=tree["opt_state"],
        key=tree["key"],
        metadata=restored[_METADATA_ITEM],
        arrays=arrays,
    )

  def _restore_metadata(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
    )[_METADATA_ITEM]

  def restore_latest(
      self,
      target: CheckpointState,
      *,
      mesh: jax.sharding.Mesh | None = None,
      config: Mapping[str, Any] | None = None,
      allow_config_changes: bool = False,
      resumable: Sequence[str] = identity.RESUMABLE_FIELDS,
  ) -> CheckpointState | None:
    """Restores the newest valid step into `target` (see `restore` for `target` and `mesh`).

    Each step, newest first, is verified against its manifest, then (with
    `config`) its config record is checked, then its stored shapes are
    compared with the target's, and only then is it read through Orbax. A step
    failing any of these is warned about and the previous one is tried.

    Args:
      target, mesh: see `restore`.
      config: the run's resolved config as a plain nested dict; the step's
        `metadata[CONFIG_METADATA_KEY]` (a `config_record`) must agree with it
        on every field outside `RESUMABLE_FIELDS`. None: no check.
      allow_config_changes: resume despite differing fields (warned, see
        `check_config`); the caller should record `config_changes(...)`.
      resumable: the fields that may differ (`fnmatch` patterns over dotted names).

    Returns:
      None if the directory holds no checkpoint, else the restored state of the
      newest step that verifies and restores; newer steps that failed are moved
      to `<directory>/corrupted/` (except unreadable ones, which stay and are
      skipped).

    Raises:
      ConfigMismatchError: the newest intact step was written with another
        config (fields listed); nothing is moved.
      CheckpointMismatchError: no step restores and at least one holds another
        model: names the first mismatched parameter and both shapes; nothing is moved.
      UnrestorableCheckpointsError: checkpoints exist but none verifies or restores
        (nothing is moved; each step's problem is listed). A `RuntimeError`.
      ValueError, TypeError: `target` itself is unusable (see `restore`).
    """
    self.wait_until_finished()
    # A bad target raises here, before any step is blamed.
    abstract = _abstract_tree(target, mesh)
    steps = sorted(self._manager.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    mismatches: list[tuple[int, str]] = []
    first_error: Exception | None = None

    def skip(step: int, action: str, error: Exception) -> None:
      """Warns that `action` ('read', 'restore') failed on `step` and records why."""
      nonlocal first_error
      why = f"{type(error).__name__}: {error}"
      logger.warning(
          "Could not %s checkpoint step %d in %s (%s); trying an older step.",
          action,
          step,
          self._directory,
          why,
      )
      failed.append((step, why))
      first_error = first_error or error

    for step in steps:
      step_dir = self._step_dir(step)
      if step in self._unreadable:
        failed.append((step, "unreadable"))
        continue
      try:
        manifest = integrity.verify_step_dir(step_dir)
      except integrity.CorruptCheckpointError as error:
        logger.warning(
            "Checkpoint step %d in %s is corrupted (CorruptCheckpointError: %s); trying "
            "an older step.",
            step,
            self._directory,
            error,
        )
        failed.append((step, f"corrupted: {error}"))
        first_error = first_error or error
        continue
      except PermissionError as error:
        logger.warning(
            "Skipping checkpoint step %d: %s is not readable by this process (%s); it "
            "is left in place. Trying an older step.",
            step,
            error.filename or step_dir,
            error,
        )
        self._unreadable.add(step)
        failed.append((step, f"unreadable: {error}"))
        first_error = first_error or error
        continue
      except OSError as error:  # an I/O error: as damaged as a changed byte
        skip(step, "read", error)
        continue
      if config is not None:
        identity.check_config(
            self._restore_metadata(step).get(identity.CONFIG_METADATA_KEY),
            config,
            allow_changes=allow_config_changes,
            resumable=resumable,
            where=f"Checkpoint step {step} in {self._directory}",
        )
      mismatch = _tree_mismatch(manifest["tree"], abstract)
      if mismatch:
        logger.warning(
            "Checkpoint step %d in %s does not match the restore target: %s; trying an "
            "older step.",
            step,
            self._directory,
            mismatch,
        )
        mismatches.append((step, mismatch))
        continue
      try:
        restored = self._restore(step, abstract, manifest.get("arrays"))
      except Exception as error:  # noqa: BLE001 - every read failure means "try an older step"
        skip(step, "restore", error)
        continue
      movable = sorted(
          [s for s, why in failed if not why.startswith("unreadable")] + [s for s, _ in mismatches]
      )
      if movable:
        self._quarantine(movable)
        self._suspect -= set(movable)
        self._manager.reload()
        logger.warning(
            "Resuming from step %d; steps %s were moved to %s.",
            step,
            movable,
            self._directory / CORRUPTED_DIR,
        )
      return restored
    if not steps:
      return None
    problems = "; ".join(f"step {s}: {why}" for s, why in sorted(failed + mismatches, reverse=True))
    if mismatches:
      step, mismatch = mismatches[0]
      raise CheckpointMismatchError(
          f"No checkpoint in {self._directory} matches the configured model: step {step}: "
          f"{mismatch}. Nothing was moved. All steps: {problems}"
      )
    raise UnrestorableCheckpointsError(
        f"None of the checkpoints {steps} in {self._directory} could be verified and restored; "
        f"nothing was moved. {problems}",
        steps=steps,
        problems=problems,
    ) from first_error

  # -- corrupted steps ------------------------------------------------------------

  def _open_manager(self) -> ocp.CheckpointManager:
    """Opens the manager, dealing with damaged metrics files first.

    Orbax reads every step's metrics when it opens a directory (they rank the
    best step) and fails as a whole on one file that does not parse; metrics
    that parse but differ from the manifest would make a damaged step rank as
    the best. Such steps are moved aside when another step with a manifest
    remains. Otherwise nothing is moved: unparsable metrics are an error here,
    changed ones leave the step unlisted and out of retention, for
    `restore_latest` to report.
    """
    try:
      manager = ocp.CheckpointManager(self._directory, options=self._options)
    except Exception as error:  # noqa: BLE001 - re-raised below unless a metrics file explains it
      steps, bad_steps = self._steps_with_unparsable_metrics()
      if not bad_steps:
        raise
      for step, step_error in bad_steps:
        logger.warning(
            "Checkpoint step %d in %s has an unreadable metrics file (%s: %s).",
            step,
            self._directory,
            type(step_error).__name__,
            step_error,
        )
      bad = [step for step, _ in bad_steps]
      if not any(s not in bad and self._has_manifest(s) for s in steps):
        raise RuntimeError(
            f"Checkpoint step(s) {bad} in {self._directory} have damaged metrics files and no "
            f"other checkpoint remains; nothing was moved. First error: "
            f"{type(bad_steps[0][1]).__name__}: {bad_steps[0][1]}"
        ) from error
      self._quarantine(bad)
      manager = ocp.CheckpointManager(self._directory, options=self._options)
    changed = self._steps_with_changed_metrics(manager.all_steps())
    if changed and any(s not in changed and self._has_manifest(s) for s in manager.all_steps()):
      self._quarantine(changed)
      manager.reload()
    else:
      self._suspect = set(changed)
    return manager

  def _steps_with_unparsable_metrics(self) -> tuple[list[int], list[tuple[int, Exception]]]:
    probe = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            read_only=True, lightweight_initialize=True, step_name_format=self._name_format
        ),
    )
    bad = []
    try:
      steps = list(probe.all_steps())
      for step in steps:
        try:
          probe.metrics(step)
        except PermissionError as error:
          logger.warning(
              "Checkpoint step %d: %s is not readable by this process; it is left in "
              "place and skipped.",
              step,
              error.filename,
          )
          self._unreadable.add(step)
        except Exception as error:  # noqa: BLE001 - any failure to parse is corruption
          bad.append((step, error))
    finally:
      probe.close()
    return steps, bad

  def _steps_with_changed_metrics(self, steps: Sequence[int]) -> list[int]:
    changed = []
    for step in steps:
      step_dir = self._step_dir(step)
      try:
        files = integrity.read_manifest(step_dir)["files"]
        for name, entry in files.items():
          if (
              name.startswith(_METRICS_PREFIX)
              and integrity.sha256_file(step_dir / name) != entry["sha256"]
          ):
            logger.warning(
                "Checkpoint step %d in %s: %s does not match its SHA-256 in the " "manifest.",
                step,
                self._directory,
                step_dir / name,
            )
            changed.append(step)
            break
      except (integrity.CorruptCheckpointError, OSError):
        continue  # no manifest, a missing or unreadable file: restore_latest reports it
    return changed

  def move_aside(self, steps: Sequence[int]) -> None:
    """Moves `steps` to `corrupted/` (collective), e.g. the steps of an
    `UnrestorableCheckpointsError` before the cache they held is rebuilt."""
    self.wait_until_finished()
    self._quarantine(steps)
    self._suspect -= set(steps)
    self._manager.reload()

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves `steps` to `corrupted/<step>.<ns>` (kept for inspection, out of the way).

    A step that cannot be moved is warned about and left; it fails verification
    again at the next restore.
    """
    self._barrier("quarantine_start")
    if ocp.multihost.is_primary_host(0):
      destination = self._directory / CORRUPTED_DIR
      destination.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = self._step_dir(step)
        target = destination / f"{step}.{time.time_ns()}"
        try:
          source.rename(target)
        except OSError as error:  # left in place: the next restore meets it (and warns) again
          logger.warning(
              "Could not move damaged checkpoint step %d to %s (%s: %s).",
              step,
              target,
              type(error).__name__,
              error,
          )
          continue
        logger.warning("Moved damaged checkpoint step %d to %s.", step, target)
    self._barrier("quarantine_done")

  def _barrier(self, name: str) -> None:
    # Orbax barrier names must never repeat within a process; every process
    # makes the same calls in the same order, so the counters agree.
    ocp.multihost.sync_global_processes(f"gmpo_jax_checkpointer_{name}_{next(_BARRIER_IDS)}")

  # -- lifecycle ------------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until a background save is on disk; raises its error if it failed.

    Raises:
      disk_full.DiskFullError: the save ran out of space (its files are removed).
    """
    step = None if self._pending is None else self._pending[0]
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - re-raised unless the disk is full
      if step is None or not disk_full.is_disk_full(error):
        raise
      raise self._disk_full(step) from error
    finally:
      self._pending = None
    self._seal()

  def _disk_full(self, step: int) -> disk_full.DiskFullError:
    """Describes the failed save of `step`; its files are removed by `close` (or the next
    `save`), once Orbax's threads that still write them are done."""
    self._failed_save = step
    return disk_full.DiskFullError(
        step=step, path=self._step_dir(step), last_complete=self.latest_step
    )

  def _remove_partial(self, step: int) -> bool:
    """Removes the files of a failed save of `step` (primary process): Orbax's temporary
    directory, or the committed one if it does not verify. Returns whether there were any."""
    if not ocp.multihost.is_primary_host(0):
      return False
    final = self._step_dir(step)
    partial = list(self._directory.glob(final.name + ocp.path.atomicity.TMP_DIR_SUFFIX + "*"))
    if final.exists():
      try:
        integrity.verify_step_dir(final)
      except (integrity.CorruptCheckpointError, OSError):  # committed, but not whole
        partial.append(final)
    for path in partial:
      # Removing only frees space; a failure here leaves a directory that is never listed
      # (Orbax's temporary one) or fails verification (the committed one).
      try:
        path.rmtree()
      except OSError as error:
        logger.warning(
            "Could not remove %s, left by the failed save of step %d: %s", path, step, error
        )
    return bool(partial)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    try:
      self.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except Exception as error:  # noqa: BLE001 - re-raised unless already reported
        # Orbax raises a failed save's error again as it closes: a full disk is reported once.
        if self._failed_save is None or not disk_full.is_disk_full(error):
          raise
      if self._failed_save is not None:
        # The writes tensorstore still had in flight when Orbax gave up on the failed save go on
        # (and fail) after Orbax closes, and can recreate its directories: remove them until they
        # stay gone.
        deadline = time.monotonic() + _SETTLE_LIMIT_S
        while self._remove_partial(self._failed_save) and time.monotonic() < deadline:
          time.sleep(_SETTLE_S)
        self._failed_save = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _state_tree(state: CheckpointState) -> dict[str, Any]:
  return {"model": state.model, "opt_state": state.opt_state, "key": state.key}


def _host_arrays(arrays: Any) -> Any:
  """`CheckpointState.arrays` checked: None when it holds no leaf, else NumPy leaves."""
  if arrays is None or not jax.tree.leaves(arrays):
    return None
  wrong = [
      jax.tree_util.keystr(path)
      for path, leaf in jax.tree_util.tree_leaves_with_path(arrays)
      if not isinstance(leaf, np.ndarray)
  ]
  if wrong:
    raise TypeError(f"CheckpointState.arrays must hold NumPy arrays; not for {wrong[:5]}.")
  return arrays


def _check_typed_key(key: Any) -> None:
  if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise TypeError(
        "CheckpointState.key must be a typed PRNG key array (jax.random.key), got "
        f"{getattr(key, 'dtype', type(key))}; wrap raw uint32 keys with jax.random.wrap_key_data."
    )


def _abstract_tree(target: CheckpointState, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  abstract = jax.tree.map(lambda leaf: _abstract_leaf(leaf, mesh), _state_tree(target))
  if jax.process_count() > 1:
    unsharded = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
        if leaf.sharding is None
    ]
    if unsharded:
      raise ValueError(
          f"On multi-host every target leaf needs a sharding; missing for {unsharded[:5]}."
      )
  return abstract


def _abstract_leaf(leaf: Any, mesh: jax.sharding.Mesh | None) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    raise TypeError(
        f"Restore target leaves must be jax.Array or jax.ShapeDtypeStruct, got {type(leaf)}."
    )
  sharding = leaf.sharding
  if not (
      isinstance(sharding, jax.sharding.NamedSharding)
      and isinstance(sharding.mesh, jax.sharding.AbstractMesh)
  ):
    return leaf
  # Orbax needs devices to place the shards on; an abstract mesh has none.
  if mesh is None:
    raise ValueError(
        f"A restore target leaf is sharded over an AbstractMesh {dict(sharding.mesh.shape)} "
        "(as jax.eval_shape returns); pass the concrete mesh with mesh=."
    )
  if dict(mesh.shape) != dict(sharding.mesh.shape):
    raise ValueError(
        f"mesh {dict(mesh.shape)} does not match the target's abstract mesh {dict(sharding.mesh.shape)}."
    )
  return leaf.update(sharding=jax.sharding.NamedSharding(mesh, sharding.spec))
