"""Per-step metrics of the experiment runner: JSON lines, TensorBoard, progress, summary, plots.

Files under `workdir` (written by process 0 only):

    metrics.jsonl          one JSON object per `write`: {"step": int, "<name>": value, ...};
                           non-finite values are `null`
    tensorboard/           TensorBoard event files (tensorboardX), one scalar per metric
                           (finite values only)
    summary.json           written by `close()`: final and best values, non-finite counts
    learning_curves.png    written by `plot_learning_curves`

Resuming from a checkpoint at step S: `MetricsWriter(..., start_step=S)` first drops
the lines with step > S (logged after the checkpoint by the interrupted run) and
tells TensorBoard to hide its events with step > S, so that a resumed run's
metrics.jsonl is identical to an uninterrupted run's. The lines carry no wall-clock
time for that reason; log timings as metrics if needed.

The runner computes the metrics; nothing here knows what they mean.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import pathlib
import re
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
  """tensorboardX, without the PyTorch it imports when installed (only to accept its tensors).

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
  raise TypeError(f"Metric {name!r} must be numeric, got {type(value).__name__} of dtype {array.dtype}.")


_TENSORBOARD_ILLEGAL = re.compile(r"[^A-Za-z0-9_.\-/]")


@functools.cache
def tensorboard_name(name: str) -> str:
  """A metric name TensorBoard accepts as it is ('@' -> '_at_', other illegal characters -> '_'),
  so it never rewrites (and logs a line about) a name itself: 'eval/pass@8' -> 'eval/pass_at_8'."""
  return _TENSORBOARD_ILLEGAL.sub("_", name.replace("@", "_at_"))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl` (missing file: []).

  A line that is not a JSON object with an int "step" (a line cut short by a
  crash) is skipped with a warning.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  with path.open() as file:
    for number, line in enumerate(file, start=1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        logger.warning("Skipping unreadable line %d of %s: %s", number, path, error)
        continue
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        logger.warning("Skipping line %d of %s: no integer 'step'.", number, path)
        continue
      records.append(record)
  return records


class MetricsWriter:
  """Writes one record per training step, on process 0 only (other processes: no I/O).

  Args:
    workdir: directory of the run (created if missing).
    total_steps: number of steps of the run, for the progress bar and ETA.
    start_step: step of the restored checkpoint when resuming: earlier lines
      are kept and replayed into the summary, later ones are dropped. None: a
      fresh run; an existing metrics.jsonl is emptied.
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
    self._is_primary = jax.process_index() == 0
    if not self._is_primary:
      return
    self._workdir.mkdir(parents=True, exist_ok=True)
    kept = [] if start_step is None else [r for r in read_metrics(self._workdir) if r["step"] <= start_step]
    path = self._workdir / METRICS_FILE
    # Rewrite through a temporary file so a crash here cannot lose the kept lines.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    os.replace(temporary, path)
    for record in kept:
      self._track(record)
    self._file = path.open("a")
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=str(self._workdir / TENSORBOARD_DIR),
        # TensorBoard hides older events with step >= purge_step (the steps
        # the interrupted run logged after its checkpoint).
        purge_step=self._min_step,
        # tensorboardX names files by the second: a quick restart would reuse
        # (and truncate) the previous file. Nanoseconds keep them apart and in
        # order, which TensorBoard needs to apply purge_step to the older file.
        filename_suffix=f".{time.time_ns()}",
    )
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

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (name -> scalar; Python, NumPy or JAX) for `step`.

    Non-finite values are written as null in JSON, left out of TensorBoard
    and counted. Steps may repeat but not decrease.

    Raises:
      ValueError: a decreasing step, a metric named "step", a non-scalar value.
      TypeError: a non-numeric value.
    """
    step = operator.index(step)
    if step < self._min_step:
      raise ValueError(f"Step {step} comes before step {self._min_step}, already logged or restored.")
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number; rename the metric.")
    values = {name: to_python_scalar(name, value) for name, value in metrics.items()}
    record = {"step": step, **{name: v if math.isfinite(v) else None for name, v in values.items()}}
    self._min_step = step
    self._track(record)
    if not self._is_primary:
      return
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    for name, value in values.items():
      # The same gap as the JSON null (tensorboardX would also warn per value).
      if math.isfinite(value):
        self._tensorboard.add_scalar(tensorboard_name(name), value, global_step=step)
    self._tensorboard.flush()
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
    logger.info("step %d/%d %s | %.3g s/step | ETA %dm%02ds", step, self._total_steps, fields,
                per_step, eta // 60, eta % 60)

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
          best is None or (value > best["value"] if mode == "max" else value < best["value"])):
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

  def close(self) -> dict[str, Any] | None:
    """Flushes everything, writes summary.json, prints the summary and returns it.

    Returns None on processes other than 0 and on a second call.
    """
    if self._closed or not self._is_primary:
      self._closed = True
      return None
    self._closed = True
    self._bar.close()
    self._file.close()
    self._tensorboard.close()
    summary = self.summary()
    path = self._workdir / SUMMARY_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)
    print(_format_summary(summary, self._workdir))
    return summary

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _format_summary(summary: Mapping[str, Any], workdir: pathlib.Path) -> str:
  def number(value: Any) -> str:
    return "null" if value is None else f"{value:.6g}"

  lines = [f"Run summary ({workdir}): step {summary['last_step']} of {summary['total_steps']}, "
           f"{summary['num_records']} records"]
  lines += [f"  final {name} = {number(value)}" for name, value in summary["final"].items()]
  for name, best in summary["best"].items():
    lines.append(f"  best  {name} = " + ("none finite" if best is None else
                                         f"{number(best['value'])} (step {best['step']})"))
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
    return (np.array([r["step"] for r in rows]), np.array([value(r, key) for r in rows], float),
            np.array([[value(r, f"{key}/ci_low") for r in rows],
                      [value(r, f"{key}/ci_high") for r in rows]], float))

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
        axis.errorbar(steps, values, yerr=np.where(np.isfinite(errors), errors, 0.0),
                      color=color, marker="o", markersize=3.5, linewidth=1.2, capsize=3,
                      label=key)
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
  figure.savefig(path, dpi=100)
  return path


_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _common_prefix(names: Sequence[str]) -> str:
  prefix = os.path.commonprefix(list(names)).rstrip("/_@")
  return prefix or ", ".join(names)
