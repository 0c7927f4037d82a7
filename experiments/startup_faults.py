"""Fault table rows for starting a run: the workdir lock, and command lines that cannot run.

    .venv/bin/python -m experiments.startup_faults >> docs/faults.md

`gmpo_jax.main` on configs/smoke.py in child processes (`experiments.fault_table._Child`):

  lock   a second launch of the same command 1-3 s after the first, or while the first writes
         its first checkpoint; kill -9 of a run holding the lock, then the same command run to
         the end; a lock record of another host whose heartbeat is younger or older than the
         lease. Expected: the second launch refused at once (exit 2, one line naming the first's
         pid, host and start time) while the first runs on; a dead holder's lock taken over
         with a warning naming it; a released lock at the end.
  usage  command lines `main` must refuse before any work (exit 2, one line, nothing created).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments.fault_table import _REPO, _Child, _child_env
from gmpo_jax.infra import workdir_lock

_SMOKE = "configs/smoke.py"


def _wait_for(predicate, timeout: float = 600.0, poll: float = 0.05) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(poll)
  return False


def _stop(child: _Child) -> None:
  if child.proc.poll() is None:
    child.proc.send_signal(signal.SIGKILL)
  child.wait()


def _refusal_outcome(refused: _Child, rc: int, other: _Child) -> str:
  last = refused.lines[-1] if refused.lines else ""
  named = f"is in use by pid {other.proc.pid} on host " in last and ", started 20" in last
  if rc == 2 and named and "Traceback" not in refused.log() and other.proc.poll() is None:
    return "refused, the other runs on"
  return f"NOT REFUSED (exit {rc}, other running: {other.proc.poll() is None})"


def second_launch_trial(
    scratch: pathlib.Path, env, name: str, *, delay: float | None
) -> tuple[int, str, str]:
  """The same command twice on one fresh workdir: `delay` s apart, or (None) the second once
  the first is writing a checkpoint. (exit code of the refused one, its line, outcome)."""
  workdir = scratch / name
  first = _Child(workdir, env=env)
  try:
    if delay is None:
      if not _wait_for(lambda: first.poll()[1] is not None or first.proc.poll() is not None):
        return -1, "", "FIRST RUN NEVER SAVED"
    else:
      time.sleep(delay)
    second = _Child(workdir, env=env)
    try:
      # Whichever reaches the lock second is refused; the other runs on.
      _wait_for(lambda: first.proc.poll() is not None or second.proc.poll() is not None)
      refused, other = (second, first) if second.proc.poll() is not None else (first, second)
      rc = refused.wait()
      return rc, refused.lines[-1] if refused.lines else "", _refusal_outcome(refused, rc, other)
    finally:
      _stop(second)
  finally:
    _stop(first)


def kill_then_resume_trial(
    scratch: pathlib.Path, env, name: str, rng: np.random.Generator
) -> tuple[int, str, str]:
  """kill -9 of a run 0-10 s after it took the lock, then the same command to the end."""
  workdir = scratch / name
  first = _Child(workdir, env=env)
  # The lock is held once the runner builds the dataset (data/ appears after the lock).
  _wait_for(lambda: (workdir / "data").exists() or first.proc.poll() is not None)
  time.sleep(rng.uniform(0, 10))
  first.proc.send_signal(signal.SIGKILL)
  first.wait()
  second = _Child(workdir, env=env)
  rc = second.wait()
  warning = next((line for line in second.lines if "taking over the lock" in line), "")
  released = (workdir / workdir_lock.LOCK_FILE).read_text() == ""
  ok = (
      rc == 0
      and f"pid {first.proc.pid} is no longer running" in warning
      and released
      and any("Run summary" in line for line in second.lines)
  )
  return (
      rc,
      warning,
      (
          "taken over, resumed to the end, released"
          if ok
          else f"NOT RESUMED (exit {rc}, released {released})"
      ),
  )


def other_host_trial(scratch: pathlib.Path, env, name: str, age: float) -> tuple[int, str, str]:
  """A record of a holder on another host, its heartbeat `age` s old (lease `LEASE_S`)."""
  workdir = scratch / name
  workdir.mkdir()
  holder = dataclasses.replace(
      workdir_lock.Holder.this_process(), host="lost-host", pid=4242, heartbeat=time.time() - age
  )
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))
  child = _Child(workdir, env=env)
  taken = lambda: any("taking over the lock" in line for line in child.lines)
  _wait_for(lambda: taken() or child.proc.poll() is not None)
  _stop(child)
  if age < workdir_lock.LEASE_S:
    line = child.lines[-1] if child.lines else ""
    ok = (
        child.proc.returncode == 2
        and "on host lost-host" in line
        and "expires in" in line
        and not (workdir / "data").exists()
    )
    return child.proc.returncode, line, "refused, says when it expires" if ok else "NOT REFUSED"
  warning = next((line for line in child.lines if "taking over the lock" in line), "")
  ok = f"(lease {workdir_lock.LEASE_S:.0f} s)" in warning
  return "ran on", warning, "taken over" if ok else "NOT TAKEN OVER"


def lock_trials(scratch: pathlib.Path, *, trials: int, seed: int):
  """Yields (fault, exit code, line, outcome) for every lock trial."""
  env = _child_env(scratch)
  rng = np.random.default_rng(seed)
  for i in range(trials):
    delay = rng.uniform(1, 3)
    yield (
        "second launch 1–3 s after the first",
        *second_launch_trial(scratch, env, f"race_{i}", delay=delay),
    )
  for i in range(trials):
    yield (
        "second launch while the first writes a checkpoint",
        *second_launch_trial(scratch, env, f"during_save_{i}", delay=None),
    )
  for i in range(trials):
    yield (
        "kill -9 of the holder, then the same command",
        *kill_then_resume_trial(scratch, env, f"kill_{i}", rng),
    )
  for i, age in enumerate(np.linspace(10, 170, trials)):
    yield (
        "another host's lock, heartbeat younger than the lease",
        *other_host_trial(scratch, env, f"host_live_{i}", age),
    )
  for i, age in enumerate(np.geomspace(190, 86400, trials)):
    yield (
        "another host's lock, heartbeat older than the lease (lost host)",
        *other_host_trial(scratch, env, f"host_lost_{i}", age),
    )


_USAGE = (
    (
        "--config.num_steps=0",
        ("--config=configs/smoke.py", "--workdir={w}", "--config.num_steps=0"),
    ),
    ("a missing --config file", ("--config=configs/missing.py", "--workdir={w}")),
    (
        "a missing --config file with an override",
        ("--config=configs/missing.py", "--config.seed=1", "--workdir={w}"),
    ),
    ("a positional config path", ("configs/smoke.py", "--workdir={w}")),
    ("no --config", ("--workdir={w}",)),
    ("no --workdir", ("--config=configs/smoke.py",)),
    ("--workdir= (empty)", ("--config=configs/smoke.py", "--workdir=")),
)


def usage_trials(scratch: pathlib.Path):
  """Yields (command line, exit code, last line, created, outcome) for each bad command line."""
  env = _child_env(scratch)
  for name, args in _USAGE:
    cwd = scratch / "usage_cwd"
    shutil.copytree(_REPO / "configs", cwd / "configs")
    workdir = scratch / "usage_run"
    before = set(os.listdir(cwd))
    result = subprocess.run(
        [sys.executable, "-m", "gmpo_jax.main", *(a.format(w=workdir) for a in args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    created = sorted((set(os.listdir(cwd)) - before) | ({"workdir"} if workdir.exists() else set()))
    ok = (
        result.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error: ")
        and not created
    )
    yield (
        name,
        result.returncode,
        lines[-1] if lines else "",
        ", ".join(created) or "nothing",
        "one line, nothing created" if ok else "NO CLEAR ERROR",
    )
    shutil.rmtree(cwd)
  # `~` is expanded: HOME points into the scratch directory, the run is stopped once it has
  # taken the workdir's lock.
  home, cwd = scratch / "home", scratch / "tilde_cwd"
  home.mkdir()
  shutil.copytree(_REPO / "configs", cwd / "configs")
  child = subprocess.Popen(
      [sys.executable, "-m", "gmpo_jax.main", "--config=configs/smoke.py", "--workdir=~/run"],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      cwd=cwd,
      env=dict(env, HOME=str(home)),
  )
  _wait_for(lambda: (home / "run" / workdir_lock.LOCK_FILE).exists() or child.poll() is not None)
  child.kill()
  child.wait()
  ok = (home / "run").is_dir() and not (cwd / "~").exists()
  yield (
      "--workdir=~/run",
      "-",
      "(runs in $HOME/run)",
      "$HOME/run" if ok else "a literal ~",
      "expanded" if ok else "NOT EXPANDED",
  )


def _anonymous(line: str) -> str:
  line = re.sub(r"/tmp/startup_faults-[^/ ]+", "…", line)
  line = re.sub(r"pid \d+", "pid N", line)
  line = re.sub(r"started \d{4}-\d\d-\d\dT[\d:]+[+-]\d\d:\d\d", "started TIME", line)
  line = re.sub(r"host \S+(?=,)", "host H", line) if "lost-host" not in line else line
  line = re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ \S+\] ", "", line)  # absl's log prefix
  return re.sub(r"(heartbeat|expires in|is) \d+ s", r"\1 N s", line).replace("|", "/")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", nargs="+", default=["lock", "usage"], choices=["lock", "usage"])
  parser.add_argument("--trials", type=int, default=5, help="trials of each lock fault")
  parser.add_argument("--seed", type=int, default=0, help="seeds the delays and kill times")
  args = parser.parse_args(argv)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="startup_faults-"))
  failures = 0
  try:
    if "lock" in args.sections:
      started, load = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
      rows = collections.defaultdict(list)
      for fault, rc, line, outcome in lock_trials(scratch, trials=args.trials, seed=args.seed):
        rows[fault].append((rc, _anonymous(line), outcome))
      print("\n## One run per workdir\n")
      print(
          f"`configs/smoke.py` through `gmpo_jax.main`, each trial on a fresh workdir (run "
          f"{started}, load average {load:.1f}; lease {workdir_lock.LEASE_S:.0f} s, heartbeat "
          f"{workdir_lock.HEARTBEAT_S:.0f} s). The second launches: the one that reaches the "
          "lock second must exit 2 with one line naming the first (pid, host, start time) "
          "while the first runs on. kill -9 at 0–10 s after the lock was taken, then the same "
          "command: it must take the lock over with a warning naming the dead pid, run to the "
          "end (exit 0) and leave the lock released (an empty `run.lock`). Another host's "
          "record (heartbeat ages spread over the range): refused with the time left while "
          "younger than the lease, taken over once older.\n"
      )
      print("| fault | trials | exit codes | the line printed (one trial) | outcome |")
      print("|---|---|---|---|---|")
      for fault, trials in rows.items():
        outcomes = collections.Counter(o for _, _, o in trials)
        failures += sum(n for o, n in outcomes.items() if o.isupper() or "NOT" in o)
        codes = ", ".join(sorted({str(rc) for rc, _, _ in trials}))
        cell = "; ".join(f"{o} {n}/{len(trials)}" for o, n in outcomes.items())
        print(f"| {fault} | {len(trials)} | {codes} | `{trials[0][1]}` | {cell} |")
    if "usage" in args.sections:
      print("\n## Command lines that cannot run\n")
      print(
          "`python -m gmpo_jax.main` from a scratch directory holding `configs/`, `--workdir` "
          "a fresh path beside it. Expected: exit code 2, one line on stderr, no traceback, nothing "
          "created (neither the workdir nor anything in the current directory).\n"
      )
      print("| command line | exit code | the line printed | created | outcome |")
      print("|---|---|---|---|---|")
      for name, rc, line, created, outcome in usage_trials(scratch):
        failures += "NO" in outcome or "NOT" in outcome
        print(f"| {name} | {rc} | `{_anonymous(line)}` | {created} | {outcome} |")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"\nFailures (neither refused in one line nor recovered): {failures}.")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
