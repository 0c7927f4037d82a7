"""Writes to the run's files that are whole or not at all, with errors that name the file.

An append that fails (a full disk) is cut back off the file, a file that is replaced is replaced
atomically and leaves no temporary file behind, and an OSError that names no file (a failed
write() or flush) is raised again naming it. Every file of the metrics writers is opened here.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib


@contextlib.contextmanager
def naming(path: pathlib.Path):
  """Re-raises an OSError that names no file (a failed write() or flush) as one naming `path`."""
  try:
    yield
  except OSError as error:
    if error.filename is not None:
      raise
    raise OSError(error.errno, error.strerror, os.fspath(path)) from error


def open_unbuffered(path: pathlib.Path, mode: str) -> io.FileIO:
  """`path` opened in binary `mode` ('ab', 'xb') without a buffer: what `append` wrote is in the
  file when it returns."""
  with naming(path):
    return open(path, mode, buffering=0)  # pylint: disable=consider-using-with


def append(file: io.FileIO, data: bytes, path: pathlib.Path) -> None:
  """Appends `data` to the unbuffered `file` (at `path`) whole or not at all: what a failed
  write (a full disk) put in is cut off again, so no half line is left behind."""
  size = os.fstat(file.fileno()).st_size
  with naming(path):
    try:
      view = memoryview(data)
      while view:
        view = view[file.write(view) :]
    except OSError:
      os.ftruncate(file.fileno(), size)
      raise


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Replaces `path` by `data` through `<path>.tmp`, which a failure removes again."""
  temporary = path.with_name(path.name + ".tmp")
  with naming(path):
    try:
      temporary.write_bytes(data)
      os.replace(temporary, path)
    except BaseException:
      temporary.unlink(missing_ok=True)
      raise


def move_aside(path: pathlib.Path) -> pathlib.Path:
  """Renames `path` to the first free `<path>.damaged-<n>` and returns the new path."""
  number = 1
  while (target := path.with_name(f"{path.name}.damaged-{number}")).exists():
    number += 1
  path.rename(target)
  return target
