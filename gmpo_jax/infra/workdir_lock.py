"""One run per workdir: a lock file that a second run on a live workdir is refused by.

Two processes writing one workdir destroy each other's work (Orbax deletes the other's steps,
each replaces the other's metrics file), so `train_and_evaluate` holds `hold(workdir)` from
before anything is written until it returns. A second run is refused at once with a
`WorkdirInUseError` naming the holder (pid, host, start time); a lock left by a dead process
is taken over with a warning, so a resume after kill -9 or a lost host needs no cleaning up.

Mechanism: `<workdir>/run.lock`, opened (never created exclusively, never deleted) and locked
with `fcntl.flock`, holding a JSON record of the holder (`Holder`).

* flock is the exclusion on one host: the kernel refuses a second holder whatever the file
  system, and drops the lock when the process dies, kill -9 included. So there is no stale lock
  on one host; the pid in the record is still checked (alive, not a zombie, the same start time
  so a reused pid does not count), for file systems that refuse flock (ENOLCK, EOPNOTSUPP) and
  are then guarded by the record alone.
* Across hosts flock works on NFS (Linux sends it to the server as a POSIX lock, and the
  server's lease frees it when a client is lost), not on gcsfuse or other FUSE file systems,
  which lock only on the host. So the holder also refreshes a heartbeat in the record every
  `HEARTBEAT_S` seconds, and a record from another host counts as live until its heartbeat is
  `LEASE_S` old: a run on a lost host blocks a resume elsewhere for at most that long, and the
  refusal says how long is left. The lease compares the holder's clock with the reader's; it
  is long enough that NTP-level skew does not matter, and short enough that a preempted host's
  replacement waits minutes, not hours.
* The lock file is never deleted: deleting a flock-ed file lets a process that opened it before
  the deletion and one that creates a new file both hold "the" lock. A released lock is an empty
  file.

Limits: on a file system without cross-host locks (gcsfuse), two runs started on two hosts
within one heartbeat of each other can both take a free lock; the one lock holder of a
multi-host run is its primary process (`jax.process_index() == 0`), and the other processes
follow its verdict. Keep one launch per workdir in the scheduler as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
LEASE_S = 180.0
_RECORD_VERSION = 1
# errnos of flock on a file system that does not lock (the record alone guards it then).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirInUseError(Exception):
  """Another live process holds the workdir's lock; the message names it."""


def _boot_id() -> str:
  """This boot of this machine: a pid is only meaningful within one."""
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str | None:
  """When `pid` started (clock ticks since boot, from /proc), or None if it is not running.

  A zombie (killed, not yet reaped) counts as not running. Without /proc (not Linux) a live pid
  gives "" and is taken at its word.
  """
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return None
  except OSError:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return ""
  # The command name (field 2) is in parentheses and may hold spaces: split after it.
  fields = stat[stat.rindex(")") + 2 :].split()
  if fields[0] in ("Z", "X"):
    return None
  return fields[19]  # field 22, starttime


@dataclasses.dataclass(frozen=True)
class Holder:
  """The record in the lock file: who holds the workdir, since when, alive when last seen.

  Attributes:
    pid: the holder's process id on `host`.
    host: `socket.gethostname()` of the holder.
    boot_id: the kernel's boot id on `host` ("" without /proc): the pid means nothing after a
      reboot.
    process_start: the pid's start time in clock ticks since boot (`_process_start`), so a pid
      reused by another process is not taken for the holder.
    started: when the lock was taken, seconds since the epoch.
    heartbeat: when the holder last refreshed the record, seconds since the epoch.
    token: unique to one holding, so a holder can tell that its lock was taken over.
    version: the record's format.
  """

  pid: int
  host: str
  boot_id: str
  process_start: str
  started: float
  heartbeat: float
  token: str
  version: int = _RECORD_VERSION

  @classmethod
  def this_process(cls) -> Holder:
    now = time.time()
    return cls(
        pid=os.getpid(),
        host=socket.gethostname(),
        boot_id=_boot_id(),
        process_start=_process_start(os.getpid()) or "",
        started=now,
        heartbeat=now,
        token=uuid.uuid4().hex,
    )

  def describe(self) -> str:
    started = datetime.datetime.fromtimestamp(self.started).astimezone()
    return f"pid {self.pid} on host {self.host}, started {started.isoformat(timespec='seconds')}"

  def on_this_host(self) -> bool:
    return self.host == socket.gethostname() and self.boot_id == _boot_id()

  def stale_reason(self, lease_s: float) -> str | None:
    """Why the holder is gone (None: it may be alive, the lock is held)."""
    if self.on_this_host():
      start = _process_start(self.pid)
      if start is None:
        return f"pid {self.pid} is no longer running"
      if start and self.process_start and start != self.process_start:
        return f"pid {self.pid} is now another process"
      return None
    age = time.time() - self.heartbeat
    if age >= lease_s:
      return f"its last heartbeat is {age:.0f} s old (lease {lease_s:.0f} s)"
    return None


def _read_holder(fd: int, *, tries: int = 5) -> Holder | None:
  """The record in the lock file; None when it is empty (a released lock) or unreadable.

  A heartbeat rewrites the record in place, so a read can see half of it: read again a few
  times before giving up.
  """
  for attempt in range(tries):
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
      return None
    try:
      record = json.loads(data)
      if record.get("version") == _RECORD_VERSION:
        return Holder(**record)
    except (ValueError, TypeError, AttributeError):
      pass
    if attempt + 1 < tries:
      time.sleep(0.05)
  return None


def _write_holder(fd: int, holder: Holder | None) -> None:
  """Writes the record in place (None: empties it).

  Write, then cut: a reader never sees an empty file while a holder lives (it would take that
  for a released lock), at worst a record with the old one's tail, which does not parse.
  """
  data = json.dumps(dataclasses.asdict(holder)).encode() if holder else b""
  os.pwrite(fd, data, 0)
  os.ftruncate(fd, len(data))
  os.fsync(fd)


class WorkdirLock:
  """The lock of one workdir, held from `acquire` to `release` (see the module docstring)."""

  def __init__(
      self,
      workdir: str | os.PathLike[str],
      *,
      heartbeat_s: float = HEARTBEAT_S,
      lease_s: float = LEASE_S,
  ):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.heartbeat_s = heartbeat_s
    self.lease_s = lease_s
    self._fd: int | None = None
    self._holder: Holder | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises `WorkdirInUseError` naming the live holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._in_use(_read_holder(fd), flock_held=True) from None
      except OSError as error:
        if error.errno not in _NO_FLOCK:
          raise
        logger.info(
            "%s: the file system does not lock files (%s); the lock record alone "
            "guards the workdir",
            self.path,
            error.strerror,
        )
      previous = _read_holder(fd)
      if previous is not None:
        reason = previous.stale_reason(self.lease_s)
        if reason is None:
          raise self._in_use(previous, flock_held=False)
        logger.warning("taking over the lock of %s: %s", previous.describe(), reason)
      elif os.fstat(fd).st_size:
        logger.warning("taking over %s: its record was unreadable", self.path)
      self._holder = Holder.this_process()
      _write_holder(fd, self._holder)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    self._stop.clear()
    self._heartbeat = threading.Thread(
        target=self._beat, name="workdir-lock-heartbeat", daemon=True
    )
    self._heartbeat.start()

  def _in_use(self, holder: Holder | None, *, flock_held: bool) -> WorkdirInUseError:
    if holder is None:
      who = "another process (its lock record is not written yet or unreadable)"
    else:
      who = holder.describe()
      if not holder.on_this_host() and not flock_held:
        left = self.lease_s - (time.time() - holder.heartbeat)
        who += (
            f", last heartbeat {time.time() - holder.heartbeat:.0f} s ago; if that host is "
            f"gone, the lock expires in {max(left, 0):.0f} s"
        )
    return WorkdirInUseError(
        f"the workdir {self.workdir} is in use by {who}; stop that run or "
        f"use another workdir (lock file {self.path})"
    )

  def _owned(self) -> bool:
    current = _read_holder(self._fd)
    return current is not None and current.token == self._holder.token

  def _beat(self) -> None:
    """Refreshes the heartbeat until released; stops if another process took the lock over."""
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self._owned():
          logger.error(
              "the lock of %s was taken over by another process; this run and that one "
              "now write the same workdir",
              self.workdir,
          )
          return
        self._holder = dataclasses.replace(self._holder, heartbeat=time.time())
        _write_holder(self._fd, self._holder)
      except OSError as error:
        # A full disk or a lost mount must not stop training; the next beat tries again.
        logger.warning("cannot refresh the lock heartbeat in %s: %s", self.path, error)

  def release(self) -> None:
    """Empties the record (unless another process took it over) and unlocks."""
    if self._fd is None:
      return
    self._stop.set()
    self._heartbeat.join()
    try:
      with contextlib.suppress(OSError):
        if self._owned():
          _write_holder(self._fd, None)
    finally:
      os.close(self._fd)  # Closing the last descriptor drops the flock.
      self._fd = None


@contextlib.contextmanager
def hold(workdir: str | os.PathLike[str], **lock_kwargs) -> Iterator[None]:
  """Holds the workdir's lock for the block; in a multi-host run, process 0 holds it.

  Collective in a multi-host run: every process calls it, and every process raises
  `WorkdirInUseError` when process 0 could not take the lock (process 0's message names the
  holder). `lock_kwargs` go to `WorkdirLock`.
  """
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, **lock_kwargs)
    try:
      lock.acquire()
    except Exception as refused:  # pylint: disable=broad-exception-caught
      # Raised below, after the other processes have heard that process 0 failed.
      lock, error = None, refused
  if jax.process_count() > 1:
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = WorkdirInUseError(
          f"process 0 could not lock the workdir {workdir} (its log says " f"why)"
      )
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
