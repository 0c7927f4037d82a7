"""Tests for gmpo_jax.runner.steps.run_steps, the preempt / save skeleton of both training loops."""

import pytest

from gmpo_jax.runner.steps import run_steps


class _Loop:
  """Steps by one; a stop request shows up after `stop_at` (a signal, or at `sync_point` the
  coordination service's preemption step), the run finishes at `finish_at`, saves are due at
  even steps."""

  def __init__(self, *, stop_at=None, finish_at=None, sync_point=None):
    self.stop_at, self.finish_at, self.sync_point = stop_at, finish_at, sync_point
    self.step, self.saves, self.asked = None, [], []

  def take_step(self, step):
    self.step = step + 1
    return self.step, self.step == self.finish_at

  def save(self, step, last):
    self.saves.append((step, last))

  def requested_on_any_process(self):
    return self.stop_at is not None and self.step >= self.stop_at

  def should_save(self, step):
    return step % 2 == 0

  def reached_preemption(self, step):
    self.asked.append(step)
    return step == self.sync_point

  def run(self, first, num_steps):
    return run_steps(
        first,
        num_steps,
        take_step=self.take_step,
        save=self.save,
        decisions=self,
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


def test_the_preemption_sync_point_stops_every_process_at_that_step():
  loop = _Loop(sync_point=3)
  assert loop.run(0, 5) == (3, True)
  assert loop.saves == [(2, False), (3, False)]
  # Asked at every step, as JAX's sync protocol requires.
  assert loop.asked == [1, 2, 3]
