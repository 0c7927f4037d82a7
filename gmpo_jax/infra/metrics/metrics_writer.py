"""`MetricsWriter`: the runner's one writer, composed of the writers of this package.

Each record goes, in this order, to metrics.jsonl (`jsonl`), TensorBoard (`tensorboard`), the
run summary (`summary`), the progress bar (`progress`), then to any writers the caller adds
(`MetricWriter`: W&B, a dashboard). Process 0 writes the files; the other processes keep the
lines (a checkpoint is saved by every process) and the summary, and touch no file.
"""

from __future__ import annotations

import logging
import operator
import os
import pathlib
from typing import Any, Literal, Mapping, Sequence

import jax

from gmpo_jax.infra.metrics.jsonl import JsonLinesWriter
from gmpo_jax.infra.metrics.progress import ProgressWriter
from gmpo_jax.infra.metrics.summary import SUMMARY_FILE, RunSummary, format_summary
from gmpo_jax.infra.metrics.tensorboard import TENSORBOARD_DIR, TensorBoardWriter
from gmpo_jax.infra.metrics.writers import MetricWriter, MultiWriter, to_python_scalar

logger = logging.getLogger(__name__)


class MetricsWriter:
  """Writes one record per training step, on process 0 only (other processes: no I/O).

  Args:
    workdir: directory of the run (created if missing).
    total_steps: number of steps of the run, for the progress bar and ETA.
    start_step: step of the restored checkpoint when resuming: earlier lines
      are kept and replayed into the summary, later ones are dropped. None: a
      fresh run; an existing metrics.jsonl is emptied.
    history: when resuming, the checkpoint's copy of the lines up to `start_step` (the
      `history` of the writer that saved it): metrics.jsonl is checked against it and restored
      from it (`gmpo_jax.infra.metrics.jsonl`). None: the checkpoint holds no copy.
    progress: show a tqdm progress bar on stderr; None: only when stderr is a TTY. Without
      the bar (CI, nohup, a cluster log) a status line is logged every `status_every` steps
      instead: step, the `progress_keys` present, s/step and the ETA.
    progress_keys: metrics shown next to the bar or in the status line (when present).
    status_every: steps between status lines when there is no bar (and at the last step).
    best_modes: metric name -> 'max' | 'min' for the metrics whose best value
      (and its step) goes into the summary. Only finite values compete.
    extra_writers: further writers, given each record after the built-in ones (as Python
      scalars, NaN and inf included) and closed with this one. They get the records of every
      process: create them on process 0 only for a backend that should see each record once.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      total_steps: int,
      start_step: int | None = None,
      history: bytes | None = None,
      progress: bool | None = None,
      progress_keys: Sequence[str] = (),
      best_modes: Mapping[str, Literal["max", "min"]] | None = None,
      status_every: int = 50,
      extra_writers: Sequence[MetricWriter] = (),
  ):
    total_steps = operator.index(total_steps)
    if total_steps < 1:
      raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if start_step is not None and operator.index(start_step) < 0:
      raise ValueError(f"start_step must be >= 0 or None, got {start_step}.")
    if history is not None and start_step is None:
      raise ValueError(
          "history is the copy a checkpoint holds: it needs the checkpoint's start_step."
      )
    status_every = max(1, operator.index(status_every))
    best_modes = dict(best_modes or {})
    for name, mode in best_modes.items():
      if mode not in ("max", "min"):
        raise ValueError(f"best_modes[{name!r}] must be 'max' or 'min', got {mode!r}.")
    self._workdir = pathlib.Path(workdir)
    # Steps must not go back: after a resume from S the next record is S + 1 or later.
    self._min_step = 0 if start_step is None else start_step + 1
    self._closed = False
    self._is_primary = jax.process_index() == 0
    self._jsonl = JsonLinesWriter(
        self._workdir, start_step=start_step, history=history, write_file=self._is_primary
    )
    self._summary = RunSummary(
        total_steps=total_steps,
        best_modes=best_modes,
        path=self._workdir / SUMMARY_FILE if self._is_primary else None,
        records=self._jsonl.restored,
    )
    writers: list[MetricWriter] = [self._jsonl]
    if self._is_primary:
      events = TensorBoardWriter(self._workdir / TENSORBOARD_DIR, purge_step=self._min_step)
      events.rebuild(self._jsonl.restored, self._jsonl.path)
      writers.append(events)
    # The summary counts a record once the files hold it.
    writers.append(self._summary)
    if self._is_primary:
      writers.append(
          ProgressWriter(
              total_steps=total_steps,
              initial_step=0 if start_step is None else start_step,
              enabled=progress,
              keys=progress_keys,
              status_every=status_every,
          )
      )
    self._writers = MultiWriter(writers + list(extra_writers))

  @property
  def nonfinite_counts(self) -> dict[str, int]:
    """Metric name -> how many NaN/inf values were logged (written as null)."""
    return self._summary.nonfinite_counts

  @property
  def history(self) -> bytes:
    """Every line logged so far (those kept from before a resume included), byte for byte as in
    metrics.jsonl: the copy a checkpoint holds, for `MetricsWriter(history=...)`."""
    return self._jsonl.history

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (name -> scalar; Python, NumPy or JAX) for `step`.

    Non-finite values are written as null in JSON, left out of TensorBoard
    and counted. Steps may repeat but not decrease.

    Raises:
      ValueError: a decreasing step, a metric named "step", a non-scalar value.
      TypeError: a non-numeric value.
      OSError: a write failed (naming the file); each file holds the record whole or not at all.
    """
    step = operator.index(step)
    if step < self._min_step:
      raise ValueError(
          f"Step {step} comes before step {self._min_step}, already logged or restored."
      )
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number; rename the metric.")
    self._writers.write_scalars(
        step, {name: to_python_scalar(name, value) for name, value in metrics.items()}
    )
    self._min_step = step

  def add_to_summary(self, name: str, value: Any) -> None:
    """Adds a JSON-serializable entry to the summary (e.g. the evaluation before training)."""
    self._summary.add(name, value)

  def summary(self) -> dict[str, Any]:
    """The run so far: last step, last value of every metric, best values, non-finite counts,
    and the entries given to `add_to_summary`."""
    return self._summary.summary()

  def close(self, *, report: bool = True) -> dict[str, Any] | None:
    """Closes every writer (summary.json is written), prints the summary (if `report`) and
    returns it.

    Returns None on processes other than 0 and on a second call.
    """
    if self._closed:
      return None
    self._closed = True
    self._writers.close()
    if not self._is_primary:
      return None
    summary = self._summary.summary()
    if report:
      print(format_summary(summary, self._workdir))
    return summary

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(
      self, exc_type: type[BaseException] | None, error: BaseException | None, traceback: object
  ) -> None:
    # An error in flight is the one to report: the summary is written, not printed.
    try:
      self.close(report=error is None)
    except OSError as close_error:
      if error is None:
        raise
      # A full disk fails this write too; summary.json keeps its last whole version.
      logger.debug("summary.json not written: %s", close_error)
