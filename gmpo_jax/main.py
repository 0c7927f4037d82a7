"""Command line: `python -m gmpo_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.algorithm.advantage=grpo`; the config is
locked, so a misspelt field is an error. Rerunning with the same workdir resumes.
"""

import logging
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Before anything starts a JAX backend: the device list is fixed then.
  distributed.initialize(
      distributed.DistributedConfig.from_config(_CONFIG.value.get("distributed")))
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (checkpointing.ConfigMismatchError, checkpointing.CheckpointMismatchError) as error:
    # A user error, not a crash: one line naming what differs, no traceback.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
