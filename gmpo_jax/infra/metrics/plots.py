"""Learning curves from metrics.jsonl: one PNG, a panel per metric or group of metrics."""

from __future__ import annotations

import io
import os
import pathlib
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gmpo_jax.infra.metrics import files
from gmpo_jax.infra.metrics.jsonl import METRICS_FILE, read_metrics

PLOT_FILE = "learning_curves.png"


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
  files.write_atomically(path, image.getvalue())
  return path


_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _common_prefix(names: Sequence[str]) -> str:
  prefix = os.path.commonprefix(list(names)).rstrip("/_@")
  return prefix or ", ".join(names)
