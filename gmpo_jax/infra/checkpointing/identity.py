"""The experiment's config record in a checkpoint, and the check that a workdir resumes only
the experiment that wrote it (`RESUMABLE_FIELDS` may differ)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from typing import Any, Mapping, NamedTuple, Sequence

logger = logging.getLogger(__name__)


CONFIG_METADATA_KEY = "config_record"
"""Key of `config_record(config)` in `CheckpointState.metadata`, read by `restore_latest(config=)`."""


RESUMABLE_FIELDS: tuple[str, ...] = (
    "num_steps",  # extending a run (the runner rebuilds the LR schedule from it)
    "eval_every",
    "progress",
    "checkpoint.every",
    "checkpoint.keep",
    "task.data_dir",  # where the dataset is cached
    "mesh.*",  # resuming on other hardware
    "parallelism",  # likewise: 'mesh' and 'pmap' compute the same update
    "distributed.*",  # coordinator address, process ids, timeouts
    "resume_with_changes",
    "compilation_cache_dir",  # where compiled programs are kept; changes no value
    "perf.*",  # the denominator of perf/mfu; changes no trained value
)
"""Flattened config fields (`fnmatch` patterns) that may change when a run resumes.

Everything else is part of the experiment's identity: a different value means a
different experiment, and `restore_latest(config=)` refuses to continue it.
"""


class ConfigChange(NamedTuple):
  """One flattened config field that differs; `MISSING` where a side lacks it."""

  field: str
  stored: Any
  current: Any


MISSING = "<missing>"


class ConfigMismatchError(ValueError):
  """The checkpoint was written by a run with another config; `changes` lists the fields."""

  def __init__(self, message: str, changes: Sequence[ConfigChange]):
    super().__init__(message)
    self.changes = list(changes)


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens nested mappings to dotted keys with JSON values (tuples become lists).

  An empty mapping is kept as the value `{}` so that adding its first key is a change.
  """
  flat: dict[str, Any] = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
      for key in value:
        if not isinstance(key, str):
          raise TypeError(f"config keys must be strings, got {key!r} under {prefix or '<root>'!r}")
        visit(f"{prefix}.{key}" if prefix else key, value[key])
    else:
      try:
        flat[prefix] = json.loads(json.dumps(dict(value) if isinstance(value, Mapping) else value))
      except (TypeError, ValueError) as error:
        raise TypeError(f"config field {prefix!r} is not JSON-serializable: {error}") from error

  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping (e.g. ConfigDict.to_dict()), got {type(config)}")
  visit("", config)
  return flat


def _is_resumable(field: str, resumable: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in resumable)


def config_fingerprint(
    config: Mapping[str, Any], *, resumable: Sequence[str] = RESUMABLE_FIELDS
) -> str:
  """SHA-256 (hex) of a resolved config's canonical JSON, without the `resumable` fields.

  Args:
    config: the resolved config as a plain nested dict, e.g.
      `json.loads(config.to_json())` or `config.to_dict()` of an `ml_collections.ConfigDict`.
    resumable: `fnmatch` patterns over the flattened (dotted) field names that
      may change without making it another experiment; default `RESUMABLE_FIELDS`.

  Returns:
    64 hex digits; equal for configs that agree on every non-resumable field
    (key order and tuple-vs-list do not matter).
  """
  flat = {k: v for k, v in flatten_config(config).items() if not _is_resumable(k, resumable)}
  return hashlib.sha256(
      json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()
  ).hexdigest()


def config_record(
    config: Mapping[str, Any], *, resumable: Sequence[str] = RESUMABLE_FIELDS
) -> dict[str, Any]:
  """What to store under `metadata[CONFIG_METADATA_KEY]`: the fingerprint and the flattened config.

  The flattened fields (all of them, resumable ones too) let a mismatch name
  the differing fields, not only say that the hashes differ.
  """
  return {
      "fingerprint": config_fingerprint(config, resumable=resumable),
      "fields": flatten_config(config),
  }


def config_changes(
    record: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    resumable: Sequence[str] = RESUMABLE_FIELDS,
) -> list[ConfigChange]:
  """The non-resumable fields where `config` differs from a stored `config_record`, sorted by name."""
  stored = record["fields"]
  current = flatten_config(config)
  changes = []
  for field in sorted(set(stored) | set(current)):
    if _is_resumable(field, resumable):
      continue
    old, new = stored.get(field, MISSING), current.get(field, MISSING)
    if old != new:
      changes.append(ConfigChange(field, old, new))
  return changes


def check_config(
    record: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    *,
    allow_changes: bool = False,
    where: str = "the checkpoint",
    resumable: Sequence[str] = RESUMABLE_FIELDS,
) -> list[ConfigChange]:
  """Compares a stored `config_record` with the run's config.

  Args:
    record: `metadata[CONFIG_METADATA_KEY]` of the checkpoint; None if it has none.
    config: the run's resolved config (a plain nested dict).
    allow_changes: the user asked to resume with changes (e.g.
      `--config.resume_with_changes=True`): differences are logged as a
      warning and returned instead of raised; the caller records them.
    where: names the checkpoint in messages.
    resumable: see `config_fingerprint`.

  Returns:
    The differing fields (empty when the fingerprints agree).

  Raises:
    ConfigMismatchError: fields differ (or `record` is None or malformed) and
      not `allow_changes`. The message lists every differing field with both values.
  """
  if not (
      isinstance(record, Mapping)
      and isinstance(record.get("fields"), Mapping)
      and isinstance(record.get("fingerprint"), str)
  ):
    message = (
        f"{where} holds no config record (metadata[{CONFIG_METADATA_KEY!r}]), so it "
        "cannot be checked against this run's config"
    )
    if allow_changes:
      logger.warning("%s; resuming anyway (changes allowed).", message)
      return []
    raise ConfigMismatchError(message + "; resume with changes allowed to continue anyway.", [])
  if record["fingerprint"] == config_fingerprint(config, resumable=resumable):
    return []
  changes = config_changes(record, config, resumable=resumable)
  if not changes:  # same fields, other resumable list or hash of another version
    return []
  listing = "; ".join(f"{c.field}: {c.stored!r} -> {c.current!r}" for c in changes)
  message = f"{where} was written by a run with another config ({len(changes)} field(s): {listing})"
  if allow_changes:
    logger.warning("%s; resuming with these changes as asked.", message)
    return changes
  raise ConfigMismatchError(
      message + ". Use another workdir, or allow resuming with changes (recorded).", changes
  )
