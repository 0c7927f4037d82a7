"""Tests for gmpo_jax.runner.state: the versioned record a checkpoint's metadata holds."""

import json
import pathlib

import pytest

from gmpo_jax.infra.checkpointing import CONFIG_METADATA_KEY
from gmpo_jax.runner.state import (
    RUN_STATE_VERSION,
    InFlightRollout,
    LoRABaseMismatchError,
    RunState,
    check_lora_base,
    in_flight_name,
)

# The metadata of step 4 of a smoke run, written before `RunState` existed (version 0).
V0_METADATA = pathlib.Path(__file__).parent / "fixtures" / "run_state_v0.json"


def _state(**changes) -> RunState:
  fields = dict(
      data_position=48,
      skipped_updates=2,
      initial_eval={"eval/pass@1": 0.25},
      config_record={"fingerprint": "abc", "fields": {"seed": 3}},
      in_flight=(InFlightRollout(step=5, version=3), InFlightRollout(step=6, version=4)),
      warm_start={"warm_start/steps": 30, "warm_start/train_pass_rate": 0.5},
  )
  return RunState(**{**fields, **changes})


def test_round_trip_through_json():
  state = _state()
  metadata = json.loads(json.dumps(state.to_metadata()))
  assert metadata["run_state_version"] == RUN_STATE_VERSION
  assert RunState.from_metadata(metadata) == state


def test_reads_a_version_0_checkpoint_written_before_the_record_existed():
  metadata = json.loads(V0_METADATA.read_text())
  assert "run_state_version" not in metadata
  state = RunState.from_metadata(metadata)
  assert state.data_position == metadata["data_position"] == 16
  assert state.skipped_updates == 0 and state.in_flight == () and state.warm_start is None
  assert state.initial_eval == metadata["initial_eval"]
  assert state.config_record == metadata[CONFIG_METADATA_KEY]
  # And what it reads is written back under the same keys (plus the version and the fields
  # added since: the warm start's result, a LoRA run's base).
  rewritten = state.to_metadata()
  assert rewritten["warm_start"] is None and rewritten["lora_base"] is None
  assert {
      k: v
      for k, v in rewritten.items()
      if k not in ("run_state_version", "warm_start", "lora_base")
  } == metadata


def test_reads_a_version_2_checkpoint_without_a_lora_base_and_round_trips_one():
  metadata = _state().to_metadata()
  metadata["run_state_version"] = 2
  del metadata["lora_base"]
  assert RunState.from_metadata(metadata) == _state()
  base = {"path": "hf/qwen", "fingerprint": "0123abcd"}
  with_base = RunState.from_metadata(_state(lora_base=base).to_metadata())
  assert with_base.lora_base == base
  check_lora_base(base, dict(base))
  with pytest.raises(LoRABaseMismatchError, match="'hf/qwen' .*0123abcd.*'other'.*ffff"):
    check_lora_base(base, {"path": "other", "fingerprint": "ffff"})


def test_reads_a_version_1_checkpoint_without_the_warm_start_result():
  metadata = _state().to_metadata()
  metadata["run_state_version"] = 1
  del metadata["warm_start"]
  assert RunState.from_metadata(metadata) == _state(warm_start=None)


def test_a_newer_version_is_refused_by_name():
  metadata = {**_state().to_metadata(), "run_state_version": RUN_STATE_VERSION + 1}
  with pytest.raises(ValueError, match=f"version {RUN_STATE_VERSION + 1}.*newer gmpo_jax"):
    RunState.from_metadata(metadata)


def test_a_missing_field_is_named():
  metadata = _state().to_metadata()
  del metadata["data_position"]
  with pytest.raises(ValueError, match="data_position"):
    RunState.from_metadata(metadata)


def test_in_flight_names_differ_per_step():
  assert in_flight_name(5) != in_flight_name(6)
