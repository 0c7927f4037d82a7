"""Tests for gmpo_jax.infra.disk_full: what counts as a full disk, and its echoes kept quiet."""

import asyncio
import errno
import logging
import os
import sys
import types

import pytest

from gmpo_jax.infra import disk_full


def _raised(error: BaseException) -> BaseException:
  try:
    raise error
  except BaseException as caught:  # pylint: disable=broad-exception-caught
    return caught


def test_a_full_disk_is_found_anywhere_in_the_chain():
  enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert disk_full.is_disk_full(enospc)
  assert disk_full.is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
  # tensorstore's errors carry no errno, only the C library's text.
  assert disk_full.is_disk_full(ValueError("RESOURCE_EXHAUSTED: ...: No space left on device"))
  wrapped = RuntimeError("Save Finalize thread failed")
  wrapped.__cause__ = ValueError("commit failed")
  wrapped.__cause__.__context__ = enospc
  assert disk_full.is_disk_full(wrapped)
  assert not disk_full.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  assert not disk_full.is_disk_full(None)
  looped = RuntimeError("a")
  looped.__context__ = looped
  assert not disk_full.is_disk_full(looped)


def test_the_message_is_the_one_line_the_command_prints():
  error = disk_full.DiskFullError(step=7, path="/w/checkpoints/7", last_complete=6)
  assert str(error) == (
      "No space left on device while saving step 7 to /w/checkpoints/7; the "
      "last complete step is 6"
  )
  assert str(disk_full.DiskFullError(step=0, path="/w/x", last_complete=None)).endswith(
      "; no step is complete yet"
  )


def test_the_filter_drops_reports_of_a_full_disk_only():
  keep = disk_full.DiskFullLogFilter().filter

  def record(message, error=None):
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord("absl", logging.ERROR, __file__, 1, message, (), exc_info)

  assert not keep(record("Failed to write 11995 bytes: No space left on device"))
  assert not keep(record("Save Finalize thread failed.", OSError(errno.ENOSPC, "x")))
  assert keep(record("Save Finalize thread failed.", ValueError("another failure")))
  assert keep(record("an unrelated warning"))


def test_closed_loop_echoes_from_c_are_dropped_and_nothing_else(monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", lambda report: reported.append(report.exc_value))
  monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: reported.append(error))
  for name in ("absl", "asyncio"):
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
  disk_full.quiet_background_reports()
  assert any(isinstance(f, disk_full.DiskFullLogFilter) for f in logging.getLogger("absl").filters)

  loop = asyncio.new_event_loop()
  loop.close()
  # What tensorstore's thread meets: call_soon_threadsafe on the closed loop, called from C, so
  # that frame tops the traceback.
  with pytest.raises(RuntimeError, match="Event loop is closed") as raised:
    loop.call_soon_threadsafe(print)
  echo = raised.value
  echo_tb = echo.__traceback__.tb_next  # drop this test's frame: C called the method directly
  sys.unraisablehook(types.SimpleNamespace(exc_value=echo, exc_traceback=echo_tb))
  sys.excepthook(RuntimeError, echo, echo_tb)
  assert reported == []
  # The same error raised by Python code keeps its caller's frame on top, and is reported.
  sys.excepthook(RuntimeError, echo, echo.__traceback__)
  other = _raised(ValueError("another"))
  sys.unraisablehook(types.SimpleNamespace(exc_value=other, exc_traceback=other.__traceback__))
  assert reported == [echo, other]
