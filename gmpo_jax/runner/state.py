"""`RunState`: what crosses a restart besides the arrays, typed and versioned.

A checkpoint of the RL loop holds the policy's parameters, the optimizer state and the key as
arrays (`gmpo_jax.infra.checkpointing.CheckpointState`), this record as its JSON metadata, and as
host arrays the rollouts in flight (`in_flight_name`) and the copy of metrics.jsonl up to its step
(`METRICS_HISTORY_KEY`).
The record has a version: `from_metadata` reads every version written so far (version 0 is the
untyped dict of string keys written before the record existed) and refuses a newer one with an
error that names both, so an old checkpoint keeps resuming and a new one is never misread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gmpo_jax.infra.checkpointing import CONFIG_METADATA_KEY

RUN_STATE_VERSION = 3
_VERSION_KEY = "run_state_version"
# Version 0's keys, kept so that a version-0 checkpoint and this writer's agree on names.
_DATA_POSITION_KEY = "data_position"
_SKIPPED_UPDATES_KEY = "skipped_updates"
_INITIAL_EVAL_KEY = "initial_eval"
_IN_FLIGHT_KEY = "in_flight_rollouts"
_WARM_START_KEY = "warm_start"
_LORA_BASE_KEY = "lora_base"

# The key in `CheckpointState.arrays` of metrics.jsonl's lines up to the checkpoint's step, as
# uint8 (`gmpo_jax.infra.metrics.MetricsWriter.history`); absent from checkpoints written before.
METRICS_HISTORY_KEY = "metrics_history"


@dataclasses.dataclass(frozen=True)
class InFlightRollout:
  """A rollout sampled ahead of the checkpoint's step (`max_staleness` >= 1): the RL step it is
  for and the parameter version that sampled it. Its arrays are the checkpoint's
  `arrays[in_flight_name(step)]`."""

  step: int
  version: int


def in_flight_name(step: int) -> str:
  """The key of the in-flight rollout of `step` in `CheckpointState.arrays`."""
  return f"rollout_of_step_{step}"


@dataclasses.dataclass(frozen=True)
class RunState:
  """The RL loop's state besides its arrays.

  Attributes:
    data_position: prompts taken from the train stream so far (`runner.data.PromptStream`).
    skipped_updates: updates skipped so far for a non-finite loss or gradient.
    initial_eval: the held-out metrics before RL (None until measured).
    config_record: the experiment's config record (`checkpointing.config_record`), which a
      resume compares with its own config.
    in_flight: the rollouts sampled ahead of this step, oldest first.
    warm_start: what the warm start reported (steps, train pass rate; None without one), so a
      resume that does not need the warm-start cache still reports it (version 2 on).
    lora_base: a LoRA run's frozen base, {'path': where it came from, 'fingerprint':
      `gmpo_jax.models.lora.fingerprint` of its values}: the checkpoint holds only adapters,
      which mean nothing on another base (version 3 on; None for full-parameter runs).
  """

  data_position: int
  skipped_updates: int
  initial_eval: Mapping[str, float] | None
  config_record: Mapping[str, Any]
  in_flight: tuple[InFlightRollout, ...] = ()
  warm_start: Mapping[str, Any] | None = None
  lora_base: Mapping[str, str] | None = None

  def to_metadata(self) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (`CheckpointState.metadata`)."""
    return {
        _VERSION_KEY: RUN_STATE_VERSION,
        CONFIG_METADATA_KEY: dict(self.config_record),
        _DATA_POSITION_KEY: self.data_position,
        _SKIPPED_UPDATES_KEY: self.skipped_updates,
        _INITIAL_EVAL_KEY: None if self.initial_eval is None else dict(self.initial_eval),
        _IN_FLIGHT_KEY: [dataclasses.asdict(r) for r in self.in_flight],
        _WARM_START_KEY: None if self.warm_start is None else dict(self.warm_start),
        _LORA_BASE_KEY: None if self.lora_base is None else dict(self.lora_base),
    }

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> RunState:
    """Reads `to_metadata`'s output of any version up to `RUN_STATE_VERSION`.

    Raises:
      ValueError: the metadata is of a newer version, or lacks a field.
    """
    version = int(metadata.get(_VERSION_KEY, 0))
    if version > RUN_STATE_VERSION:
      raise ValueError(
          f"the checkpoint's run state is version {version}; this gmpo_jax reads "
          f"versions up to {RUN_STATE_VERSION}: resume it with a newer gmpo_jax"
      )
    missing = [
        k
        for k in (CONFIG_METADATA_KEY, _DATA_POSITION_KEY, _SKIPPED_UPDATES_KEY)
        if k not in metadata
    ]
    if missing:
      raise ValueError(f"the checkpoint's run state (version {version}) lacks {missing}")
    # Versions 0 and 1 share their keys; version 1 adds the version itself, version 2 the warm
    # start's result, version 3 a LoRA run's base.
    return cls(
        data_position=int(metadata[_DATA_POSITION_KEY]),
        skipped_updates=int(metadata[_SKIPPED_UPDATES_KEY]),
        initial_eval=metadata.get(_INITIAL_EVAL_KEY),
        config_record=metadata[CONFIG_METADATA_KEY],
        in_flight=tuple(
            InFlightRollout(step=int(r["step"]), version=int(r["version"]))
            for r in metadata.get(_IN_FLIGHT_KEY, [])
        ),
        warm_start=metadata.get(_WARM_START_KEY),
        lora_base=metadata.get(_LORA_BASE_KEY),
    )


class LoRABaseMismatchError(ValueError):
  """A LoRA checkpoint's adapters were trained on another base than this run's."""


def check_lora_base(stored: Mapping[str, str] | None, current: Mapping[str, str] | None) -> None:
  """Refuses to resume adapters onto another base (the fingerprints decide; paths are for
  people).

  Raises:
    LoRABaseMismatchError: the fingerprints differ, naming both bases.
  """
  if stored is None or current is None:
    return  # a full-parameter run (a LoRA config on its checkpoint is refused as a config change)
  if stored["fingerprint"] != current["fingerprint"]:
    raise LoRABaseMismatchError(
        f"the checkpoint's LoRA adapters were trained on the base {stored['path']!r} "
        f"(fingerprint {stored['fingerprint']}), but this run's base is {current['path']!r} "
        f"(fingerprint {current['fingerprint']}): adapters mean nothing on another base; "
        "resume with the original base, or start a new workdir"
    )
