"""metrics.jsonl: one JSON object per write, and the copy of it a checkpoint holds.

Each line is {"step": int, "<name>": value, ...}, non-finite values written as `null`. The
run's history is kept safe:

  * A checkpoint carries a copy: `JsonLinesWriter.history` is every line logged so far, byte
    for byte, for the checkpoint to hold. Resuming from step S with that copy
    (`start_step=S, history=...`), metrics.jsonl must begin with it; the lines after it (logged
    after the checkpoint by the interrupted run) are dropped, so that a resumed run's file is
    identical to an uninterrupted run's (the lines carry no wall-clock time for that reason;
    log timings as metrics if needed). A missing file is restored from the copy; a file that
    differs from it within those steps (a changed byte, a lost line) is moved aside to
    `metrics.jsonl.damaged-<n>` and the copy written in its place, with one warning.
  * Without a copy (a checkpoint of an older gmpo_jax), the lines with step <= S are kept; a
    line that cannot be parsed (bad JSON, bad UTF-8) is never rewritten away: the file is moved
    aside first. Only an unterminated last line (cut short by a crash) is dropped as such.
  * A line is appended whole or not at all (`files.append`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

from gmpo_jax.infra.metrics import files
from gmpo_jax.infra.metrics.writers import MetricWriter, Scalars, to_record

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _parse_line(line: bytes) -> dict[str, Any] | None:
  """The record of one line of metrics.jsonl; None unless it is UTF-8 JSON of an object with an
  integer "step"."""
  try:
    record = json.loads(line.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError and json.JSONDecodeError
    return None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    return None
  return record


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
  """(the complete lines of `data`, each with its newline; what follows the last newline)."""
  lines = data.split(b"\n")
  rest = lines.pop()
  return [line + b"\n" for line in lines], rest


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl` (missing file: []).

  A line that is not UTF-8 JSON of an object with an integer "step" (a line cut short by a
  crash, a damaged byte) is skipped with a warning.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return []
  lines, rest = _split_lines(data)
  records = []
  for number, line in enumerate(lines + [rest] * bool(rest), start=1):
    record = _parse_line(line)
    if record is None:
      logger.warning(
          "Skipping unreadable line %d of %s: not UTF-8 JSON of an object with an "
          "integer 'step'.",
          number,
          path,
      )
      continue
    records.append(record)
  return records


def _restore_history(path: pathlib.Path, start_step: int, history: bytes | None) -> bytes:
  """Makes `path` (metrics.jsonl) hold the run's lines up to `start_step` and returns them.

  `history` is the checkpoint's copy of them (None: a checkpoint without one); see the module
  docstring for what is kept, restored and moved aside.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    data = None
  if history is not None:
    kept = history
    if not data and history:
      logger.warning(
          "%s is missing; restored its %d records up to step %d from the checkpoint.",
          path,
          history.count(b"\n"),
          start_step,
      )
    elif data is not None and not data.startswith(history):
      line = os.path.commonprefix([data, history]).count(b"\n") + 1
      moved = files.move_aside(path)
      logger.warning(
          "%s differs from line %d on from the copy of its records up to step %d that "
          "the checkpoint holds; moved it to %s and restored the %d records from the "
          "checkpoint.",
          path,
          line,
          start_step,
          moved,
          history.count(b"\n"),
      )
      data = None
  else:
    lines, rest = _split_lines(data or b"")
    records = [_parse_line(line) for line in lines]
    kept = b"".join(
        line
        for line, record in zip(lines, records)
        if record is not None and record["step"] <= start_step
    )
    if data is None and start_step > 0:
      logger.warning(
          "%s is missing, and checkpoint step %d (written by an older gmpo_jax) holds "
          "no copy of it: its records up to that step are lost.",
          path,
          start_step,
      )
    if rest:
      logger.warning(
          "Skipping line %d of %s: cut short (no newline), written as the run stopped.",
          len(lines) + 1,
          path,
      )
    unreadable = [number for number, record in enumerate(records, start=1) if record is None]
    if unreadable:
      moved = files.move_aside(path)
      logger.warning(
          "Line(s) %s of %s cannot be parsed (not UTF-8 JSON of an object with an "
          "integer 'step'); moved the file to %s and kept its %d readable records up "
          "to step %d.",
          unreadable,
          path,
          moved,
          kept.count(b"\n"),
          start_step,
      )
      data = None
  if data != kept:
    files.write_atomically(path, kept)
  return kept


class JsonLinesWriter(MetricWriter):
  """Appends one line per `write_scalars` to `workdir/metrics.jsonl` and keeps the lines.

  Args:
    workdir: directory of the run (created if missing).
    start_step: step of the restored checkpoint when resuming: the file is made to hold the
      lines up to it (module docstring). None: a fresh run; an existing file is emptied.
    history: when resuming, the checkpoint's copy of those lines (the `history` of the writer
      that saved it). None: the checkpoint holds no copy.
    write_file: False on processes other than 0: the lines are kept for `history` (every
      process saves the checkpoint) but no file is read or written, and `history` is taken as
      it is.

  Attributes:
    path: the file.
    restored: the records kept from before the resume, in order, for the other writers to
      count again ([] for a fresh run, and where `write_file` is False).
  """

  def __init__(
      self,
      workdir: pathlib.Path,
      *,
      start_step: int | None,
      history: bytes | None,
      write_file: bool = True,
  ):
    self.path = workdir / METRICS_FILE
    self.restored: list[dict[str, Any]] = []
    self._file = None
    if not write_file:
      self._history = bytearray(history or b"")
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if start_step is None:
      kept = b""
      files.write_atomically(self.path, kept)
    else:
      kept = _restore_history(self.path, start_step, history)
    self._history = bytearray(kept)
    self.restored = [json.loads(line) for line in kept.splitlines()]
    self._file = files.open_unbuffered(self.path, "ab")

  @property
  def history(self) -> bytes:
    """Every line logged so far (those kept from before a resume included), byte for byte as in
    metrics.jsonl: the copy a checkpoint holds, for `history=` when resuming from it."""
    return bytes(self._history)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    line = (json.dumps(to_record(step, scalars), allow_nan=False) + "\n").encode()
    if self._file is not None:
      files.append(self._file, line, self.path)
    self._history += line

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
