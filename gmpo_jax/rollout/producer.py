"""Bounded-staleness rollouts: a producer thread samples the next RL steps while the learner updates.

The schedule is a fixed lag, so no result depends on thread timing: the rollout of RL step t
(from 0) is sampled with parameter version

    v(t) = max(t - k, first),

where version j is the parameters after j updates, k = `config.rollout.max_staleness` and
`first` the version the producer starts from (0, or the step a run resumed at). The learner
publishes every version it makes; the producer waits for v(t) before sampling step t. Each
version is needed by exactly one step beyond the start (j by step j + k), so the producer keeps
a copy of a version from its publication until it samples that step: at most k + 1 copies, and
at most k + 1 rollouts ahead of the learner's current step (the version gate bounds the queue;
no put can block). Keys and prompts are those of the synchronous loop (the caller's `sample`
derives both from the step), so k changes only which parameters sample.

This is the one-step-off-policy / fully-asynchronous split of verl and TRL's AsyncGRPO with a
deterministic lag, as in "Asynchronous RLHF" (Noukhovitch et al. 2024, arXiv 2410.18252). The
ratio's π_old stays the learner's rescoring at update time (the proximal policy of decoupled
PPO, Hilton et al. 2021, arXiv 2110.00641); the sampler's own log-probs in the rollout are the
behaviour policy.

Stopping: `close()` sets the stop flag that every wait of the thread checks and joins the
(daemon) thread with a timeout; an exception in the thread is re-raised, unchanged, by the next
`take` or `peek` of the learner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def behaviour_version(step: int, *, max_staleness: int, first_version: int = 0) -> int:
  """v(t) = max(t - k, first): the parameter version that samples the rollout of `step`."""
  return max(step - max_staleness, first_version)


class ProducerStopped(RuntimeError):
  """The producer was closed, or it finished its steps, before the item asked for existed."""


class RolloutProducer(Generic[T]):
  """Samples the rollouts of `steps` in a daemon thread, step t from version v(t).

  Args:
    sample: `sample(step, version, params) -> item`, run in the thread in step order; `params`
      are what `place` made of the published version.
    steps: the steps to sample, consecutive and ascending.
    max_staleness: k >= 1.
    first_version: the version of `params`; v(t) is never older.
    params: the parameters of `first_version`, already placed for the sampler.
    place: `place(params) -> params` turns the learner's parameters into the sampler's own copy
      (on its shardings, never a buffer the learner's next update donates). Called by `publish`
      in the learner's thread, only for the versions some step needs.
    ready: items already sampled (restored from a checkpoint), by step; they come before
      `steps`.
    join_timeout_s: how long `close` waits for a sample in flight.
  """

  def __init__(
      self,
      sample: Callable[[int, int, Any], T],
      *,
      steps: range,
      max_staleness: int,
      first_version: int,
      params: Any,
      place: Callable[[Any], Any],
      ready: Mapping[int, T] | None = None,
      join_timeout_s: float = 300.0,
  ):
    if max_staleness < 1:
      raise ValueError(f"max_staleness={max_staleness}: the producer is for k >= 1")
    if steps.step != 1:
      raise ValueError(f"steps must be consecutive, got {steps}")
    self._sample, self._steps, self._place = sample, steps, place
    self._k, self._first = max_staleness, first_version
    self._join_timeout_s = join_timeout_s
    self._cond = threading.Condition()
    self._versions: dict[int, Any] = {first_version: params}
    self._ready: dict[int, T] = dict(ready or {})
    self._error: BaseException | None = None
    self._stopped = False
    self._finished = False
    self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
    self._thread.start()

  # -- the producer thread ------------------------------------------------------------------

  def _run(self) -> None:
    try:
      for step in self._steps:
        version = behaviour_version(step, max_staleness=self._k, first_version=self._first)
        with self._cond:
          self._cond.wait_for(lambda: self._stopped or version in self._versions)
          if self._stopped:
            return
          params = self._versions[version]
          for older in [v for v in self._versions if v < version]:
            del self._versions[older]
        item = self._sample(step, version, params)
        with self._cond:
          self._ready[step] = item
          self._cond.notify_all()
    except BaseException as error:  # noqa: BLE001 - handed to the learner's thread
      with self._cond:
        self._error = error
    finally:
      with self._cond:
        self._finished = True
        self._cond.notify_all()

  # -- the learner's side -------------------------------------------------------------------

  def needs(self, version: int) -> bool:
    """Whether some step of `steps` samples from `version` (published versions beyond the
    last such step are dropped without a copy)."""
    return version > self._first and (version + self._k) in self._steps

  def publish(self, version: int, params: Any) -> None:
    """Hands the producer version `version` (the learner's parameters after that many
    updates); copies it with `place` first if a step needs it."""
    if not self.needs(version):
      return
    placed = self._place(params)
    with self._cond:
      self._versions[version] = placed
      self._cond.notify_all()

  def take(self, step: int) -> T:
    """The item of `step`, removed; blocks until it is sampled. Re-raises the thread's error."""
    self._wait(lambda: step in self._ready, f"step {step}")
    with self._cond:
      return self._ready.pop(step)

  def peek(self, steps: range) -> list[T]:
    """The items of `steps`, kept; blocks until all are sampled (a checkpoint's in-flight
    rollouts). Re-raises the thread's error."""
    self._wait(lambda: all(s in self._ready for s in steps), f"steps {steps}")
    with self._cond:
      return [self._ready[s] for s in steps]

  def _wait(self, available: Callable[[], bool], what: str) -> None:
    with self._cond:
      self._cond.wait_for(lambda: available() or self._finished or self._stopped)
      if available():
        return
      if self._error is not None:
        raise self._error
    raise ProducerStopped(f"the rollout producer stopped before {what} was sampled")

  def close(self) -> None:
    """Stops the thread (it finishes a sample in flight) and joins it, bounded."""
    with self._cond:
      self._stopped = True
      self._cond.notify_all()
    self._thread.join(self._join_timeout_s)
    if self._thread.is_alive():
      logger.warning(
          "the rollout producer is still sampling after %.0f s; leaving it (daemon)",
          self._join_timeout_s,
      )

  def __enter__(self) -> RolloutProducer[T]:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
