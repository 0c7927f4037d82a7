"""The workdir lock: a live holder refuses a second one; a dead one's lock is taken over."""

import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from gmpo_jax.infra import workdir_lock
from gmpo_jax.infra.workdir_lock import Holder, WorkdirInUseError, WorkdirLock

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _record(workdir: pathlib.Path) -> Holder | None:
  fd = os.open(workdir / workdir_lock.LOCK_FILE, os.O_RDONLY)
  try:
    return workdir_lock._read_holder(fd)  # Reads again while a heartbeat rewrites it.
  finally:
    os.close(fd)


def _write_record(workdir: pathlib.Path, holder: Holder) -> None:
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))


def _refusal(workdir: pathlib.Path, who: str) -> str:
  return (
      f"the workdir {workdir} is in use by {who}; stop that run or use another workdir "
      f"(lock file {workdir / workdir_lock.LOCK_FILE})"
  )


def test_a_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
  first = WorkdirLock(tmp_path)
  first.acquire()
  try:
    holder = _record(tmp_path)
    assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
    with pytest.raises(WorkdirInUseError) as refused:
      WorkdirLock(tmp_path).acquire()
  finally:
    first.release()
  assert str(refused.value) == _refusal(tmp_path, holder.describe())
  assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in str(refused.value)
  assert "\n" not in str(refused.value)


def test_a_released_lock_is_an_empty_file_and_can_be_taken_again(tmp_path):
  with workdir_lock.hold(tmp_path):
    assert _record(tmp_path).pid == os.getpid()
  assert _record(tmp_path) is None
  with pytest.raises(RuntimeError, match="boom"), workdir_lock.hold(tmp_path):
    raise RuntimeError("boom")
  assert _record(tmp_path) is None
  with workdir_lock.hold(tmp_path):
    pass


def test_a_live_process_holds_the_lock_and_its_kill_9_frees_it(tmp_path, caplog):
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          "import sys, time\n"
          "from gmpo_jax.infra import workdir_lock\n"
          "workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n",
          str(tmp_path),
      ],
      stdout=subprocess.PIPE,
      text=True,
      cwd=_REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO)),
  )
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(WorkdirInUseError, match=f"in use by pid {holder.pid} on host "):
      WorkdirLock(tmp_path).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lock = WorkdirLock(tmp_path)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  lock.release()
  assert f"pid {holder.pid} is no longer running" in caplog.text


@pytest.fixture
def no_flock(monkeypatch):
  """A file system that does not lock files: the record alone guards the workdir."""

  def refuse(fd, operation):
    del fd, operation
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", refuse)


def test_without_flock_a_live_pid_on_this_host_holds_the_lock(tmp_path, no_flock):
  parent = dataclasses.replace(
      Holder.this_process(),
      pid=os.getppid(),
      process_start=workdir_lock._process_start(os.getppid()),
  )
  _write_record(tmp_path, parent)
  with pytest.raises(WorkdirInUseError) as refused:
    WorkdirLock(tmp_path).acquire()
  assert str(refused.value) == _refusal(tmp_path, parent.describe())


@pytest.mark.parametrize(
    "holder, reason",
    [
        (dict(pid=2**22 + 1), "is no longer running"),  # above the kernel's pid_max
        (dict(process_start="1"), f"pid {os.getpid()} is now another process"),
    ],
    ids=["dead pid", "reused pid"],
)
def test_without_flock_a_dead_or_reused_pid_on_this_host_is_taken_over(
    holder, reason, tmp_path, no_flock, caplog
):
  _write_record(tmp_path, dataclasses.replace(Holder.this_process(), **holder))
  lock = WorkdirLock(tmp_path)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert _record(tmp_path).token == lock._holder.token
  lock.release()
  assert reason in caplog.text


def test_another_hosts_lock_holds_until_its_heartbeat_is_a_lease_old(tmp_path, caplog):
  elsewhere = dataclasses.replace(
      Holder.this_process(), host="elsewhere", pid=1, heartbeat=time.time() - 100
  )
  _write_record(tmp_path, elsewhere)
  with pytest.raises(WorkdirInUseError) as refused:
    WorkdirLock(tmp_path, lease_s=180).acquire()
  assert re.search(
      f"in use by {re.escape(elsewhere.describe())}, last heartbeat 10[01] s ago; "
      "if that host is gone, the lock expires in (79|80) s; ",
      str(refused.value),
  )
  lock = WorkdirLock(tmp_path, lease_s=60)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  lock.release()
  assert "its last heartbeat is 100 s old (lease 60 s)" in caplog.text


def test_an_unreadable_record_is_taken_over(tmp_path, caplog):
  (tmp_path / workdir_lock.LOCK_FILE).write_bytes(b'{"pid": 12\xff')
  with caplog.at_level(logging.WARNING), workdir_lock.hold(tmp_path):
    assert _record(tmp_path).pid == os.getpid()
  assert "its record was unreadable" in caplog.text


def test_the_holder_refreshes_its_heartbeat(tmp_path):
  lock = WorkdirLock(tmp_path, heartbeat_s=0.05)
  lock.acquire()
  try:
    started = _record(tmp_path).heartbeat
    deadline = time.monotonic() + 10
    while _record(tmp_path).heartbeat == started and time.monotonic() < deadline:
      time.sleep(0.05)
    assert _record(tmp_path).heartbeat > started
  finally:
    lock.release()


def test_only_the_primary_process_takes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
  with workdir_lock.hold(tmp_path):
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
