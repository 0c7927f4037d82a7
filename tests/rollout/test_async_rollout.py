"""The rollout producer's schedule, hand-off and shutdown, with plain Python items (no JAX)."""

import threading
import time

import pytest

from gmpo_jax.rollout import producer as async_rollout
from gmpo_jax.rollout.producer import RolloutProducer


def _producer_threads():
  return [t for t in threading.enumerate() if t.name == "rollout-producer" and t.is_alive()]


def _learner(producer, steps):
  """The runner's loop without a model: take step t's item, 'update', publish version t + 1."""
  items = []
  for step in steps:
    items.append(producer.take(step))
    producer.publish(step + 1, f"params{step + 1}")
  return items


@pytest.mark.parametrize("k", [1, 2, 3])
def test_step_t_is_sampled_from_version_t_minus_k_with_the_placed_copy(k):
  placed = []

  def place(params):
    placed.append(params)
    return ("copy", params)

  def sample(step, version, params):
    time.sleep(0.002 * (step % 3))  # uneven sampling times change nothing
    return step, version, params

  with RolloutProducer(
      sample,
      steps=range(6),
      max_staleness=k,
      first_version=0,
      params=("copy", "params0"),
      place=place,
  ) as producer:
    items = _learner(producer, range(6))
  want = [max(t - k, 0) for t in range(6)]
  assert [i[:2] for i in items] == list(zip(range(6), want))
  assert [i[2] for i in items] == [("copy", f"params{v}") for v in want]
  # Only the versions some step samples from are copied: 1 .. 5 - k.
  assert placed == [f"params{v}" for v in range(1, 6 - k)]
  assert not _producer_threads()


def test_a_resumed_producer_hands_out_the_restored_items_first():
  sampled = []

  def sample(step, version, params):
    sampled.append((step, version))
    return f"sampled{step}"

  # Resumed at step 4 with k = 2: the rollouts of steps 4 and 5 came from the checkpoint.
  with RolloutProducer(
      sample,
      steps=range(6, 9),
      max_staleness=2,
      first_version=4,
      params="params4",
      place=lambda p: p,
      ready={4: "restored4", 5: "restored5"},
  ) as producer:
    assert producer.peek(range(4, 6)) == ["restored4", "restored5"]
    items = _learner(producer, range(4, 9))
  assert items == ["restored4", "restored5", "sampled6", "sampled7", "sampled8"]
  assert sampled == [(6, 4), (7, 5), (8, 6)]
  assert async_rollout.behaviour_version(8, max_staleness=2, first_version=4) == 6


def test_an_error_in_the_thread_is_raised_by_the_learner_unchanged():
  def sample(step, version, params):
    if step == 2:
      raise ValueError("Non-finite rewards (NaN or inf) in 1 group(s)")
    return step

  with RolloutProducer(
      sample, steps=range(5), max_staleness=1, first_version=0, params="p", place=lambda p: p
  ) as producer:
    assert _learner(producer, range(2)) == [0, 1]
    with pytest.raises(ValueError, match="Non-finite rewards"):
      producer.take(2)
    with pytest.raises(ValueError, match="Non-finite rewards"):  # and again, not a hang
      producer.peek(range(3, 4))
  assert not _producer_threads()


def test_close_stops_a_producer_waiting_for_a_version_that_never_comes():
  with RolloutProducer(
      lambda step, version, params: step,
      steps=range(5),
      max_staleness=1,
      first_version=0,
      params="p",
      place=lambda p: p,
  ) as producer:
    assert producer.take(0) == 0 and producer.take(1) == 1  # both from version 0
    start = time.monotonic()
  # Step 2 needs version 1, never published: close() wakes the waiting thread at once.
  assert time.monotonic() - start < 5 and not _producer_threads()
  with pytest.raises(async_rollout.ProducerStopped, match="step 2"):
    producer.take(2)


def test_asking_past_the_last_step_is_an_error_not_a_hang():
  with RolloutProducer(
      lambda step, version, params: step,
      steps=range(2),
      max_staleness=1,
      first_version=0,
      params="p",
      place=lambda p: p,
  ) as producer:
    assert _learner(producer, range(2)) == [0, 1]
    with pytest.raises(async_rollout.ProducerStopped, match="step 2"):
      producer.take(2)


def test_max_staleness_zero_has_no_producer():
  with pytest.raises(ValueError, match="k >= 1"):
    RolloutProducer(
        lambda *a: None,
        steps=range(2),
        max_staleness=0,
        first_version=0,
        params="p",
        place=lambda p: p,
    )
