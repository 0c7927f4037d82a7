"""The preempt / save skeleton that both training loops run: the warm start
(`gmpo_jax.runner.warm_start`) and the RL loop (`gmpo_jax.runner.loop`) fill in what one step
does and what a checkpoint holds."""

from __future__ import annotations

from collections.abc import Callable

from gmpo_jax.infra.preemption import PreemptionHandler


def run_steps(
    step: int,
    num_steps: int,
    *,
    take_step: Callable[[int], tuple[int, bool]],
    save: Callable[[int, bool], None],
    save_due: Callable[[int], bool],
    preemption: PreemptionHandler,
) -> tuple[int, bool]:
  """Takes steps from `step` to `num_steps`, saving when due, at the end and on a stop request.

  After each step every process asks whether any of them was asked to stop
  (`preemption.requested_on_any_process`, a collective), so all stop at the same step and take
  part in the same save. A step that ends the loop (the last one, or one that says it is
  finished) is saved as the last, even when a stop was also requested.

  Args:
    step: the first step to take (the restored one, or 0).
    num_steps: the step to stop at.
    take_step: `take_step(step) -> (the step reached, finished)`; finished ends the loop early
      (the warm start reaching its target pass rate).
    save: `save(step, last)` saves the state after `step`; `last` is True when the loop ends
      there by itself (a stop may have been requested too).
    save_due: whether the state after a step is saved when neither last nor stopped.
    preemption: the run's handler.

  Returns:
    (the step reached, whether a stop request ended the loop before its end). The state is
    saved at that step in both cases; with no step to take (`step >= num_steps`) nothing is.
  """
  while step < num_steps:
    step, finished = take_step(step)
    last = finished or step >= num_steps
    stop = preemption.requested_on_any_process()
    if last or stop or save_due(step):
      save(step, last)
    if last or stop:
      return step, not last
  return step, False
