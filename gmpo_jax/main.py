"""Command line: `python -m gmpo_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.algorithm.advantage=grpo`; the config is
locked, so a misspelt field is an error. Usage and config errors (a missing flag or config file,
a positional argument, an unknown field, a bad value, an empty workdir, one this process cannot
write to, one of another experiment or one another run is using) print one line and exit with
status 2, before any work; the config is validated before the workdir is created. `~` in
`--workdir` is expanded. Rerunning with the same workdir resumes. A full disk prints one line
(`No space left on device while saving step N to PATH; the last complete step is M`) and exits
with status 1, leaving nothing half-written; once there is space again, the same command resumes
from step M.
"""

import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from gmpo_jax.config import ConfigError, ExperimentConfig
from gmpo_jax.infra import checkpointing, compilation, disk_full, distributed, workdir_lock
from gmpo_jax.runner import loop
from gmpo_jax.runner.warm_start import IncompatibleWarmStartError

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, data and metrics.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WARM_START_ONLY = flags.DEFINE_bool(
    "warm_start_only", False, "Run only the warm start (for other runs' warm_start.init_from)."
)


class WorkdirError(Exception):
  """The workdir cannot be created, or this process cannot write to every directory in it."""


def check_workdir(path: str | os.PathLike[str]) -> pathlib.Path:
  """Creates the workdir if missing and checks that this process can write to all of it.

  The run writes new files in every directory of the workdir (checkpoint steps, the warm-start
  cache, metrics, evaluation results) and deletes old checkpoint steps, so each directory in it
  must be writable. Raises `WorkdirError` naming the first one that is not, before any work.
  An empty path is an error (it would be the current directory); `~` is expanded.
  """
  if not str(path).strip():
    raise WorkdirError("--workdir is empty; name the run's directory, e.g. --workdir=workdirs/run")
  workdir = pathlib.Path(path).expanduser()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f"cannot create the workdir {workdir}: {error.strerror or error}") from None
  for directory, _, _ in os.walk(workdir):
    if not os.access(directory, os.W_OK | os.X_OK):
      raise WorkdirError(
          f"the workdir {workdir} is not writable by this process: "
          f"{directory} is read-only for it"
      )
  return workdir


def main(argv):
  del argv  # `parse_flags` has refused positional arguments.
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  # A full disk is reported once, below, not by each of Orbax's writer threads and tasks.
  disk_full.quiet_background_reports()
  try:
    # The runner validates it again; here a bad value is refused before the workdir exists.
    ExperimentConfig.from_config(_CONFIG.value)
    workdir = check_workdir(_WORKDIR.value)
    # Before anything starts a JAX backend: the device list is fixed then.
    distributed.initialize(
        distributed.DistributedConfig.from_config(_CONFIG.value.get("distributed"))
    )
    if _CONFIG.value.get("compilation_cache_dir") is not None:
      compilation.enable_persistent_cache(_CONFIG.value.compilation_cache_dir)
    if _WARM_START_ONLY.value:
      loop.warm_start_only(_CONFIG.value, workdir)
    else:
      loop.train_and_evaluate(_CONFIG.value, workdir)
  except (
      ConfigError,
      WorkdirError,
      workdir_lock.WorkdirInUseError,
      checkpointing.ConfigMismatchError,
      checkpointing.CheckpointMismatchError,
      IncompatibleWarmStartError,
  ) as error:
    # A user error, not a crash: one line naming what is wrong, no traceback.
    _exit_with_config_error(str(error))
  except Exception as error:  # noqa: BLE001 - re-raised unless the disk is full
    if not disk_full.is_disk_full(error):
      raise
    # Outside a save (the lock, the dataset ...): where, and the error's first line.
    message = (
        str(error)
        if isinstance(error, disk_full.DiskFullError)
        else f"No space left on device in the workdir {_WORKDIR.value}: "
        + next(iter(str(error).splitlines()), repr(error))
    )
    print(f"error: {message}", file=sys.stderr)
    # Now, not at interpreter shutdown: Orbax's threads of the failed save are still waiting on
    # its writes, and would report them again as shutdown stops the executors they use. What is
    # on disk is complete (the failed save's files are removed), and the lock is released.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def _exit_with_config_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def unknown_override(argv: list[str]) -> str | None:
  """The message for the first `--config.a.b=...` of `argv` that names no field of the config
  file that `--config` loads (None: every override names a field).

  ml_collections reports such an override as a bare `AttributeError: "'b'"` (or a `KeyError`
  below a value) from inside flag parsing; this names the field and what its parent accepts.
  """
  value = _config_arg(argv)
  if value is None:
    return None
  config = flags.FLAGS[_CONFIG.name].parser.parse(value)
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


def _config_arg(argv: list[str]) -> str | None:
  """The value of the last `--config=PATH[:ARGS]` or `--config PATH[:ARGS]` of `argv`."""
  value = None
  for arg, following in zip(argv, argv[1:] + [None]):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config":
      value = following
  return value


def usage_error(positional: list[str]) -> str | None:
  """The message for a command line `main` cannot run (None: it can), after absl's parsing.

  `positional` is what absl left unparsed after the program name. absl's own reports (a
  missing required flag, a config file it cannot load) are several lines or a double
  traceback, and a config path given without `--config=` was reported as a missing --config.
  """
  if positional:
    hint = "; pass the config file as --config=PATH" if positional[0].endswith(".py") else ""
    return f"unexpected argument(s) {' '.join(positional)}{hint}"
  if _CONFIG.value is None:
    return "--config is required, e.g. --config=configs/default.py"
  try:
    _CONFIG.value.keys()
  except OSError as error:  # ml_collections keeps a load error until the config is read.
    return f"cannot load the config file: {error.__cause__ or error}"
  if _WORKDIR.value is None:
    return "--workdir is required, e.g. --workdir=workdirs/default"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, every usage error one line with exit status 2 (`usage_error`).

  A config file that does not exist is refused before parsing: ml_collections would fail only
  when the config is first read (after the workdir is created) or on the first override.
  """
  value = _config_arg(argv)
  path = value.split(":", 1)[0] if value is not None else None
  if path is not None and not os.path.isfile(path):
    _exit_with_config_error(
        f"the config file {path!r} does not exist"
        if not os.path.exists(path)
        else f"the config file {path!r} is not a file"
    )
  try:
    positional = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override(argv)
    if message is None:
      raise
    _exit_with_config_error(message)
  message = usage_error(positional[1:])
  if message is not None:
    _exit_with_config_error(message)
  return positional


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
