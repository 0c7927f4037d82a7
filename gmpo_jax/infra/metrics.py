"""Per-step metrics of the experiment runner: JSON lines, TensorBoard, progress, summary, plots.

Files under `workdir` (written by process 0 only):

    metrics.jsonl          one JSON object per `write`: {"step": int, "<name>": value, ...};
                           non-finite values are `null`
    tensorboard/           TensorBoard event files, one scalar per metric (finite values only)
    summary.json           written by `close()`: final and best values, non-finite counts
    learning_curves.png    written by `plot_learning_curves`

The run's history is kept safe:

  * A checkpoint carries a copy: `MetricsWriter.history` is every line logged so far, byte for
    byte, for the checkpoint to hold. Resuming from step S with that copy
    (`MetricsWriter(..., start_step=S, history=...)`), metrics.jsonl must begin with it; the
    lines after it (logged after the checkpoint by the interrupted run) are dropped, so that a
    resumed run's file is identical to an uninterrupted run's (the lines carry no wall-clock
    time for that reason; log timings as metrics if needed). A missing file is restored from the
    copy; a file that differs from it within those steps (a changed byte, a lost line) is moved
    aside to `metrics.jsonl.damaged-<n>` and the copy written in its place, with one warning.
  * Without a copy (a checkpoint of an older gmpo_jax), the lines with step <= S are kept; a line
    that cannot be parsed (bad JSON, bad UTF-8) is never rewritten away: the file is moved aside
    first. Only an unterminated last line (cut short by a crash) is dropped as such.
  * TensorBoard: each writer opens a new event file whose name numbers it after the directory's
    newest one, not after the clock (TensorBoard reads a directory's files in name order, and a
    file's purge marker hides only the events read before it: a resumed run whose clock went back
    must still come last). The marker hides the steps after S. A deleted `tensorboard/` is
    rebuilt from the records kept.
  * Appends are whole or not at all: a write that fails (a full disk) is cut back off the file,
    summary.json is replaced atomically, and no temporary file is left behind. Errors name the
    file.

The runner computes the metrics; nothing here knows what they mean.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import operator
import os
import pathlib
import re
import struct
import sys
import time
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def _import_tensorboardx():
  """tensorboardX (for its event protos and record framing), without the PyTorch it imports when
  installed (only to accept its tensors).

  That import costs a run 2.4 s and 170 MB of memory for nothing (measured on the CPU machine,
  with the `parity` extra's torch). `sys.modules['torch'] = None` makes `import torch` fail for
  that one import; a process that already has torch keeps it.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel

    return tensorboardX
  sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return tensorboardX


tensorboardX = _import_tensorboardx()

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "learning_curves.png"


def to_python_scalar(name: str, value: Any) -> int | float:
  """Converts a metric value (Python, NumPy or JAX scalar, any dtype) to int or float.

  Args:
    name: the metric's name, for error messages.
    value: a 0-d array or scalar; bool and integer dtypes give int, floating
      dtypes (bfloat16 included) give float (NaN/inf are returned as they are).

  Returns:
    A Python int or float.

  Raises:
    ValueError: the value is not 0-d.
    TypeError: the value is not numeric (str, None, object ...).
  """
  array = np.asarray(value)  # a jax.Array is fetched from the device here
  if array.ndim != 0:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
  if array.dtype == np.bool_ or jnp.issubdtype(array.dtype, jnp.integer):
    return int(array)
  if jnp.issubdtype(array.dtype, jnp.floating):
    return float(array)
  raise TypeError(
      f"Metric {name!r} must be numeric, got {type(value).__name__} of dtype {array.dtype}."
  )


_TENSORBOARD_ILLEGAL = re.compile(r"[^A-Za-z0-9_.\-/]")


@functools.cache
def tensorboard_name(name: str) -> str:
  """A metric name TensorBoard accepts as it is ('@' -> '_at_', other illegal characters -> '_'),
  so it never rewrites (and logs a line about) a name itself: 'eval/pass@8' -> 'eval/pass_at_8'."""
  return _TENSORBOARD_ILLEGAL.sub("_", name.replace("@", "_at_"))


def _parse_line(line: bytes) -> dict[str, Any] | None:
  """The record of one line of metrics.jsonl; None unless it is UTF-8 JSON of an object with an
  integer "step"."""
  try:
    record = json.loads(line.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError and json.JSONDecodeError
    return None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    return None
  return record


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
  """(the complete lines of `data`, each with its newline; what follows the last newline)."""
  lines = data.split(b"\n")
  rest = lines.pop()
  return [line + b"\n" for line in lines], rest


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl` (missing file: []).

  A line that is not UTF-8 JSON of an object with an integer "step" (a line cut short by a
  crash, a damaged byte) is skipped with a warning.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return []
  lines, rest = _split_lines(data)
  records = []
  for number, line in enumerate(lines + [rest] * bool(rest), start=1):
    record = _parse_line(line)
    if record is None:
      logger.warning(
          "Skipping unreadable line %d of %s: not UTF-8 JSON of an object with an "
          "integer 'step'.",
          number,
          path,
      )
      continue
    records.append(record)
  return records


@contextlib.contextmanager
def _naming(path: pathlib.Path):
  """Re-raises an OSError that names no file (a failed write() or flush) as one naming `path`."""
  try:
    yield
  except OSError as error:
    if error.filename is not None:
      raise
    raise OSError(error.errno, error.strerror, os.fspath(path)) from error


def _append(file: io.FileIO, data: bytes, path: pathlib.Path) -> None:
  """Appends `data` to the unbuffered `file` whole or not at all: what a failed write (a full
  disk) put in is cut off again, so no half line is left behind."""
  size = os.fstat(file.fileno()).st_size
  with _naming(path):
    try:
      view = memoryview(data)
      while view:
        view = view[file.write(view) :]
    except OSError:
      os.ftruncate(file.fileno(), size)
      raise


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Replaces `path` by `data` through `<path>.tmp`, which a failure removes again."""
  temporary = path.with_name(path.name + ".tmp")
  with _naming(path):
    try:
      temporary.write_bytes(data)
      os.replace(temporary, path)
    except BaseException:
      temporary.unlink(missing_ok=True)
      raise


def _move_aside(path: pathlib.Path) -> pathlib.Path:
  """Renames `path` to the first free `<path>.damaged-<n>` and returns the new path."""
  number = 1
  while (target := path.with_name(f"{path.name}.damaged-{number}")).exists():
    number += 1
  path.rename(target)
  return target


def _restore_history(path: pathlib.Path, start_step: int, history: bytes | None) -> bytes:
  """Makes `path` (metrics.jsonl) hold the run's lines up to `start_step` and returns them.

  `history` is the checkpoint's copy of them (None: a checkpoint without one); see the module
  docstring for what is kept, restored and moved aside.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    data = None
  if history is not None:
    kept = history
    if not data and history:
      logger.warning(
          "%s is missing; restored its %d records up to step %d from the checkpoint.",
          path,
          history.count(b"\n"),
          start_step,
      )
    elif data is not None and not data.startswith(history):
      line = os.path.commonprefix([data, history]).count(b"\n") + 1
      moved = _move_aside(path)
      logger.warning(
          "%s differs from line %d on from the copy of its records up to step %d that "
          "the checkpoint holds; moved it to %s and restored the %d records from the "
          "checkpoint.",
          path,
          line,
          start_step,
          moved,
          history.count(b"\n"),
      )
      data = None
  else:
    lines, rest = _split_lines(data or b"")
    records = [_parse_line(line) for line in lines]
    kept = b"".join(
        line
        for line, record in zip(lines, records)
        if record is not None and record["step"] <= start_step
    )
    if data is None and start_step > 0:
      logger.warning(
          "%s is missing, and checkpoint step %d (written by an older gmpo_jax) holds "
          "no copy of it: its records up to that step are lost.",
          path,
          start_step,
      )
    if rest:
      logger.warning(
          "Skipping line %d of %s: cut short (no newline), written as the run stopped.",
          len(lines) + 1,
          path,
      )
    unreadable = [number for number, record in enumerate(records, start=1) if record is None]
    if unreadable:
      moved = _move_aside(path)
      logger.warning(
          "Line(s) %s of %s cannot be parsed (not UTF-8 JSON of an object with an "
          "integer 'step'); moved the file to %s and kept its %d readable records up "
          "to step %d.",
          unreadable,
          path,
          moved,
          kept.count(b"\n"),
          start_step,
      )
      data = None
  if data != kept:
    _write_atomically(path, kept)
  return kept


_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\..*")


def _record(data: bytes) -> bytes:
  """`data` framed as a TFRecord (length, its masked CRC-32C, data, its masked CRC-32C)."""
  header = struct.pack("<Q", len(data))
  crc = tensorboardX.record_writer.masked_crc32c
  return header + struct.pack("<I", crc(header)) + data + struct.pack("<I", crc(data))


def _scalars_event(step: int, values: Mapping[str, int | float | None]) -> Any:
  """The TensorBoard event of a record's finite values; None when it has none."""
  summary = tensorboardX.proto.summary_pb2.Summary
  finite = [
      summary.Value(tag=tensorboard_name(name), simple_value=value)
      for name, value in values.items()
      if value is not None and math.isfinite(value)
  ]
  if not finite:
    return None
  return tensorboardX.proto.event_pb2.Event(
      wall_time=time.time(), step=step, summary=summary(value=finite)
  )


class _EventFile:
  """A new TensorBoard event file, written at each call (no thread, no buffer).

  Named `events.out.tfevents.<n>.gmpo_jax`, n one more than the number the directory's event
  files carry in that place (tensorboardX's names carry the time there): TensorBoard reads a
  directory's files in name order, and that is the order they were made in, whatever the clock
  says. The file opens with a purge marker at `purge_step`: TensorBoard hides the events with
  step >= `purge_step` read before it (the steps an interrupted run logged after its checkpoint).

  Attributes:
    path: the file.
    first: whether the directory held no event file before this one.
  """

  def __init__(self, directory: pathlib.Path, *, purge_step: int):
    directory.mkdir(parents=True, exist_ok=True)
    numbers = [
        int(match.group(1)) for match in map(_EVENT_FILE.fullmatch, os.listdir(directory)) if match
    ]
    self.first = not numbers
    self.path = directory / f"events.out.tfevents.{max(numbers, default=0) + 1:010d}.gmpo_jax"
    with _naming(self.path):
      self._file = open(self.path, "xb", buffering=0)  # pylint: disable=consider-using-with
    event = tensorboardX.proto.event_pb2
    self.write(
        [
            event.Event(wall_time=time.time(), file_version="brain.Event:2"),
            event.Event(
                wall_time=time.time(),
                step=purge_step,
                session_log=event.SessionLog(status=event.SessionLog.START),
            ),
        ]
    )

  def write(self, events: Sequence[Any]) -> None:
    _append(self._file, b"".join(_record(e.SerializeToString()) for e in events), self.path)

  def close(self) -> None:
    self._file.close()


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
      from it (module docstring). None: the checkpoint holds no copy.
    progress: show a tqdm progress bar on stderr; None: only when stderr is a TTY. Without
      the bar (CI, nohup, a cluster log) a status line is logged every `status_every` steps
      instead: step, the `progress_keys` present, s/step and the ETA.
    progress_keys: metrics shown next to the bar or in the status line (when present).
    status_every: steps between status lines when there is no bar (and at the last step).
    best_modes: metric name -> 'max' | 'min' for the metrics whose best value
      (and its step) goes into the summary. Only finite values compete.
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
    best_modes = dict(best_modes or {})
    for name, mode in best_modes.items():
      if mode not in ("max", "min"):
        raise ValueError(f"best_modes[{name!r}] must be 'max' or 'min', got {mode!r}.")
    self._workdir = pathlib.Path(workdir)
    self._total_steps = total_steps
    self._best_modes = best_modes
    self._progress_keys = tuple(progress_keys)
    self._status_every = max(1, operator.index(status_every))
    self._status_shown: dict[str, str] = {}
    self._status_clock: tuple[int, float] | None = None
    # Steps must not go back: after a resume from S the next record is S + 1 or later.
    self._min_step = 0 if start_step is None else start_step + 1
    self._num_records = 0
    self._last_step: int | None = None
    self._final: dict[str, int | float | None] = {}
    self._best: dict[str, dict[str, int | float]] = {}
    self._nonfinite_counts: dict[str, int] = {}
    self._extra: dict[str, Any] = {}
    self._closed = False
    # Every process keeps the lines (a checkpoint is saved by all of them); only process 0
    # reads and writes files.
    self._history = bytearray(history or b"")
    self._is_primary = jax.process_index() == 0
    if not self._is_primary:
      return
    self._workdir.mkdir(parents=True, exist_ok=True)
    self._path = self._workdir / METRICS_FILE
    if start_step is None:
      kept = b""
      _write_atomically(self._path, kept)
    else:
      kept = _restore_history(self._path, start_step, history)
    self._history = bytearray(kept)
    records = [json.loads(line) for line in kept.splitlines()]
    for record in records:
      self._track(record)
    with _naming(self._path):
      self._file = open(self._path, "ab", buffering=0)  # pylint: disable=consider-using-with
    self._events = _EventFile(self._workdir / TENSORBOARD_DIR, purge_step=self._min_step)
    if self._events.first and records:
      logger.warning(
          "%s holds no event file; rebuilt it from the %d records of %s.",
          self._workdir / TENSORBOARD_DIR,
          len(records),
          self._path,
      )
      events = (
          _scalars_event(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in records
      )
      self._events.write([event for event in events if event is not None])
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=0 if start_step is None else start_step,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
        unit="step",
    )

  @property
  def nonfinite_counts(self) -> dict[str, int]:
    """Metric name -> how many NaN/inf values were logged (written as null)."""
    return dict(self._nonfinite_counts)

  @property
  def history(self) -> bytes:
    """Every line logged so far (those kept from before a resume included), byte for byte as in
    metrics.jsonl: the copy a checkpoint holds, for `MetricsWriter(history=...)`."""
    return bytes(self._history)

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
    values = {name: to_python_scalar(name, value) for name, value in metrics.items()}
    record = {"step": step, **{name: v if math.isfinite(v) else None for name, v in values.items()}}
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    if self._is_primary:
      _append(self._file, line, self._path)
      event = _scalars_event(step, values)
      if event is not None:
        self._events.write([event])
    self._history += line
    self._min_step = step
    self._track(record)
    if not self._is_primary:
      return
    shown = {name: f"{values[name]:.4g}" for name in self._progress_keys if name in values}
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)
    if self._bar.disable:
      self._status(step, shown)

  def _status(self, step: int, shown: Mapping[str, str]) -> None:
    """One log line every `status_every` steps, for logs that are not a terminal."""
    self._status_shown.update(shown)
    now = time.perf_counter()
    if self._status_clock is None:
      self._status_clock = (step, now)
      return
    if step % self._status_every and step != self._total_steps:
      return
    first_step, start = self._status_clock
    per_step = (now - start) / max(step - first_step, 1)
    eta = per_step * (self._total_steps - step)
    fields = " ".join(f"{name}={value}" for name, value in self._status_shown.items())
    logger.info(
        "step %d/%d %s | %.3g s/step | ETA %dm%02ds",
        step,
        self._total_steps,
        fields,
        per_step,
        eta // 60,
        eta % 60,
    )

  def _track(self, record: Mapping[str, Any]) -> None:
    self._num_records += 1
    self._last_step = record["step"]
    for name, value in record.items():
      if name == "step":
        continue
      self._final[name] = value
      if value is None:
        self._nonfinite_counts[name] = self._nonfinite_counts.get(name, 0) + 1
        continue
      mode = self._best_modes.get(name)
      best = self._best.get(name)
      if mode is not None and (
          best is None or (value > best["value"] if mode == "max" else value < best["value"])
      ):
        self._best[name] = {"value": value, "step": record["step"]}

  def add_to_summary(self, name: str, value: Any) -> None:
    """Adds a JSON-serializable entry to the summary (e.g. the evaluation before training)."""
    if name in ("total_steps", "last_step", "num_records", "final", "best", "nonfinite_counts"):
      raise ValueError(f"{name!r} is a reserved summary entry")
    self._extra[name] = value

  def summary(self) -> dict[str, Any]:
    """The run so far: last step, last value of every metric, best values, non-finite counts,
    and the entries given to `add_to_summary`."""
    return {
        "total_steps": self._total_steps,
        "last_step": self._last_step,
        "num_records": self._num_records,
        "final": dict(self._final),
        "best": {name: self._best.get(name) for name in self._best_modes},
        "nonfinite_counts": dict(self._nonfinite_counts),
        **self._extra,
    }

  def close(self, *, report: bool = True) -> dict[str, Any] | None:
    """Flushes everything, writes summary.json, prints the summary (if `report`) and returns it.

    Returns None on processes other than 0 and on a second call.
    """
    if self._closed or not self._is_primary:
      self._closed = True
      return None
    self._closed = True
    self._bar.close()
    self._file.close()
    self._events.close()
    summary = self.summary()
    _write_atomically(
        self._workdir / SUMMARY_FILE,
        (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode(),
    )
    if report:
      print(_format_summary(summary, self._workdir))
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


def _format_summary(summary: Mapping[str, Any], workdir: pathlib.Path) -> str:
  def number(value: Any) -> str:
    return "null" if value is None else f"{value:.6g}"

  lines = [
      f"Run summary ({workdir}): step {summary['last_step']} of {summary['total_steps']}, "
      f"{summary['num_records']} records"
  ]
  lines += [f"  final {name} = {number(value)}" for name, value in summary["final"].items()]
  for name, best in summary["best"].items():
    lines.append(
        f"  best  {name} = "
        + ("none finite" if best is None else f"{number(best['value'])} (step {best['step']})")
    )
  for name, count in summary["nonfinite_counts"].items():
    lines.append(f"  non-finite {name}: {count}")
  return "\n".join(lines)


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
  """Exponential moving average that skips NaN (gaps) and is unbiased at the start.

  out_t = Σ_s w_s x_s / Σ_s w_s over the finite x_s up to t, w_s = smoothing^(t − s); NaN
  before the first finite value.
  """
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing={smoothing} must lie in [0, 1)")
  out = np.full(values.shape, np.nan)
  total = weight = 0.0
  for i, value in enumerate(values):
    total, weight = total * smoothing, weight * smoothing
    if np.isfinite(value):
      total, weight = total + value, weight + 1.0
    if weight > 0:
      out[i] = total / weight
  return out


# A series with at most this many points is drawn as markers (evaluations), not as a curve.
_SPARSE_POINTS = 25


def plot_learning_curves(
    workdir: str | os.PathLike,
    keys: Sequence[str | Sequence[str]],
    *,
    title: str | None = None,
    smoothing: float = 0.9,
    filename: str = PLOT_FILE,
) -> pathlib.Path:
  """Plots metrics against the step from `workdir/metrics.jsonl`, one panel per entry of `keys`.

  A dense series (a value every step) is drawn raw and faint with its EMA (`ema`, weight
  `smoothing`) on top; a sparse one (evaluations) as markers joined by a line, with error
  bars where the records carry '<key>/ci_low' and '<key>/ci_high'. Null (non-finite) values
  show as gaps; a panel without any finite value says so. Uses matplotlib's Agg canvas
  directly (no pyplot, no global backend change).

  Args:
    workdir: the run directory.
    keys: per panel, a metric name or a list of names sharing the panel (with a legend).
    title: the figure's title (say which run it is: task, advantage, objective, seed).
    smoothing: the EMA weight of dense series, in [0, 1).
    filename: the PNG's name inside `workdir`.

  Returns:
    The path of the PNG written.

  Raises:
    ValueError: no keys, no records, or a key that no record has (the error lists
      the available ones).
  """
  panels = [[entry] if isinstance(entry, str) else list(entry) for entry in keys]
  if not panels or not all(panels):
    raise ValueError("keys must name at least one metric per panel.")
  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"No metrics in {pathlib.Path(workdir) / METRICS_FILE}.")
  available = sorted({name for record in records for name in record} - {"step"})
  missing = [key for panel in panels for key in panel if key not in available]
  if missing:
    raise ValueError(f"Metrics {missing} not found; available: {available}.")

  def series(key):
    rows = [r for r in records if key in r]
    # NaN breaks the line, so a null (non-finite) value shows as a gap.
    value = lambda r, k: np.nan if r.get(k) is None else r[k]
    return (
        np.array([r["step"] for r in rows]),
        np.array([value(r, key) for r in rows], float),
        np.array(
            [[value(r, f"{key}/ci_low") for r in rows], [value(r, f"{key}/ci_high") for r in rows]],
            float,
        ),
    )

  figure = Figure(figsize=(7.5, 2.3 * len(panels) + (0.4 if title else 0)), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
  for axis, panel in zip(axes, panels):
    drawn = False
    for color, key in zip(_COLORS, panel):
      steps, values, interval = series(key)
      if not np.isfinite(values).any():
        continue
      drawn = True
      if len(values) <= _SPARSE_POINTS:
        errors = np.abs(interval - values)
        axis.errorbar(
            steps,
            values,
            yerr=np.where(np.isfinite(errors), errors, 0.0),
            color=color,
            marker="o",
            markersize=3.5,
            linewidth=1.2,
            capsize=3,
            label=key,
        )
      else:
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axis.plot(steps, ema(values, smoothing), color=color, linewidth=1.6, label=key)
    if not drawn:
      axis.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=axis.transAxes)
    if len(panel) > 1:
      axis.legend(fontsize="small", loc="best")
    axis.set_ylabel(panel[0] if len(panel) == 1 else _common_prefix(panel), fontsize="small")
    axis.grid(alpha=0.3)
  axes[-1].set_xlabel("step")
  if title:
    figure.suptitle(title, fontsize="medium")
  path = pathlib.Path(workdir) / filename
  image = io.BytesIO()
  figure.savefig(image, format="png", dpi=100)
  _write_atomically(path, image.getvalue())
  return path


_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _common_prefix(names: Sequence[str]) -> str:
  prefix = os.path.commonprefix(list(names)).rstrip("/_@")
  return prefix or ", ".join(names)
