"""The run's progress on the terminal: a tqdm bar, or status lines in a log that is not one."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import tqdm

from gmpo_jax.infra.metrics.writers import MetricWriter, Scalars

logger = logging.getLogger(__name__)


class ProgressWriter(MetricWriter):
  """A tqdm bar on stderr at the last step written, with a few metrics next to it.

  Without the bar (CI, nohup, a cluster log) a status line is logged every `status_every` steps
  and at the last one instead: step, the `keys` seen so far, s/step and the ETA.

  Args:
    total_steps: number of steps of the run.
    initial_step: the step the bar starts at (the checkpoint's, when resuming).
    enabled: show the bar; None: only when stderr is a TTY.
    keys: metrics shown next to the bar or in the status line (when present).
    status_every: steps between status lines.
  """

  def __init__(
      self,
      *,
      total_steps: int,
      initial_step: int,
      enabled: bool | None,
      keys: Sequence[str],
      status_every: int,
  ):
    self._total_steps = total_steps
    self._keys = tuple(keys)
    self._status_every = status_every
    self._status_shown: dict[str, str] = {}
    self._status_clock: tuple[int, float] | None = None
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=initial_step,
        disable=None if enabled is None else not enabled,
        dynamic_ncols=True,
        unit="step",
    )

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    shown = {name: f"{scalars[name]:.4g}" for name in self._keys if name in scalars}
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)
    if self._bar.disable:
      self._status(step, shown)

  def close(self) -> None:
    self._bar.close()

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
