"""Checkpoints for the experiment runner, the one package that talks to Orbax.

`manager` saves and restores `CheckpointState`s (retention, verified restores, async saves);
`integrity` writes and verifies each step's manifest; `identity` keeps the experiment's
config in every step and refuses to resume another experiment. This module re-exports the API.
"""

from gmpo_jax.infra.checkpointing.identity import (
    CONFIG_METADATA_KEY,
    MISSING,
    RESUMABLE_FIELDS,
    ConfigChange,
    ConfigMismatchError,
    check_config,
    config_changes,
    config_fingerprint,
    config_record,
    flatten_config,
)
from gmpo_jax.infra.checkpointing.integrity import MANIFEST_FILE, CorruptCheckpointError
from gmpo_jax.infra.checkpointing.manager import (
    CORRUPTED_DIR,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointState,
    UnrestorableCheckpointsError,
)

__all__ = [
    "CONFIG_METADATA_KEY",
    "CORRUPTED_DIR",
    "MANIFEST_FILE",
    "MISSING",
    "RESUMABLE_FIELDS",
    "CheckpointMismatchError",
    "CheckpointState",
    "Checkpointer",
    "ConfigChange",
    "ConfigMismatchError",
    "UnrestorableCheckpointsError",
    "CorruptCheckpointError",
    "check_config",
    "config_changes",
    "config_fingerprint",
    "config_record",
    "flatten_config",
]
