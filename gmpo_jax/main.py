"""Command line: `python -m gmpo_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.algorithm.advantage=grpo`; the config is
locked, so a misspelt field is an error. Rerunning with the same workdir resumes. A workdir
this process cannot write to, or one of another experiment, is a one-line error (exit 2).
"""

import logging
import os
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gmpo_jax import checkpointing
from gmpo_jax import distributed
from gmpo_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, data and metrics.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class WorkdirError(Exception):
  """The workdir cannot be created, or this process cannot write to every directory in it."""


def check_workdir(path: str | os.PathLike[str]) -> pathlib.Path:
  """Creates the workdir if missing and checks that this process can write to all of it.

  The run writes new files in every directory of the workdir (checkpoint steps, the warm-start
  cache, metrics, evaluation results) and deletes old checkpoint steps, so each directory in it
  must be writable. Raises `WorkdirError` naming the first one that is not, before any work.
  """
  workdir = pathlib.Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f"cannot create the workdir {workdir}: {error.strerror or error}") from None
  for directory, _, _ in os.walk(workdir):
    if not os.access(directory, os.W_OK | os.X_OK):
      raise WorkdirError(f"the workdir {workdir} is not writable by this process: "
                         f"{directory} is read-only for it")
  return workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    workdir = check_workdir(_WORKDIR.value)
    # Before anything starts a JAX backend: the device list is fixed then.
    distributed.initialize(
        distributed.DistributedConfig.from_config(_CONFIG.value.get("distributed")))
    train.train_and_evaluate(_CONFIG.value, workdir)
  except (WorkdirError, checkpointing.ConfigMismatchError,
          checkpointing.CheckpointMismatchError) as error:
    # A user error, not a crash: one line naming what differs, no traceback.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
