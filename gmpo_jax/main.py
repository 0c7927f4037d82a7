"""Command line: `python -m gmpo_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.algorithm.advantage=grpo`; the config is
locked, so a misspelt field is an error. Config errors (an unknown field, a bad value, a workdir
this process cannot write to, one of another experiment) print one line and exit with status 2,
before any work. Rerunning with the same workdir resumes.
"""

import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from gmpo_jax.config import ConfigError
from gmpo_jax.infra import checkpointing, compilation, distributed
from gmpo_jax.runner import loop

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
    if _CONFIG.value.get("compilation_cache_dir") is not None:
      compilation.enable_persistent_cache(_CONFIG.value.compilation_cache_dir)
    loop.train_and_evaluate(_CONFIG.value, workdir)
  except (ConfigError, WorkdirError, checkpointing.ConfigMismatchError,
          checkpointing.CheckpointMismatchError) as error:
    # A user error, not a crash: one line naming what is wrong, no traceback.
    _exit_with_config_error(str(error))


def _exit_with_config_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def unknown_override(argv: list[str]) -> str | None:
  """The message for the first `--config.a.b=...` of `argv` that names no field of the config
  file that `--config=PATH` loads (None: every override names a field).

  ml_collections reports such an override as a bare `AttributeError: "'b'"` (or a `KeyError`
  below a value) from inside flag parsing; this names the field and what its parent accepts.
  """
  paths = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
  if not paths:
    return None
  config = flags.FLAGS[_CONFIG.name].parser.parse(paths[-1])
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if not name.startswith("config."):
      continue
    holder, parent = config, "config"
    for key in name.split(".")[1:]:
      if not hasattr(holder, "keys"):
        return f"{parent} is a value, not a section: {name} cannot be set"
      if key not in holder:
        return f"unknown config field {name}; {parent} accepts: {', '.join(sorted(holder))}"
      holder, parent = holder[key], f"{parent}.{key}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.` field as one line and exit status 2."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override(argv)
    if message is None:
      raise
    _exit_with_config_error(message)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
