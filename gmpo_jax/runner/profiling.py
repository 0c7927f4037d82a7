"""A `jax.profiler` trace of a window of RL steps (`config.perf.profile_steps`).

The trace covers whole steps (rollout, rescoring, update, logging) and lands in
WORKDIR/profile, which TensorBoard's profile plugin and Perfetto read. A run resumed inside the
window traces from its first step there; one that stops inside it (the end, a preemption, an
error) closes the trace first.
"""

from __future__ import annotations

import logging
import pathlib

import jax

logger = logging.getLogger(__name__)


class StepTrace:
  """Starts the trace before the first step of the window and stops it after the last.

  Args:
    steps: (first, last) RL steps, both traced; None: never traces.
    directory: where `jax.profiler.start_trace` writes.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str | pathlib.Path):
    self._steps = steps
    self._directory = str(directory)
    self.active = False

  def before(self, step: int) -> None:
    """Call before taking `step` (the step about to be reached)."""
    if self._steps is None or self.active:
      return
    first, last = self._steps
    if first <= step <= last:
      jax.profiler.start_trace(self._directory)
      self.active = True
      logger.info("profiling RL steps %d..%d into %s", step, last, self._directory)

  def after(self, step: int) -> None:
    """Call after `step` finished (its metrics fetched, so its device work is done)."""
    if self.active and step >= self._steps[1]:
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
