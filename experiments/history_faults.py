"""Fault table rows for a run's history, its caches and a full disk.

    .venv/bin/python -m experiments.history_faults >> docs/faults.md

`gmpo_jax.main` on configs/smoke.py in child processes (`experiments.fault_table._Child`), each
trial on a copy of a workdir made once: a finished run, and a run stopped by SIGTERM after step 2.

  history  metrics.jsonl deleted, or one line at or before the resumed checkpoint damaged (a 0xFF
           byte, a changed digit, the line deleted, the file cut inside it), or tensorboard/
           deleted; then the same command. Expected: exit 0, metrics.jsonl restored from the
           checkpoint (byte for byte on the finished run; on the stopped one, then run on to the
           records of an uninterrupted run), the damaged file moved aside as it was, one warning,
           summary.json as before, TensorBoard's steps those of the uninterrupted run.
  caches   the warm-start cache damaged (a flipped bit in a data file, its metadata or manifest
           deleted) with RL checkpoints to resume from: skipped, the run's files unchanged; the
           same with no RL checkpoint: recomputed, and the run equals the uninterrupted one. The
           dataset cache damaged (an array_record file cut or a bit flipped, its manifest deleted):
           built again with a warning naming the file, the run's files unchanged.
  disk     a real full disk: the workdir on a 16 MiB tmpfs, filled with a filler file at a random
           moment of a run (uniform over an uninterrupted run's duration, or just before it
           starts). Expected: exit 1, one line `error: No space left on device ...`, no traceback,
           nothing half-written (no `*.tmp`, no Orbax tmp directory, metrics.jsonl ending in a
           newline); then the filler removed and the same command run to the end equals the
           uninterrupted run. Mounting a tmpfs needs a private mount namespace: run as root (or
           where user namespaces are allowed), the script re-executes itself under
           `unshare -m` (or `unshare -rm`).
"""

from __future__ import annotations

import argparse
import collections
import errno
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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.fault_table import _Child, _child_env, _records, bit_flip, truncate
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.tasks import base as tasks_base

_NAMESPACE_FLAG = "GMPO_HISTORY_FAULTS_IN_MOUNT_NAMESPACE"
_TMPFS_SIZE = "16m"


def _latest(workdir: pathlib.Path, sub: str = "checkpoints") -> int | None:
  steps = [int(p.name) for p in (workdir / sub).glob("*") if p.name.isdigit()]
  return max(steps, default=None)


def _run(workdir: pathlib.Path, env) -> tuple[int, list[str]]:
  child = _Child(workdir, env=env)
  return child.wait(), child.lines


def _warnings(lines: list[str], *needles: str) -> list[str]:
  return [_anonymous(line) for line in lines if any(n in line for n in needles)]


def _anonymous(line: str) -> str:
  line = re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ \S+\] ", "", line)  # absl's log prefix
  line = re.sub(r"/tmp/history_faults-[^/ ]+/", "…/", line)
  line = re.sub(r"/\d{6,}(?=[/. ]|$)", "/N", line)
  return re.sub(r"[0-9a-f]{32}", "HASH", line).replace("|", "/")


def _same_files(workdir: pathlib.Path, before: dict[str, bytes]) -> bool:
  """metrics.jsonl byte for byte, summary.json but for its `perf` entry (each process measures
  the CPU's peak anew)."""

  def comparable(name, data):
    return json.loads(data) | {"perf": None} if name == metrics_lib.SUMMARY_FILE else data

  return all(
      comparable(name, (workdir / name).read_bytes()) == comparable(name, data)
      for name, data in before.items()
  )


def _tensorboard_steps(workdir: pathlib.Path, tag: str = "reward/mean") -> list[int]:
  accumulator = EventAccumulator(str(workdir / metrics_lib.TENSORBOARD_DIR))
  accumulator.Reload()
  return [event.step for event in accumulator.Scalars(tag)]


def make_bases(scratch: pathlib.Path, env) -> dict[str, pathlib.Path]:
  """An uninterrupted run ('finished', run twice: the first fills the compilation cache) and one
  stopped by SIGTERM once step 2 is logged ('stopped')."""
  for name in ("warmup", "finished"):
    rc, lines = _run(scratch / name, env)
    if rc:
      raise RuntimeError("the reference run failed:\n" + "\n".join(lines[-40:]))
  stopped = scratch / "stopped"
  child = _Child(stopped, env=env)
  while child.proc.poll() is None:
    if any(r == 2 for r in _records(stopped)):
      child.proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  if child.wait() or _latest(stopped) is None or _latest(stopped) == 4:
    raise RuntimeError("the stopped run did not stop with a checkpoint before the end")
  return {"finished": scratch / "finished", "stopped": stopped}


# -- history -----------------------------------------------------------------------------------

HISTORY_FAULTS = (
    "metrics.jsonl deleted",
    "a 0xFF byte",
    "a changed digit",
    "a line deleted",
    "the file cut inside a line",
    "tensorboard/ deleted",
)


def _damage_history(workdir: pathlib.Path, fault: str, rng: np.random.Generator) -> str:
  """Damages metrics.jsonl (a line at or before the checkpoint) or tensorboard/; says where."""
  path = workdir / metrics_lib.METRICS_FILE
  if fault == "metrics.jsonl deleted":
    path.unlink()
    return "-"
  if fault == "tensorboard/ deleted":
    shutil.rmtree(workdir / metrics_lib.TENSORBOARD_DIR)
    return "-"
  lines = path.read_bytes().splitlines(keepends=True)
  covered = [i for i, line in enumerate(lines) if json.loads(line)["step"] <= _latest(workdir)]
  i = int(rng.choice(covered))
  line = lines[i]
  if fault == "a 0xFF byte":
    at = int(rng.integers(len(line) - 1))
    lines[i] = line[:at] + b"\xff" + line[at + 1 :]
  elif fault == "a changed digit":
    at = int(rng.choice([k for k, c in enumerate(line) if chr(c).isdigit()]))
    lines[i] = line[:at] + str((int(chr(line[at])) + 1) % 10).encode() + line[at + 1 :]
  elif fault == "a line deleted":
    lines[i] = b""
  else:
    at = int(rng.integers(1, len(line) - 1))
    lines = lines[:i] + [line[:at]]
  path.write_bytes(b"".join(lines))
  return f"line {i + 1}"


def history_trial(
    base: pathlib.Path,
    workdir: pathlib.Path,
    fault: str,
    env,
    rng: np.random.Generator,
    reference: dict[int, dict],
) -> dict:
  shutil.copytree(base, workdir)
  finished = _latest(workdir) == max(reference)
  original = {
      name: (workdir / name).read_bytes()
      for name in (metrics_lib.METRICS_FILE, metrics_lib.SUMMARY_FILE)
      if (workdir / name).exists()
  }
  covered = b"".join(
      line
      for line in original[metrics_lib.METRICS_FILE].splitlines(keepends=True)
      if json.loads(line)["step"] <= _latest(workdir)
  )
  where = _damage_history(workdir, fault, rng)
  damaged = (
      (workdir / metrics_lib.METRICS_FILE).read_bytes()
      if fault not in ("metrics.jsonl deleted", "tensorboard/ deleted")
      else None
  )
  rc, lines = _run(workdir, env)
  said = _warnings(lines, metrics_lib.METRICS_FILE, "tensorboard")
  moved = workdir / f"{metrics_lib.METRICS_FILE}.damaged-1"
  checks = {
      "exit 0": rc == 0,
      "records equal": _records(workdir) == reference,
      "history kept": (workdir / metrics_lib.METRICS_FILE).read_bytes().startswith(covered),
      "files as before": not finished or _same_files(workdir, original),
      "moved aside as it was": damaged is None
      or (moved.exists() and moved.read_bytes() == damaged or not damaged),
      "one warning": len(said) == 1,
      "tensorboard": _tensorboard_steps(workdir)
      == sorted(s for s, r in reference.items() if r.get("reward/mean") is not None),
  }
  failed = [name for name, ok in checks.items() if not ok]
  return {
      "fault": fault,
      "base": "finished" if finished else f"stopped at step {_latest(base)}",
      "where": where,
      "rc": rc,
      "said": said[0] if said else "",
      "outcome": "recovered" if not failed else f"NOT RECOVERED ({', '.join(failed)})",
  }


# -- caches ------------------------------------------------------------------------------------

WARM_START_FAULTS = ("a bit flipped in a data file", "metadata deleted", "manifest deleted")
DATASET_FAULTS = (
    "an array_record file cut short",
    "a bit flipped in an array_record file",
    "manifest deleted",
)


def _damage_warm_start(workdir: pathlib.Path, fault: str, rng: np.random.Generator) -> str:
  step_dir = workdir / "warm_start" / str(_latest(workdir, "warm_start"))
  if fault == "metadata deleted":
    target = step_dir / "metadata" / "metadata"
    target.unlink()
  elif fault == "manifest deleted":
    target = step_dir / "gmpo_manifest.json"
    target.unlink()
  else:
    data = sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )
    target = data[int(rng.integers(len(data)))]
    bit_flip(str(rng.choice(["start", "middle", "end"])))(target)
  return str(target.relative_to(workdir))


def _damage_dataset(workdir: pathlib.Path, fault: str, rng: np.random.Generator) -> str:
  [cache] = [p.parent for p in (workdir / "data").rglob(tasks_base.CACHE_MANIFEST)]
  if fault == "manifest deleted":
    target = cache / tasks_base.CACHE_MANIFEST
    target.unlink()
  else:
    records = sorted(cache.glob("*.array_record-*"))
    target = records[int(rng.integers(len(records)))]
    (
        truncate
        if fault == "an array_record file cut short"
        else bit_flip(str(rng.choice(["start", "middle", "end"])))
    )(target)
  return str(target.relative_to(workdir)).split("/")[-1]


def cache_trial(
    base: pathlib.Path,
    workdir: pathlib.Path,
    cache: str,
    fault: str,
    env,
    rng: np.random.Generator,
    reference: dict[int, dict],
    *,
    resumable: bool,
) -> dict:
  shutil.copytree(base, workdir)
  if not resumable:  # only the warm-start cache and the data: a fresh RL run
    for name in ("checkpoints", metrics_lib.TENSORBOARD_DIR, "eval_results"):
      shutil.rmtree(workdir / name)
    for name in (metrics_lib.METRICS_FILE, metrics_lib.SUMMARY_FILE, metrics_lib.PLOT_FILE):
      (workdir / name).unlink()
  before = {
      name: (workdir / name).read_bytes()
      for name in (metrics_lib.METRICS_FILE, metrics_lib.SUMMARY_FILE)
      if resumable
  }
  damage = _damage_warm_start if cache == "warm start" else _damage_dataset
  where = damage(workdir, fault, rng)
  rc, lines = _run(workdir, env)
  needles = ("warm start: no step",) if cache == "warm start" else ("dataset cache",)
  said = _warnings(lines, *needles)
  expected = (
      ("skipping it" if resumable else "recomputing it")
      if cache == "warm start"
      else ("building it again")
  )
  checks = {
      "exit 0": rc == 0,
      "one warning naming it": len(said) == 1
      and expected in said[0]
      and (cache == "warm start" or where in said[0]),
      "records equal": _records(workdir) == reference,
      "files as before": _same_files(workdir, before),
  }
  failed = [name for name, ok in checks.items() if not ok]
  return {
      "cache": cache,
      "fault": fault,
      "rl": "resumable" if resumable else "no RL checkpoint",
      "where": where,
      "rc": rc,
      "said": said[0] if said else "",
      "outcome": (
          ("skipped" if resumable else "recomputed") if cache == "warm start" else "rebuilt"
      )
      if not failed
      else f"NOT RECOVERED ({', '.join(failed)})",
  }


# -- a full disk -------------------------------------------------------------------------------


def _fill(path: pathlib.Path) -> None:
  """Writes `path` until the file system is full (chunks down to one byte)."""
  with open(path, "wb", buffering=0) as file:
    chunk = 1 << 20
    while chunk:
      try:
        file.write(b"\0" * chunk)
      except OSError as error:
        if error.errno != errno.ENOSPC:
          raise
        chunk //= 2


_ONE_LINE = re.compile(
    r"error: No space left on device( while saving step \d+ to \S+; (the last "
    r"complete step is \d+|no step is complete yet)| in the workdir \S+: .+)"
)


def _half_written(workdir: pathlib.Path) -> list[str]:
  found = [
      str(p.relative_to(workdir))
      for p in workdir.rglob("*")
      if p.name.endswith(".tmp")
      or ".tmp-" in p.name
      or "orbax-checkpoint-tmp" in p.name
      or p.name.startswith("incomplete.")
  ]
  metrics = workdir / metrics_lib.METRICS_FILE
  if metrics.exists() and metrics.read_bytes() and not metrics.read_bytes().endswith(b"\n"):
    found.append(f"{metrics_lib.METRICS_FILE} (a half line)")
  return found


def disk_trial(
    scratch: pathlib.Path, name: str, at: float | None, env, reference: dict[int, dict]
) -> dict:
  """The disk fills `at` seconds into a run (None: before it starts)."""
  disk = scratch / name
  disk.mkdir()
  subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={_TMPFS_SIZE}", "tmpfs", str(disk)], check=True
  )
  try:
    workdir, filler = disk / "run", disk / "filler"
    if at is None:
      _fill(filler)
    child = _Child(workdir, env=env)
    phase = "before the start" if at is None else None
    while at is not None and child.proc.poll() is None:
      if time.monotonic() - child.start >= at:
        phase, writing = child.poll()
        phase = f"{phase} (writing {writing})" if writing else phase
        _fill(filler)
        break
      time.sleep(0.01)
    rc = child.wait()
    phase = phase or "after the end"
    log = child.lines
    errors = [line for line in log if line.startswith("error:")]
    noise = [
        line
        for line in log
        if "Traceback" in line
        or "Event loop is closed" in line
        or re.match(r"E\d{4} ", line)
        or "Exception ignored" in line
    ]
    half = _half_written(workdir)
    filler.unlink(missing_ok=True)
    rerun_rc, _ = _run(workdir, env)
    equal = rerun_rc == 0 and _records(workdir) == reference
    checks = {
        "exit 1": rc == 1,
        "one line": len(errors) == 1 and bool(_ONE_LINE.fullmatch(errors[0])) and not noise,
        "nothing half-written": not half,
        "rerun equal": equal,
    }
    failed = [k for k, ok in checks.items() if not ok]
    outcome = "one line, resumed identically" if not failed else f"FAILED ({', '.join(failed)})"
    if rc == 0 and equal:
      outcome = "finished before the disk filled"
    return {
        "at": "start" if at is None else f"{at:.1f}",
        "phase": phase,
        "rc": rc,
        "line": _anonymous(errors[-1]) if errors else "",
        "noise": len(noise),
        "half": ", ".join(half) or "none",
        "outcome": outcome,
    }
  finally:
    subprocess.run(["umount", str(disk)], check=True)


# -- the tables --------------------------------------------------------------------------------


def _in_mount_namespace(argv: list[str]) -> None:
  """Re-executes this script in a private mount namespace (for its tmpfs mounts)."""
  if os.environ.get(_NAMESPACE_FLAG):
    return
  unshare = (
      ["unshare", "-m", "--propagation", "private"]
      if os.geteuid() == 0
      else ["unshare", "-rm", "--propagation", "private"]
  )
  os.execvpe(
      unshare[0],
      [*unshare, sys.executable, "-m", "experiments.history_faults", *argv],
      dict(os.environ, **{_NAMESPACE_FLAG: "1"}),
  )


def _cells(trials: list[dict]) -> str:
  counts = collections.Counter(t["outcome"] for t in trials)
  return "; ".join(f"{o} {n}/{len(trials)}" for o, n in counts.items())


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--sections",
      nargs="+",
      default=["history", "caches", "disk"],
      choices=["history", "caches", "disk"],
  )
  parser.add_argument("--trials", type=int, default=5, help="trials of each fault")
  parser.add_argument("--disk-trials", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if "disk" in args.sections:
    _in_mount_namespace(argv)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="history_faults-"))
  env = _child_env(scratch)
  rng = np.random.default_rng(args.seed)
  started, load = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
  failures = 0
  try:
    bases = make_bases(scratch, env)
    reference = _records(bases["finished"])
    trial_id = iter(range(10**6))
    if "history" in args.sections:
      trials = [
          history_trial(
              bases["finished" if i % 2 == 0 else "stopped"],
              scratch / f"h{next(trial_id)}",
              fault,
              env,
              rng,
              reference,
          )
          for fault in HISTORY_FAULTS
          for i in range(args.trials)
      ]
      print("\n## The run's history: metrics.jsonl and tensorboard/\n")
      print(
          f"Run {started}, load average {load:.1f}. Each trial copies a finished smoke workdir "
          "(odd trials) or one stopped by SIGTERM after step 2 (its last checkpoint, even "
          "trials), damages it as named (a line chosen at random among those at or before the "
          "checkpoint), and runs the same command. `recovered` = exit 0; metrics.jsonl holds "
          "the checkpoint's records byte for byte (the finished workdir's metrics.jsonl and "
          "summary.json as before the damage, but for the CPU peak each process measures) and "
          "every record equals an uninterrupted run's (timings aside); the damaged file is "
          "kept as `metrics.jsonl.damaged-1`; one warning; TensorBoard shows the "
          "uninterrupted run's steps.\n"
      )
      print("| fault | trials | exit codes | the warning (one trial) | outcome |")
      print("|---|---|---|---|---|")
      for fault in HISTORY_FAULTS:
        rows = [t for t in trials if t["fault"] == fault]
        failures += sum("NOT" in t["outcome"] for t in rows)
        codes = ", ".join(sorted({str(t["rc"]) for t in rows}))
        print(f"| {fault} | {len(rows)} | {codes} | `{rows[0]['said']}` | {_cells(rows)} |")
    if "caches" in args.sections:
      trials = []
      for cache, faults in (("warm start", WARM_START_FAULTS), ("dataset", DATASET_FAULTS)):
        for fault in faults:
          for _ in range(args.trials):
            trials.append(
                cache_trial(
                    bases["finished"],
                    scratch / f"c{next(trial_id)}",
                    cache,
                    fault,
                    env,
                    rng,
                    reference,
                    resumable=True,
                )
            )
      for i in range(args.trials):
        trials.append(
            cache_trial(
                bases["finished"],
                scratch / f"c{next(trial_id)}",
                "warm start",
                WARM_START_FAULTS[i % len(WARM_START_FAULTS)],
                env,
                rng,
                reference,
                resumable=False,
            )
        )
      print("\n## Caches that can be rebuilt\n")
      print(
          f"Run {started}. Each trial copies the finished smoke workdir, damages one cache as "
          "named (the file and position at random), and runs the same command. With RL "
          "checkpoints a damaged warm-start cache is moved to `warm_start/corrupted/` and "
          "skipped (RL resumes from its own checkpoint; the summary's warm-start entry comes "
          "from the checkpoint); with none (checkpoints, metrics and tensorboard/ removed, "
          "the damage rotating over the three kinds) it is recomputed. Expected: exit 0, one "
          "warning naming what was damaged, every record equal to an uninterrupted run's "
          "(timings aside), and on the resumed workdir metrics.jsonl and summary.json "
          "unchanged.\n"
      )
      print("| cache | fault | RL | trials | exit codes | the warning (one trial) | outcome |")
      print("|---|---|---|---|---|---|---|")
      for key, rows in _grouped(trials, ("cache", "fault", "rl")).items():
        failures += sum("NOT" in t["outcome"] for t in rows)
        codes = ", ".join(sorted({str(t["rc"]) for t in rows}))
        print(
            f"| {' | '.join(key)} | {len(rows)} | {codes} | `{rows[0]['said']}` | "
            f"{_cells(rows)} |"
        )
    if "disk" in args.sections:
      started_run = time.monotonic()
      _run(scratch / "timing", env)
      duration = time.monotonic() - started_run
      times = [None] + sorted(rng.uniform(0, duration, args.disk_trials - 1).tolist())
      trials = [disk_trial(scratch, f"d{i}", at, env, reference) for i, at in enumerate(times)]
      print("\n## A full disk\n")
      print(
          f"Run {started}. The workdir on a {_TMPFS_SIZE[:-1]} MiB tmpfs (mounted in a private "
          "mount namespace: `unshare -m`), filled by a filler file at a random moment "
          f"(uniform over an uninterrupted run's {duration:.0f} s, or before the start); then "
          "the filler removed and the same command rerun. `one line` = exit 1, a single "
          "`error: No space left on device ...` line and no traceback, `Event loop is closed` "
          "or other error line; `nothing half-written` = no `*.tmp` file, Orbax tmp "
          "directory or incomplete dataset, and metrics.jsonl ends with a newline; `resumed "
          "identically` = the rerun exits 0 with every record equal to an uninterrupted "
          "run's (timings aside).\n"
      )
      print(
          "| trial | filled at (s) | phase | exit code | the line printed | other error lines | "
          "half-written | outcome |"
      )
      print("|---|---|---|---|---|---|---|---|")
      for i, t in enumerate(trials, start=1):
        failures += "FAILED" in t["outcome"]
        print(
            f"| {i} | {t['at']} | {t['phase']} | {t['rc']} | `{t['line']}` | {t['noise']} | "
            f"{t['half']} | {t['outcome']} |"
        )
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"\nFailures (neither recovered nor one clear line): {failures}.")
  return 1 if failures else 0


def _grouped(trials: list[dict], keys: tuple[str, ...]) -> dict[tuple[str, ...], list[dict]]:
  groups: dict[tuple[str, ...], list[dict]] = {}
  for trial in trials:
    groups.setdefault(tuple(trial[k] for k in keys), []).append(trial)
  return groups


if __name__ == "__main__":
  sys.exit(main())
