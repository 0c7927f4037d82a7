"""The preempt / save skeleton that both training loops run: the warm start
(`gmpo_jax.runner.warm_start`) and the RL loop (`gmpo_jax.runner.loop`) fill in what one step
does and what a checkpoint holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gmpo_jax.infra.preemption import PreemptionHandler


class SaveDecisions(Protocol):
  """When to save (`gmpo_jax.infra.checkpointing.Checkpointer` is one)."""

  def should_save(self, step: int) -> bool:
    ...

  def reached_preemption(self, step: int) -> bool:
    ...


def run_steps(
    step: int,
    num_steps: int,
    *,
    take_step: Callable[[int], tuple[int, bool]],
    save: Callable[[int, bool], None],
    decisions: SaveDecisions,
    preemption: PreemptionHandler,
) -> tuple[int, bool]:
  """Takes steps from `step` to `num_steps`, saving when due, at the end and on a stop request.

  After each step every process asks whether any of them was asked to stop (a signal to one of
  them, `preemption.requested_on_any_process`, a collective; or the preemption sync point that
  the JAX coordination service sets on a multi-host run, `decisions.reached_preemption`), so all
  stop at the same step and take part in the same save. A step that ends the loop (the last
  one, or one that says it is finished) is saved as the last, even when a stop was also
  requested.

  Args:
    step: the first step to take (the restored one, or 0).
    num_steps: the step to stop at.
    take_step: `take_step(step) -> (the step reached, finished)`; finished ends the loop early
      (the warm start reaching its target pass rate).
    save: `save(step, last)` saves the state after `step`; `last` is True when the loop ends
      there by itself (a stop may have been requested too).
    decisions: `should_save(step)`: whether the state after a step is saved when neither last
      nor stopped (the checkpointer's save policy); `reached_preemption(step)`: see above.
    preemption: the run's signal handler.

  Returns:
    (the step reached, whether a stop request ended the loop before its end). The state is
    saved at that step in both cases; with no step to take (`step >= num_steps`) nothing is.
  """
  while step < num_steps:
    step, finished = take_step(step)
    last = finished or step >= num_steps
    stop = preemption.requested_on_any_process() or decisions.reached_preemption(step)
    if last or stop or decisions.should_save(step):
      save(step, last)
    if last or stop:
      return step, not last
  return step, False
