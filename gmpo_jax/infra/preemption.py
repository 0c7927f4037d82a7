"""SIGTERM / SIGINT as a flag the runner polls, so every phase saves what is in flight and stops."""

from __future__ import annotations

import logging
import signal
import types
from typing import Any, Sequence

import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


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
    logger.warning(
        "Received %s: saving a checkpoint and stopping at the end of this step.",
        signal.Signals(signum).name,
    )

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


class Preempted(Exception):
  """A SIGTERM/SIGINT stopped the run outside the RL loop; what was in flight is saved."""
