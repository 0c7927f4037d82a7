"""The metric writer interface: clu's `MetricWriter` for scalars, without clu.

clu (`clu.metric_writers`, google/CommonLoopUtils) is the interface JAX training loops log
through: `write_scalars(step, scalars)`, `flush()`, `close()`, and a `MultiWriter` that hands
each call to several writers. The runner's writers follow it, method for method, so that a
backend written for clu (W&B, a dashboard, a test's list) is a few lines to port. clu itself is
not a dependency: clu 0.0.12 cannot be imported without TensorFlow (`import clu.metric_writers`
and `import clu.periodic_actions` both import `clu/metric_writers/tf/summary_writer.py`, which
imports tensorflow), and TensorFlow is not a dependency of gmpo_jax. Only the scalar part of
clu's interface is here: the runner logs nothing else (no images, histograms or hparams).

Two differences from clu: the scalars a writer gets are Python ints and floats, NaN and inf
included (`to_python_scalar` converts them once, before any writer sees them), and a step may
be written more than once (`MetricsWriter.write` checks only that steps do not go back).
"""

from __future__ import annotations

import abc
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

Scalars = Mapping[str, int | float]


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


def to_record(step: int, scalars: Scalars) -> dict[str, int | float | None]:
  """The record of one write, as metrics.jsonl holds it: {"step": step, name: value, ...} with
  None (JSON null) for a non-finite value."""
  return {"step": step, **{name: v if math.isfinite(v) else None for name, v in scalars.items()}}


class MetricWriter(abc.ABC):
  """Where the scalars of a run go: a file, a dashboard, the terminal."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Scalars) -> None:
    """Writes `scalars` (name -> Python int or float, NaN/inf included) for `step`."""

  def flush(self) -> None:
    """Writes out what is buffered. The writers here write each record before they return, so
    there is nothing to do; a writer that buffers overrides this."""

  @abc.abstractmethod
  def close(self) -> None:
    """Flushes and releases the writer's files; it is not used afterwards."""


class MultiWriter(MetricWriter):
  """Hands every call to `writers`, in their order.

  `write_scalars` stops at the first writer that raises: the writers after it never get a
  record an earlier one failed to take (the progress bar does not count a step that
  metrics.jsonl lacks). `flush` and `close` reach every writer even when one raises, so one
  failed file leaves no other open, and then raise the first error; the later ones are logged.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    self._call_each(lambda writer: writer.flush())

  def close(self) -> None:
    self._call_each(lambda writer: writer.close())

  def _call_each(self, call: Callable[[MetricWriter], None]) -> None:
    first = None
    for writer in self._writers:
      try:
        call(writer)
      except Exception as error:  # pylint: disable=broad-exception-caught
        if first is None:
          first = error
        else:
          logger.error("%s failed as well: %r", type(writer).__name__, error, exc_info=error)
    if first is not None:
      raise first
