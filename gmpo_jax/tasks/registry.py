"""Tasks by name: `get_task('arithmetic', num_digits=3)`."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from gmpo_jax.tasks import arithmetic, base, competition_math, gsm8k, multiplicative, program_tests

TASKS: Mapping[str, type[base.Task]] = {
    task.name: task
    for task in (
        arithmetic.ArithmeticTask,
        program_tests.ProgramTestsTask,
        multiplicative.MultiplicativeTask,
        gsm8k.Gsm8kTask,
        competition_math.MathTask,
    )
}


def get_task(name: str, **hyperparameters: Any) -> base.Task:
  """The task `name` with the given hyperparameters (the rest keep their defaults).

  Nested `ml_collections.ConfigDict` values (from a config file) are passed on as dicts.

  Raises:
    ValueError: unknown name or hyperparameter (the message lists the valid ones), or
      an invalid hyperparameter value.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
  task_cls = TASKS[name]
  valid = [field.name for field in dataclasses.fields(task_cls)]
  unknown = sorted(set(hyperparameters) - set(valid))
  if unknown:
    raise ValueError(f"unknown hyperparameters {unknown} for task {name!r}; valid: {valid}")
  return task_cls(
      **{
          key: value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
          for key, value in hyperparameters.items()
      }
  )
