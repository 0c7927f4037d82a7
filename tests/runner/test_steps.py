"""Tests for gmpo_jax.runner.steps.run_steps, the preempt / save skeleton of both training loops."""

import pytest

from gmpo_jax.runner.steps import run_steps


class _Loop:
  """Steps by one; a stop request shows up after `stop_at`, the run finishes at `finish_at`."""

  def __init__(self, *, stop_at=None, finish_at=None):
    self.stop_at, self.finish_at, self.step, self.saves = stop_at, finish_at, None, []

  def take_step(self, step):
    self.step = step + 1
    return self.step, self.step == self.finish_at

  def save(self, step, last):
    self.saves.append((step, last))

  def requested_on_any_process(self):
    return self.stop_at is not None and self.step >= self.stop_at

  def run(self, first, num_steps):
    return run_steps(
        first,
        num_steps,
        take_step=self.take_step,
        save=self.save,
        save_due=lambda step: step % 2 == 0,
        preemption=self,
    )


@pytest.mark.parametrize(
    "stop_at, finish_at, first, want, saves",
    [
        (None, None, 0, (5, False), [(2, False), (4, False), (5, True)]),
        (None, None, 3, (5, False), [(4, False), (5, True)]),
        (3, None, 0, (3, True), [(2, False), (3, False)]),
        (None, 3, 0, (3, False), [(2, False), (3, True)]),
        # A stop requested at the step that ends the loop: saved as the last, not a preemption.
        (3, 3, 0, (3, False), [(2, False), (3, True)]),
        (5, None, 0, (5, False), [(2, False), (4, False), (5, True)]),
        (None, None, 5, (5, False), []),
    ],
)
def test_saves_when_due_at_the_end_and_on_a_stop(stop_at, finish_at, first, want, saves):
  loop = _Loop(stop_at=stop_at, finish_at=finish_at)
  assert loop.run(first, 5) == want
  assert loop.saves == saves
