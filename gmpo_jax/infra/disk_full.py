"""A full disk, reported once: the step being saved, where, and the step a rerun resumes from.

A write that fails for lack of space (ENOSPC, or EDQUOT on a quota) surfaces in many places at
once: Orbax's writer threads each log a traceback, its asyncio tasks report "Task exception was
never retrieved", tensorstore's threads print "Event loop is closed" for each write still in
flight when Orbax gave up, and the main thread meets the error at the next save or flush. The
writers of this package undo what they half wrote and raise `DiskFullError`, whose message is the
one line the command line prints; `quiet_background_reports` keeps the other reports of the same
fault out of the output.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Errors that carry no errno (tensorstore's ValueError) still quote the C library's text.
_MESSAGES = tuple(os.strerror(number) for number in _ERRNOS)


class DiskFullError(Exception):
  """A save failed for lack of space; nothing of it was left behind.

  Attributes:
    step: the step being saved.
    path: where it was being saved.
    last_complete: the newest step saved whole (the one a rerun resumes from); None: none yet.
  """

  def __init__(self, *, step: int, path: str | os.PathLike, last_complete: int | None):
    self.step, self.path, self.last_complete = step, os.fspath(path), last_complete
    complete = (
        "no step is complete yet"
        if last_complete is None
        else f"the last complete step is {last_complete}"
    )
    super().__init__(
        f"No space left on device while saving step {step} to {self.path}; " f"{complete}"
    )


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an exception it was raised from or while handling, is a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return True
    if isinstance(error, OSError) and error.errno in _ERRNOS:
      return True
    if any(message in str(error) for message in _MESSAGES):
      return True
    error = error.__cause__ or error.__context__
  return False


class DiskFullLogFilter(logging.Filter):
  """Drops log records that report a full disk (their text or their exception).

  For the loggers of libraries that write in background threads (Orbax's 'absl', 'asyncio'):
  the `DiskFullError` the main thread raises says the same in one line.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and is_disk_full(record.exc_info[1]):
      return False
    return not any(message in record.getMessage() for message in _MESSAGES)


def _is_closed_loop_echo(error: BaseException | None, traceback) -> bool:
  """Whether `error` is "Event loop is closed" raised in `call_soon_threadsafe` called straight
  from C (an error raised by Python code has its caller's frame at the top of its traceback).

  tensorstore reports such errors (as unraisable, or printed) when a write completes after the
  Orbax save it belonged to failed and closed its event loop: an echo of that failure, which the
  main thread reports.
  """
  return (
      isinstance(error, RuntimeError)
      and str(error) == "Event loop is closed"
      and traceback is not None
      and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"
  )


def quiet_background_reports() -> None:
  """Keeps the echoes of a failed save out of a command line's output (module docstring):
  installs `DiskFullLogFilter` on Orbax's and asyncio's loggers, and `sys.unraisablehook` and
  `sys.excepthook` that drop tensorstore's "Event loop is closed" reports."""
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(DiskFullLogFilter())
  unraisablehook, excepthook = sys.unraisablehook, sys.excepthook

  def unraisable(report):
    if not _is_closed_loop_echo(report.exc_value, report.exc_traceback):
      unraisablehook(report)

  def uncaught(kind, error, traceback):
    if not _is_closed_loop_echo(error, traceback):
      excepthook(kind, error, traceback)

  sys.unraisablehook, sys.excepthook = unraisable, uncaught
