"""The run's summary: last and best values, non-finite counts, written to summary.json."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Literal, Mapping

from gmpo_jax.infra.metrics import files
from gmpo_jax.infra.metrics.writers import MetricWriter, Scalars, to_record

SUMMARY_FILE = "summary.json"

# The entries `RunSummary.summary` computes; `add` may not replace them.
_RESERVED = ("total_steps", "last_step", "num_records", "final", "best", "nonfinite_counts")


class RunSummary(MetricWriter):
  """Keeps the last value of every metric, the best of some and the non-finite counts; `close`
  writes them to summary.json.

  Args:
    total_steps: number of steps of the run (reported as it is).
    best_modes: metric name -> 'max' | 'min' for the metrics whose best value (and its step)
      goes into the summary. Only finite values compete.
    path: where `close` writes the summary; None: nowhere (processes other than 0).
    records: records logged before this writer (kept from before a resume, as metrics.jsonl
      holds them), counted first.
  """

  def __init__(
      self,
      *,
      total_steps: int,
      best_modes: Mapping[str, Literal["max", "min"]],
      path: pathlib.Path | None,
      records: Iterable[Mapping[str, Any]] = (),
  ):
    self._total_steps = total_steps
    self._best_modes = dict(best_modes)
    self._path = path
    self._num_records = 0
    self._last_step: int | None = None
    self._final: dict[str, int | float | None] = {}
    self._best: dict[str, dict[str, int | float]] = {}
    self._nonfinite_counts: dict[str, int] = {}
    self._extra: dict[str, Any] = {}
    for record in records:
      self._track(record)

  @property
  def nonfinite_counts(self) -> dict[str, int]:
    """Metric name -> how many NaN/inf values were logged (written as null)."""
    return dict(self._nonfinite_counts)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    self._track(to_record(step, scalars))

  def add(self, name: str, value: Any) -> None:
    """Adds a JSON-serializable entry to the summary (e.g. the evaluation before training)."""
    if name in _RESERVED:
      raise ValueError(f"{name!r} is a reserved summary entry")
    self._extra[name] = value

  def summary(self) -> dict[str, Any]:
    """The run so far: last step, last value of every metric, best values, non-finite counts,
    and the entries given to `add`."""
    return {
        "total_steps": self._total_steps,
        "last_step": self._last_step,
        "num_records": self._num_records,
        "final": dict(self._final),
        "best": {name: self._best.get(name) for name in self._best_modes},
        "nonfinite_counts": dict(self._nonfinite_counts),
        **self._extra,
    }

  def close(self) -> None:
    """Replaces summary.json (atomically: a failed write leaves the last whole version)."""
    if self._path is not None:
      files.write_atomically(
          self._path, (json.dumps(self.summary(), indent=2, allow_nan=False) + "\n").encode()
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


def format_summary(summary: Mapping[str, Any], workdir: pathlib.Path) -> str:
  """The summary as the lines printed at the end of a run."""

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
