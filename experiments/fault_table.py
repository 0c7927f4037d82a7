"""Fault table for `gmpo_jax.infra.checkpointing`: damage saved steps, restore, record what happens.

    .venv/bin/python -m experiments.fault_table            # the Checkpointer's tables (~1 min)
    .venv/bin/python -m experiments.fault_table --sections checkpointer runner > docs/faults.md
    .venv/bin/python -m experiments.fault_table --sections signals refused long-run >> docs/faults.md

Every trial starts from the same three steps (1, 2, 3) of a tiny model with its adamw state,
saved with `best_metric`, copies them, injects one fault, opens a new `Checkpointer` and calls
`restore_latest`. Positions:

  latest    the fault is in step 3, the newest: the run must resume from step 2.
  fallback  step 3 is already bad (its manifest deleted) and the fault is in step 2, the step
            the run falls back to: it must resume from step 1.
  only      the directory holds step 3 alone: nothing may be loaded; a clear error.

Outcomes: `recovered` (the expected step's arrays, key and metadata restored exactly, a warning
names the damaged step, and it was moved to corrupted/), `error` (an exception with a message,
nothing loaded), `skipped` (an unreadable step left in place, the previous one restored), and
anything else is printed as a failure: `LOADED DAMAGED STEP`, `WRONG STEP`, `NOT MOVED`.

`runner` corrupts the step a real run (configs/smoke.py, stopped by SIGTERM after step 3)
resumes from, resumes it, and compares its metrics with an uninterrupted run.

`signals`, `refused` and `long-run` run `gmpo_jax.main` in child processes: kill -9 and SIGTERM at random moments
of each phase (warm start, first evaluation, RL steps, a checkpoint write), each rerun to the end
and compared with an uninterrupted run; workdirs the runner must refuse with one line (another
model or experiment, read-only); and a long run whose resident memory is read as it goes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmpo_jax.infra import checkpointing
from gmpo_jax.infra import metrics as metrics_lib

# -- faults: each takes a file and damages it in place ---------------------------------------


def truncate(path: pathlib.Path) -> None:
  """Keeps the first half of the file (an empty file stays empty: that case is skipped)."""
  with path.open("r+b") as file:
    file.truncate(path.stat().st_size // 2)


def _offset(size: int, where: str) -> int:
  return {"start": 0, "middle": size // 2, "end": max(size - 1, 0)}[where]


def garbage(where: str, length: int = 16) -> Callable[[pathlib.Path], None]:
  """Overwrites `length` bytes at `where` with their complement (always a change)."""

  def fault(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    start = min(_offset(len(data), where), max(len(data) - length, 0))
    for i in range(start, min(start + length, len(data))):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))

  fault.__name__ = f"garbage@{where}"
  return fault


def bit_flip(where: str) -> Callable[[pathlib.Path], None]:
  """Flips one bit of the byte at `where` (bit = offset mod 8)."""

  def fault(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    offset = _offset(len(data), where)
    data[offset] ^= 1 << (offset % 8)
    path.write_bytes(bytes(data))

  fault.__name__ = f"bit_flip@{where}"
  return fault


def delete(path: pathlib.Path) -> None:
  path.unlink()


FAULTS: dict[str, Callable[[pathlib.Path], None]] = {
    "truncate": truncate,
    **{f"garbage@{w}": garbage(w) for w in ("start", "middle", "end")},
    **{f"bit_flip@{w}": bit_flip(w) for w in ("start", "middle", "end")},
    "delete": delete,
}


def step_files(step_dir: pathlib.Path) -> list[str]:
  """Every file of a step directory, relative, sorted."""
  return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def file_type(name: str) -> str:
  """What a file of an Orbax step (as this repository saves it) holds."""
  if name == checkpointing.MANIFEST_FILE:
    return "integrity manifest (gmpo_manifest.json)"
  if name == "_CHECKPOINT_METADATA":
    return "Orbax step metadata (_CHECKPOINT_METADATA)"
  if name == "commit_success.txt":
    return "step commit marker (commit_success.txt)"
  if name.endswith("/commit_success.txt"):
    return "item commit markers (*/commit_success.txt)"
  if name == "metadata/metadata":
    return "run metadata JSON (metadata/metadata)"
  if name == "metrics/metrics":
    return "metrics JSON (metrics/metrics)"
  if name.endswith("manifest.ocdbt"):
    return "OCDBT manifests (state/**/manifest.ocdbt)"
  if "/d/" in name:
    return "array data (state/**/d/*)"
  if name == "state/_METADATA":
    return "tree metadata (state/_METADATA)"
  if name == "state/_sharding":
    return "shardings (state/_sharding)"
  if name.startswith("state/array_metadatas/"):
    return "array metadatas (state/array_metadatas/*)"
  return f"other ({name})"


# -- the saved steps --------------------------------------------------------------------------

TX = optax.adamw(1e-2)


def make_state(step: int, *, features: int = 4) -> checkpointing.CheckpointState:
  """A Linear(3, features) after one adamw update, distinct per step."""
  _, params = nnx.split(nnx.Linear(3, features, rngs=nnx.Rngs(step)))
  opt_state = TX.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + step), params)
  _, opt_state = TX.update(grads, opt_state, params)
  return checkpointing.CheckpointState(
      step=step,
      model=params,
      opt_state=opt_state,
      key=jax.random.fold_in(jax.random.key(7), step),
      metadata={"data_position": 10 * step, "skipped_updates": 0},
  )


def abstract_target(*, features: int = 4) -> checkpointing.CheckpointState:
  _, params = nnx.split(nnx.eval_shape(lambda: nnx.Linear(3, features, rngs=nnx.Rngs(0))))
  return checkpointing.CheckpointState(
      step=0,
      model=params,
      opt_state=jax.eval_shape(TX.init, params),
      key=jax.eval_shape(lambda: jax.random.key(0)),
      metadata={},
  )


def save_steps(directory: pathlib.Path, steps=(1, 2, 3), *, features: int = 4) -> None:
  with checkpointing.Checkpointer(directory, best_metric="acc") as ckpt:
    for step in steps:
      ckpt.save(make_state(step, features=features), metrics={"acc": float(step)})


def host_values(state: checkpointing.CheckpointState) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves((state.model, state.opt_state))] + [
      np.asarray(jax.random.key_data(state.key))
  ]


def same_state(restored: checkpointing.CheckpointState, step: int) -> bool:
  expected = make_state(step)
  return (
      restored.step == step
      and dict(restored.metadata) == dict(expected.metadata)
      and all(np.array_equal(a, b) for a, b in zip(host_values(restored), host_values(expected)))
  )


# -- trials ---------------------------------------------------------------------------------


class _Warnings(logging.Handler):

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())


def restore_outcome(
    directory: pathlib.Path,
    *,
    expected_step: int | None,
    damaged: list[int],
    target: checkpointing.CheckpointState | None = None,
) -> str:
  """Restores `directory` and names the outcome (see the module docstring)."""
  handler = _Warnings()
  logger = logging.getLogger("gmpo_jax.infra.checkpointing")
  logger.addHandler(handler)
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      try:
        with checkpointing.Checkpointer(directory, best_metric="acc") as ckpt:
          restored = ckpt.restore_latest(target or abstract_target())
      except Exception as error:  # noqa: BLE001 - an error is an outcome
        if expected_step is not None:
          return f"UNEXPECTED ERROR {type(error).__name__}: {error}"
        return "error" if str(error) else "ERROR WITHOUT MESSAGE"
  finally:
    logger.removeHandler(handler)
  if "Event loop is closed" in stderr.getvalue():
    return "EVENT LOOP TRACEBACK"
  if restored is None or expected_step is None:
    return (
        f"LOADED {'NOTHING' if restored is None else 'STEP %d' % restored.step} (expected an error)"
    )
  if restored.step != expected_step:
    return f"WRONG STEP {restored.step}"
  if not same_state(restored, expected_step):
    return "LOADED DAMAGED STEP"
  moved = {p.name.split(".")[0] for p in (directory / checkpointing.CORRUPTED_DIR).glob("*")}
  if not all(any(f"step {s}" in m for m in handler.messages) for s in damaged):
    return "NO WARNING"
  if moved != {str(s) for s in damaged}:
    return f"NOT MOVED (corrupted/ holds {sorted(moved)})"
  return "recovered"


POSITIONS = {
    # position: (steps saved, step damaged, steps damaged in all, expected step)
    "latest": ((1, 2, 3), 3, [3], 2),
    "fallback": ((1, 2, 3), 2, [2, 3], 1),
    "only": ((3,), 3, [3], None),
}


def corruption_trials(pristine: dict[tuple[int, ...], pathlib.Path], scratch: pathlib.Path):
  """Yields (file type, fault, position, file, outcome) for every file x fault x position."""
  for position, (steps, step, damaged, expected) in POSITIONS.items():
    # Array files have random names: enumerate the damaged step's own files.
    for name in step_files(pristine[steps] / str(step)):
      for fault_name, fault in FAULTS.items():
        directory = scratch / f"{position}-{fault_name}-{name.replace('/', '_')}"
        shutil.copytree(pristine[steps], directory)
        path = directory / str(step) / name
        if path.stat().st_size == 0 and fault_name != "delete":
          shutil.rmtree(directory)
          continue
        fault(path)
        if position == "fallback":
          (directory / "3" / checkpointing.MANIFEST_FILE).unlink()
        outcome = restore_outcome(directory, expected_step=expected, damaged=damaged)
        yield file_type(name), fault_name, position, name, outcome
        shutil.rmtree(directory)


def special_trials(pristine: dict[tuple[int, ...], pathlib.Path], scratch: pathlib.Path):
  """Faults that are not byte damage of one file: yields (fault, position, outcome)."""
  base = pristine[(1, 2, 3)]

  def trial(name, position, damage, *, expected=2, damaged=(3,), target=None, source=base):
    directory = scratch / name.replace(" ", "_").replace("/", "_")
    shutil.copytree(source, directory)
    damage(directory)
    outcome = restore_outcome(
        directory, expected_step=expected, damaged=list(damaged), target=target
    )
    shutil.rmtree(directory, ignore_errors=True)
    return name, position, outcome

  def edit_json(relative, edit):
    def damage(directory):
      path = directory / "3" / relative
      path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return damage

  yield trial(
      "metadata: valid JSON, data_position 0",
      "latest",
      edit_json("metadata/metadata", lambda m: {**m, "data_position": 0}),
  )
  yield trial(
      "metrics: valid JSON, acc 1e9", "latest", edit_json("metrics/metrics", lambda m: {"acc": 1e9})
  )
  yield trial(
      "manifest: valid JSON, one hash changed",
      "latest",
      edit_json(
          checkpointing.MANIFEST_FILE,
          lambda m: {
              **m,
              "files": {
                  **m["files"],
                  "metadata/metadata": {**m["files"]["metadata/metadata"], "sha256": "0" * 64},
              },
          },
      ),
  )
  yield trial(
      "manifest: valid JSON, a shape changed",
      "latest",
      edit_json(
          checkpointing.MANIFEST_FILE,
          lambda m: {
              **m,
              "tree": {
                  **m["tree"],
                  "['model']['kernel'].value": {"shape": [9, 9], "dtype": "float32"},
              },
          },
      ),
  )

  def extra_truncated(directory):
    data = sorted((directory / "3" / "state").rglob("d/*"))[0]
    (data.parent / "0123456789abcdef").write_bytes(data.read_bytes()[: data.stat().st_size // 2])

  yield trial("extra truncated data file", "latest", extra_truncated)
  yield trial(
      "half-written step 4 committed without manifest",
      "latest",
      lambda d: (
          shutil.copytree(d / "3", d / "4"),
          (d / "4" / checkpointing.MANIFEST_FILE).unlink(),
      ),
      expected=3,
      damaged=(4,),
  )
  yield trial(
      "Orbax tmp directory of step 4 left by a kill",
      "latest",
      lambda d: shutil.copytree(d / "3", d / "4.orbax-checkpoint-tmp"),
      expected=3,
      damaged=(),
  )

  # A process killed between Orbax's commit and the end of the save: the manifest lacks the
  # hashes of the two files Orbax writes at the commit; they get structure checks only.
  unsealed = scratch / "unsealed_src"
  seal = checkpointing.Checkpointer._seal
  checkpointing.Checkpointer._seal = lambda self: None
  try:
    save_steps(unsealed)
  finally:
    checkpointing.Checkpointer._seal = seal
  yield trial(
      "unsealed step: garbage in _CHECKPOINT_METADATA",
      "latest",
      lambda d: garbage("start")(d / "3" / "_CHECKPOINT_METADATA"),
      source=unsealed,
  )
  yield trial(
      "unsealed step: _CHECKPOINT_METADATA truncated",
      "latest",
      lambda d: truncate(d / "3" / "_CHECKPOINT_METADATA"),
      source=unsealed,
  )
  yield trial(
      "unsealed step: commit_success.txt deleted",
      "latest",
      lambda d: delete(d / "3" / "commit_success.txt"),
      source=unsealed,
  )

  other_latest = scratch / "other_latest_src"
  save_steps(other_latest, (1, 2))
  save_steps(other_latest, (3,), features=5)
  yield trial("another model (Linear 3x5) in step 3", "latest", lambda d: None, source=other_latest)
  yield trial(
      "another model in every step",
      "only",
      lambda d: None,
      expected=None,
      target=abstract_target(features=5),
  )


def unreadable_trials(pristine: dict[tuple[int, ...], pathlib.Path], scratch: pathlib.Path):
  """A step (or one file) with mode 000, restored by a user who is not its owner.

  As root (chmod has no effect on root), the restore runs as `nobody` through setpriv.
  """
  cases = {"step directory mode 000": "3", "one data file mode 000": None}
  for name, relative in cases.items():
    directory = pathlib.Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))
    shutil.copytree(pristine[(1, 2, 3)], directory / "ckpt")
    target = directory / "ckpt" / "3"
    if relative is None:
      target = sorted((target / "state").rglob("d/*"))[0]
    as_other_user = os.geteuid() == 0
    if as_other_user:
      if shutil.which("setpriv") is None:
        yield name, "latest", "not run (root without setpriv)"
        continue
      subprocess.run(["chown", "-R", "65534:65534", str(directory)], check=True)
    os.chmod(target, 0)
    script = (
        "import sys, pathlib, logging\n"
        "from experiments import fault_table as f\n"
        "warnings = f._Warnings()\n"
        "logging.getLogger('gmpo_jax.infra.checkpointing').addHandler(warnings)\n"
        "outcome = f.restore_outcome(pathlib.Path(sys.argv[1]), expected_step=2, damaged=[])\n"
        "print('WARNINGS', sum('is not readable by this process' in m for m in warnings.messages))\n"
        "print('OUTCOME', outcome)\n"
    )
    command = [sys.executable, "-c", script, str(directory / "ckpt")]
    if as_other_user:
      command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        env=dict(os.environ, HOME=str(directory), JAX_PLATFORMS="cpu"),
    )
    lines = dict(
        line.split(" ", 1)
        for line in result.stdout.splitlines()
        if line.startswith(("OUTCOME ", "WARNINGS "))
    )
    outcome = lines.get("OUTCOME", f"CRASHED: {result.stderr[-500:]}")
    warned = int(lines.get("WARNINGS", -1))
    still_there = target.exists()
    if outcome == "recovered" and warned == 1 and still_there:
      outcome = "skipped (one warning naming the path, left in place), step 2 restored"
    elif outcome == "recovered":
      outcome = f"recovered but {warned} warnings"
    os.chmod(target, 0o755)
    shutil.rmtree(directory, ignore_errors=True)
    yield name, "latest", outcome


# -- through the real runner -----------------------------------------------------------------


def runner_trials(scratch: pathlib.Path):
  """Corrupts the step a stopped smoke run resumes from; the resumed run must match."""
  from configs import smoke
  from gmpo_jax.runner import loop, rl_step

  def records(workdir):
    return [
        {k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS}
        for r in metrics_lib.read_metrics(workdir)
    ]

  reference_dir = scratch / "runner_reference"
  loop.train_and_evaluate(smoke.get_config(), reference_dir)
  reference = records(reference_dir)

  stopped = scratch / "runner_stopped"
  write = metrics_lib.MetricsWriter.write

  def write_then_preempt(self, step, record):
    write(self, step, record)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  metrics_lib.MetricsWriter.write = write_then_preempt
  try:
    loop.train_and_evaluate(smoke.get_config(), stopped)
  finally:
    metrics_lib.MetricsWriter.write = write
  data_file = sorted((stopped / "checkpoints" / "3" / "state").rglob("d/*"))[0].relative_to(
      stopped / "checkpoints" / "3"
  )
  for fault_name in ("truncate", "garbage@middle", "bit_flip@middle", "delete"):
    for relative in (str(data_file), "metadata/metadata"):
      workdir = scratch / f"runner-{fault_name}-{relative.replace('/', '_')}"
      shutil.copytree(stopped, workdir)
      FAULTS[fault_name](workdir / "checkpoints" / "3" / relative)
      # The metrics already written for step 3 are rewritten by the resumed run from step 2.
      messages = _Warnings()
      messages.setLevel(logging.INFO)
      train_logger = logging.getLogger("gmpo_jax.runner")
      level = train_logger.level
      train_logger.setLevel(logging.INFO)
      train_logger.addHandler(messages)
      try:
        loop.train_and_evaluate(smoke.get_config(), workdir)
        got = records(workdir)
        by_step = {r["step"]: r for r in got}
        same = sorted(by_step) == [r["step"] for r in reference] and all(
            by_step[r["step"]].keys() == r.keys()
            and all(np.allclose(by_step[r["step"]][k], r[k], rtol=1e-6) for k in r)
            for r in reference
        )
        moved = [p.name.split(".")[0] for p in (workdir / "checkpoints" / "corrupted").glob("*")]
        resumed = any(m.startswith("resuming from step 2") for m in messages.messages)
        outcome = (
            "recovered: resumed from step 2, metrics equal the uninterrupted run"
            if same and resumed and moved == ["3"]
            else f"DIFFERENT (metrics equal: {same}, resumed from 2: {resumed}, moved {moved})"
        )
      except Exception as error:  # noqa: BLE001
        outcome = f"ERROR {type(error).__name__}: {error}"
      finally:
        train_logger.removeHandler(messages)
        train_logger.setLevel(level)
      yield file_type(relative), fault_name, outcome
      shutil.rmtree(workdir)


# -- through the command line, in a child process ---------------------------------------------

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TMP_MARK = "orbax-checkpoint-tmp"
PHASES = ("warm start", "first evaluation", "RL steps", "checkpoint write")


class _Child:
  """`gmpo_jax.main` on configs/smoke.py in a child process, its log and workdir watched.

  The phase it is in is read from what it leaves behind: the warm start begins when
  `warm_start/` appears, the first evaluation at the warm start's last log line, the RL steps
  at `before RL:`, and it is done at the run summary; a checkpoint write is under way while an
  Orbax tmp directory exists in `checkpoints/` or `warm_start/`.
  """

  _MARKERS = (
      ("warm start: ", "first evaluation"),
      ("before RL:", "RL steps"),
      ("Run summary", "done"),
  )

  def __init__(
      self, workdir: pathlib.Path, *extra: str, env: dict[str, str], prefix: tuple[str, ...] = ()
  ):
    self.workdir = workdir
    self.lines: list[str] = []
    self.events: list[tuple[float, str]] = []  # (time, phase that begins)
    self.writes: list[str] = []  # tmp directories seen, in order
    self.start = time.monotonic()
    self.proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "gmpo_jax.main",
            "--config=configs/smoke.py",
            f"--workdir={workdir}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=_REPO,
        env=env,
    )
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))
      for marker, phase in self._MARKERS:
        if marker in line and phase not in [p for _, p in self.events]:
          if phase != "first evaluation" or "steps in" in line or "reusing" in line:
            self.events.append((time.monotonic(), phase))

  def poll(self) -> tuple[str, str | None]:
    """(phase, the step being written or None), after looking at the workdir."""
    if (
        not any(p == "warm start" for _, p in self.events)
        and (self.workdir / "warm_start").exists()
    ):
      self.events.append((time.monotonic(), "warm start"))
    writing = None
    for sub in ("checkpoints", "warm_start"):
      with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(self.workdir / sub):
          if _TMP_MARK in name:
            writing = f"{sub}/{name.split('.')[0]}"
            if f"{sub}/{name}" not in self.writes:
              self.writes.append(f"{sub}/{name}")
    phases = sorted(self.events)
    return (phases[-1][1] if phases else "start-up"), writing

  def began(self, phase: str) -> float | None:
    return next((t for t, p in self.events if p == phase), None)

  def wait(self, timeout: float = 900.0) -> int:
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    return rc

  def log(self) -> str:
    return "\n".join(self.lines)


def _child_env(scratch: pathlib.Path) -> dict[str, str]:
  # A persistent compilation cache keeps each trial to seconds; it changes no value. One given
  # in the environment is kept (several invocations can share it).
  return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(_REPO),
      PYTHONUNBUFFERED="1",
      JAX_COMPILATION_CACHE_DIR=os.environ.get(
          "JAX_COMPILATION_CACHE_DIR", str(scratch / "jax_cache")
      ),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _records(workdir: pathlib.Path) -> dict[int, dict]:
  """The last record of every step, timings removed."""
  from gmpo_jax.runner import rl_step

  return {
      r["step"]: {k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS}
      for r in metrics_lib.read_metrics(workdir)
  }


def _saved_steps(workdir: pathlib.Path) -> set[str]:
  return {
      f"{sub}/{p.name}"
      for sub in ("checkpoints", "warm_start")
      for p in (workdir / sub).glob("*")
      if p.name.isdigit()
  }


def _reference_timeline(
    scratch: pathlib.Path, env
) -> tuple[dict[int, dict], dict[str, float], int]:
  """An uninterrupted run: its records, how long each phase lasted, how many saves it made.

  Run twice, the first filling the compilation cache, so the phases last as in the trials.
  """
  for name in ("process_warmup", "process_reference"):
    child = _Child(scratch / name, env=env)
    while child.proc.poll() is None:
      child.poll()
      time.sleep(0.01)
    if child.wait():
      raise RuntimeError(f"the reference run failed:\n{child.log()[-3000:]}")
  times = [child.began(p) for p in ("warm start", "first evaluation", "RL steps", "done")]
  durations = {p: b - a for p, a, b in zip(PHASES, times, times[1:])}
  return _records(child.workdir), durations, len(child.writes)


def interruption_trial(
    scratch: pathlib.Path,
    env,
    name: str,
    signum: int,
    target: str,
    rng: np.random.Generator,
    durations: dict[str, float],
    saves: int,
    reference: dict[int, dict],
) -> dict:
  """Signals a run at a random moment of `target`, reruns it to the end, compares the metrics."""
  workdir = scratch / name
  child = _Child(workdir, env=env)
  if target == "checkpoint write":
    nth, delay = int(rng.integers(saves)), 0.0
  else:
    nth, delay = None, float(rng.uniform(0, durations[target]))
  phase, writing, sent, before = "start-up", None, None, set()
  while child.proc.poll() is None:
    phase, writing = child.poll()
    due = (
        (len(child.writes) > nth and writing is not None)
        if nth is not None
        else (child.began(target) is not None and time.monotonic() >= child.began(target) + delay)
    )
    if due:
      before = _saved_steps(workdir)
      sent = time.monotonic()
      os.kill(child.proc.pid, signum)
      break
    time.sleep(0.01)
  first_rc = child.wait()
  if sent is None:
    phase = "not sent (the run ended first)"
  exit_s = time.monotonic() - sent if sent else None
  saved = sorted(_saved_steps(workdir) - before)
  log = child.log()
  finished = max(_records(workdir), default=-1) == max(reference)
  rerun = _Child(workdir, env=env)
  rerun_rc = rerun.wait()
  equal = rerun_rc == 0 and _records(workdir) == reference
  trial = {
      "signal": signal.Signals(signum).name,
      "target": target,
      "phase": (f"checkpoint write ({writing})" if writing else phase) if sent else phase,
      "at_s": round(sent - child.start, 2) if sent else None,
      "rc": first_rc,
      "exit_s": exit_s,
      "saved": saved,
      "resumed": _resume_point(rerun.log()),
      "rerun_rc": rerun_rc,
      "finished": finished,
      "equal": equal,
      "event_loop": "Event loop is closed" in log + rerun.log(),
  }
  # A SIGTERM after the last step's stop check finds nothing in flight: the run just ends.
  if signum == signal.SIGKILL:
    ok = sent and equal
  else:
    ok = (
        sent
        and first_rc == 0
        and equal
        and ((saved and "preempt" in log) or (finished and "preempt" not in log))
    )
  trial["outcome"] = "recovered" if ok and not trial["event_loop"] else "FAILED"
  if trial["outcome"] != "recovered":
    trial["log"] = (log[-1500:], rerun.log()[-1500:])
  shutil.rmtree(workdir, ignore_errors=True)
  return trial


def _resume_point(log: str) -> str:
  """Where a rerun started, from its log: the warm start's and the RL loop's."""
  warm = re.search(r"warm start: (reusing|resuming at step (\d+))", log)
  rl = re.search(r"resuming from step (\d+)", log)
  return ", ".join(
      [
          "warm start "
          + ("redone" if not warm else "reused" if warm[1] == "reusing" else f"from {warm[2]}"),
          "RL from " + (f"step {rl[1]}" if rl else "scratch"),
      ]
  )


def interruption_trials(
    scratch: pathlib.Path, *, kills: int, sigterms: int, seed: int, jobs: int
) -> tuple[list[dict], dict[str, float]]:
  """`kills` kill -9 trials and `sigterms` SIGTERM trials per phase, `jobs` runs at a time."""
  env = _child_env(scratch)
  reference, durations, saves = _reference_timeline(scratch, env)
  rng = np.random.default_rng(seed)
  plan = [(f"kill-{i}", signal.SIGKILL, PHASES[i % len(PHASES)]) for i in range(kills)] + [
      (f"term-{p.replace(' ', '_')}-{i}", signal.SIGTERM, p)
      for p in PHASES
      for i in range(sigterms)
  ]
  seeds = rng.integers(2**31, size=len(plan))
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    trials = list(
        pool.map(
            lambda args: interruption_trial(
                scratch, env, *args[0], np.random.default_rng(args[1]), durations, saves, reference
            ),
            zip(plan, seeds),
        )
    )
  return trials, durations


def cli_error_trials(scratch: pathlib.Path):
  """Faults the command line must refuse with one line: yields (fault, rc, last line, outcome)."""
  env = _child_env(scratch)
  done = scratch / "cli_done"
  if _Child(done, env=env).wait():
    raise RuntimeError("the smoke run failed")

  def one_line_error(child: _Child) -> tuple[int, str, str]:
    rc = child.wait()
    last = child.lines[-1] if child.lines else ""
    clear = rc == 2 and last.startswith("error: ") and "Traceback" not in child.log()
    return rc, last, "clear error" if clear else "NO CLEAR ERROR"

  for name, extra in (
      (
          "another model (hidden_size 48) in the workdir",
          ("--config.model.overrides.hidden_size=48",),
      ),
      (
          "another model, resume_with_changes=True",
          ("--config.model.overrides.hidden_size=48", "--config.resume_with_changes=True"),
      ),
      ("another experiment (advantage grpo)", ("--config.algorithm.advantage=grpo",)),
  ):
    workdir = scratch / "cli_other"
    shutil.copytree(done, workdir)
    yield (name, *one_line_error(_Child(workdir, *extra, env=env)))
    shutil.rmtree(workdir)

  # Read-only: as root (whom modes do not bind) the run is `nobody`, through setpriv.
  as_root = os.geteuid() == 0
  if as_root and shutil.which("setpriv") is None:
    yield "read-only workdir", None, "", "not run (root without setpriv)"
    return
  home = pathlib.Path(tempfile.mkdtemp(prefix="read_only-", dir="/tmp"))
  os.chmod(home, 0o755)
  (home / "parent").mkdir()
  shutil.copytree(done, home / "finished")
  shutil.copytree(done, home / "checkpoints_read_only")
  shutil.copytree(done / "data", home / "fresh_data")
  prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") if as_root else ()
  if as_root:
    subprocess.run(["chown", "-R", "65534:65534", str(home)], check=True)
  cases = {
      "new workdir in a read-only directory": (home / "parent" / "run", [home / "parent"]),
      "finished workdir, all read-only (chmod -R a-w)": (home / "finished", None),
      "workdir with a read-only checkpoints/": (
          home / "checkpoints_read_only",
          [home / "checkpoints_read_only" / "checkpoints"],
      ),
  }
  child_env = dict(env, HOME=str(home), JAX_COMPILATION_CACHE_DIR=str(home / "jax_cache"))
  try:
    for name, (workdir, read_only) in cases.items():
      paths = read_only or [pathlib.Path(d) for d, _, _ in os.walk(workdir)]
      for path in paths:
        os.chmod(path, 0o555)
      yield (name, *one_line_error(_Child(workdir, env=child_env, prefix=prefix)))
      for path in paths:
        os.chmod(path, 0o755)
  finally:
    shutil.rmtree(home, ignore_errors=True)


def soak(scratch: pathlib.Path, steps: int) -> dict:
  """A `steps`-step smoke run: RSS at every status line, and `compiles/update` of every step."""
  env = _child_env(scratch)
  every = max(steps // 10, 1)
  child = _Child(
      scratch / "soak",
      f"--config.num_steps={steps}",
      f"--config.eval_every={every}",
      f"--config.checkpoint.every={every}",
      env=env,
  )
  rss, seen = [], 0
  while child.proc.poll() is None:
    status = [line for line in child.lines if "progress.py" in line and f"/{steps} " in line]
    if len(status) > seen:
      seen = len(status)
      step = int(status[-1].split("step ", 1)[1].split("/")[0])
      with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        kib = next(
            int(line.split()[1])
            for line in pathlib.Path(f"/proc/{child.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        rss.append((step, kib / 1024))
    time.sleep(0.05)
  rc = child.wait()
  records = _records(child.workdir)
  wall = time.monotonic() - child.start
  compiles = sorted({r["compiles/update"] for r in records.values() if "compiles/update" in r})
  seconds = [r["time/step"] for r in metrics_lib.read_metrics(child.workdir) if "time/step" in r]
  shutil.rmtree(child.workdir, ignore_errors=True)
  return {
      "rc": rc,
      "rss": rss,
      "compiles": compiles,
      "steps": max(records),
      "wall_s": wall,
      "s_per_step": float(np.median(seconds)),
  }


# -- report -----------------------------------------------------------------------------------

_HEADER = """\
# Checkpoint fault table

Generated by `experiments/fault_table.py`: `python -m experiments.fault_table --sections
checkpointer runner > docs/faults.md`, then `--sections signals`, `refused` and `long-run`
appended (`>>`) for the sections after "Through the runner", each with the arguments it names,
and the last two ("One run per workdir", "Command lines that cannot run") appended by
`python -m experiments.startup_faults`; every number below comes from those runs. The rules it checks are in the
`gmpo_jax/infra/checkpointing/` docstrings: every step holds an integrity manifest (size and SHA-256
of each file, shape and dtype of each array) written before Orbax commits the step; a restore
verifies the step against it, then compares the stored shapes with the model's, and only then
reads it through Orbax.

Each trial copies three saved steps (1, 2, 3; a `Linear(3, 4)` with its adamw state, saved with
`best_metric`), damages one file, opens a new `Checkpointer` and calls `restore_latest`.

* **latest**: the fault is in step 3, the newest. Expected: `recovered` = step 2 restored with
  exactly its arrays, key and metadata, a warning naming step 3, step 3 moved to `corrupted/`.
* **fallback**: step 3 is already bad (manifest deleted) and the fault is in step 2, the step the
  run falls back to. Expected: step 1 restored exactly, steps 2 and 3 moved.
* **only**: step 3 is the only step. Expected: `error` = an exception saying which file of which
  step failed and how, nothing restored, nothing moved.

Faults: `truncate` keeps the first half of the file; `garbage` complements 16 bytes at the start,
middle or end (3 trials per file); `bit flip` flips one bit of the first, middle or last byte (3
trials per file); `delete` removes the file.

Limits. Two files are written by Orbax at the commit itself, after the manifest:
`_CHECKPOINT_METADATA` (it gets the commit timestamp) and `commit_success.txt`. Their hashes join
the manifest when the save finishes (next `save`, `wait_until_finished`, `close`). A process
killed between the commit and that point leaves a step whose manifest lacks them ("unsealed"
below): the first is then only checked to be a JSON object and the second to exist, so a flip of
a digit inside the commit timestamp goes unnoticed there; nothing in either file is used to
restore (tests/infra/test_checkpointing.py checks that such a step still restores exactly). The last
sections run the real runner: damage to the step a run resumes from, kill -9 and SIGTERM in each
phase, workdirs it must refuse, and a long run's memory.
"""


def print_signal_section(args, scratch: pathlib.Path) -> int:
  """kill -9 and SIGTERM trials through the command line; returns the failures."""
  failures = 0
  started, load = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
  trials, durations = interruption_trials(
      scratch, kills=args.kills, sigterms=args.sigterms, seed=args.seed, jobs=args.jobs
  )
  print("\n## Interrupted runs: kill -9 and SIGTERM\n")
  print(
      f"`--sections signals --kills {args.kills} --sigterms {args.sigterms} --seed {args.seed} "
      f"--jobs {args.jobs}`, run {started}, {os.cpu_count()} CPUs, load average {load:.1f} at "
      f"the start and "
      f"{os.getloadavg()[0]:.1f} after the trials (other jobs share the machine: wall times "
      f"below are stretched by them).\n"
  )
  print(
      f"`python -m gmpo_jax.main --config=configs/smoke.py` in a child process (a persistent "
      f"compilation cache keeps each run to seconds; {args.jobs} trials at a time), sent the "
      f"signal at a random moment of the target phase (uniform over the phase's duration in an "
      f"uninterrupted run: warm start {durations['warm start']:.1f} s, first evaluation "
      f"{durations['first evaluation']:.1f} s, RL steps {durations['RL steps']:.1f} s), or, for "
      f"a checkpoint write, while a randomly chosen save of the run has its Orbax tmp directory "
      f"(warm-start saves included); then rerun with the same command to the end. The phase "
      f"column is where the run was when the signal was sent, as its log and workdir showed. "
      f"`recovered` = the rerun's metrics (every step, every key, timings aside) are identical to "
      f"the uninterrupted run's (exact equality), no `Event loop is closed`, and, for SIGTERM: "
      f"exit code 0 and a step saved after the signal (or the run had already logged its last "
      f"step).\n"
  )
  print(
      "| signal | target phase | trials | phase at the signal | exit code | saved after the signal "
      "| rerun identical | outcome |"
  )
  print("|---|---|---|---|---|---|---|---|")
  groups = collections.defaultdict(list)
  for trial in trials:
    groups[(trial["signal"], trial["target"])].append(trial)
  for (name, target), group in groups.items():
    phases = collections.Counter(t["phase"].split(" (")[0] for t in group)
    codes = collections.Counter(t["rc"] for t in group)
    saved = sum(bool(t["saved"]) for t in group)
    good = sum(t["outcome"] == "recovered" for t in group)
    failures += len(group) - good
    print(
        f"| {name} | {target} | {len(group)} | "
        + ", ".join(f"{p} {n}" for p, n in phases.most_common())
        + " | "
        + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
        + f" | {saved}/{len(group)} | "
        + f"{sum(t['equal'] for t in group)}/{len(group)} | recovered {good}/{len(group)}"
        + (f", **FAILED {len(group) - good}**" if good < len(group) else "")
        + " |"
    )
  kills = [t for t in trials if t["signal"] == "SIGKILL"]
  terms = [t for t in trials if t["signal"] == "SIGTERM"]
  exits = [t["exit_s"] for t in terms if t["rc"] == 0 and t["exit_s"] is not None]
  print(
      f"\n{len(kills)} kill -9 and {len(terms)} SIGTERM trials; "
      f"{sum(t['outcome'] == 'recovered' for t in trials)} recovered. SIGTERM to exit: median "
      f"{np.median(exits):.1f} s, max {max(exits):.1f} s (the step in flight finishes first).\n"
  )
  print(
      "| trial | signal | target | phase at the signal | sent at (s) | exit code | saved | rerun "
      "started | identical | outcome |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for i, t in enumerate(trials, 1):
    print(
        f"| {i} | {t['signal']} | {t['target']} | {t['phase']} | {t['at_s']} | {t['rc']} | "
        f"{', '.join(t['saved']) or '-'} | {t['resumed']} | {t['equal']} | {t['outcome']} |"
    )
  for t in trials:
    if t["outcome"] != "recovered":
      print(
          f"\n<details><summary>{t['signal']} {t['phase']}</summary>\n\n```\n{t['log'][0]}\n"
          f"--- rerun ---\n{t['log'][1]}\n```\n</details>"
      )

  return failures


def print_refused_section(scratch: pathlib.Path) -> int:
  """Workdirs the command line must refuse with one line; returns the failures."""
  failures = 0
  print("\n## Refused workdirs\n")
  print(
      "The same command on a finished smoke workdir changed as named (the read-only cases run "
      "as `nobody` when the table is made as root, whom file modes do not bind). Expected: exit "
      "code 2 and one line naming the problem, no traceback, nothing written.\n"
  )
  print("| fault | exit code | the line printed | outcome |")
  print("|---|---|---|---|")
  for name, rc, line, outcome in cli_error_trials(scratch):
    if outcome != "clear error":
      failures += 1
    line = re.sub(r"/tmp/(fault_table|read_only)-[^/ ]+", "…", line).replace("|", "/")
    print(f"| {name} | {rc} | `{line}` | {outcome} |")

  return failures


def print_long_run_section(args, scratch: pathlib.Path) -> int:
  """A long smoke run's memory and compile count; returns 1 if it failed."""
  failures, load = 0, os.getloadavg()[0]
  result = soak(scratch, args.soak_steps)
  rss = result["rss"]
  print(f"\n## A {args.soak_steps:,}-step run\n")
  print(
      f"`configs/smoke.py` with `--config.num_steps={args.soak_steps} "
      f"--config.eval_every={max(args.soak_steps // 10, 1)} "
      f"--config.checkpoint.every={max(args.soak_steps // 10, 1)}`, resident set size (VmRSS) "
      f"read at each status line; run {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
      f"load average {load:.1f} at the start. Exit code {result['rc']}, {result['steps']} steps in "
      f"{result['wall_s']:.0f} s ({result['s_per_step']:.3f} s/step median), `compiles/update` "
      f"over all steps: {result['compiles']}.\n"
  )
  print("| step | " + " | ".join(str(step) for step, _ in rss) + " |")
  print("|---|" + "---|" * len(rss))
  print("| RSS (MiB) | " + " | ".join(f"{mib:.0f}" for _, mib in rss) + " |")
  steps, mib = np.array([s for s, _ in rss], float), np.array([m for _, m in rss])
  slope = np.polyfit(steps, mib, 1)[0] * 1000 if len(rss) > 1 else float("nan")
  print(
      f"\nStart (step {int(steps[0])}) {mib[0]:.0f} MiB, end (step {int(steps[-1])}) "
      f"{mib[-1]:.0f} MiB, max {mib.max():.0f} MiB; least-squares slope {slope:+.1f} MiB per "
      f"1,000 steps; load average {os.getloadavg()[0]:.1f} at the end."
  )
  if result["rc"] != 0 or result["compiles"] != [1]:
    failures += 1
  return failures


def _cell(counts: collections.Counter, position: str) -> str:
  outcomes = {o: n for (p, o), n in counts.items() if p == position}
  total = sum(outcomes.values())
  if not total:
    return "-"
  expected = "error" if position == "only" else "recovered"
  good = outcomes.pop(expected, 0)
  text = f"{expected} {good}/{total}"
  return text + "".join(f", **{o} {n}**" for o, n in sorted(outcomes.items()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--sections",
      nargs="+",
      default=["checkpointer"],
      choices=["checkpointer", "runner", "signals", "refused", "long-run"],
      help="checkpointer: damage saved steps of a tiny model; runner: damage the step a real run "
      "resumes from; through gmpo_jax.main in child processes: signals (kill -9 / SIGTERM "
      "in each phase), refused (workdirs the runner must refuse), long-run (memory)",
  )
  parser.add_argument("--kills", type=int, default=24, help="kill -9 trials, spread over phases")
  parser.add_argument("--sigterms", type=int, default=5, help="SIGTERM trials per phase")
  parser.add_argument("--soak-steps", type=int, default=1000, help="steps of the long run")
  parser.add_argument("--jobs", type=int, default=2, help="trials run at a time")
  parser.add_argument("--seed", type=int, default=0, help="seeds the signal times")
  args = parser.parse_args(argv)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="fault_table-"))
  failures = 0
  try:
    if "checkpointer" in args.sections:
      pristine = {}
      for steps in ((1, 2, 3), (3,)):
        pristine[steps] = scratch / ("pristine_" + "_".join(map(str, steps)))
        save_steps(pristine[steps], steps)

      table = collections.defaultdict(collections.Counter)
      by_fault = collections.defaultdict(collections.Counter)
      examples = []
      for kind, fault, position, name, outcome in corruption_trials(pristine, scratch):
        family = fault.split("@")[0].replace("_", " ")
        table[(kind, family)][(position, outcome)] += 1
        by_fault[family][(position, outcome)] += 1
        expected = "error" if position == "only" else "recovered"
        if outcome != expected:
          failures += 1
          examples.append(f"- {position} {fault} {name}: {outcome}")
      print(_HEADER)
      total_trials = sum(sum(c.values()) for c in table.values())
      print("## Summary\n")
      print("| fault | trials | latest | fallback | only |")
      print("|---|---|---|---|---|")
      for family, counts in by_fault.items():
        print(
            f"| {family} | {sum(counts.values())} | "
            + " | ".join(_cell(counts, p) for p in POSITIONS)
            + " |"
        )
      print(
          f"\n{total_trials} byte-damage trials over {len(table) // len(by_fault)} file types; "
          f"{failures} neither recovered nor a clear error.\n"
      )
      print("\n".join(examples))
      print("## Byte damage by file type\n")
      print("| file type | fault | trials | latest | fallback | only |")
      print("|---|---|---|---|---|---|")
      for (kind, family), counts in sorted(table.items()):
        print(
            f"| {kind} | {family} | {sum(counts.values())} | "
            + " | ".join(_cell(counts, p) for p in POSITIONS)
            + " |"
        )

      print("\n## Other faults\n")
      print("| fault | position | outcome |")
      print("|---|---|---|")
      for name, position, outcome in list(special_trials(pristine, scratch)) + list(
          unreadable_trials(pristine, scratch)
      ):
        if not (outcome in ("recovered", "error") or outcome.startswith("skipped")):
          failures += 1
        print(f"| {name} | {position} | {outcome} |")

    if "runner" in args.sections:
      print("\n## Through the runner\n")
      print(
          "`configs/smoke.py` stopped by SIGTERM after step 3, then one file of step 3 (the step "
          "the rerun resumes from) damaged, then rerun to the end; `recovered` = it resumed "
          "from step 2, moved step 3 aside, and every logged metric (timings aside) equals an "
          "uninterrupted run's to rtol 1e-6.\n"
      )
      print("| file type | fault | outcome |")
      print("|---|---|---|")
      rows = []
      with contextlib.redirect_stdout(io.StringIO()):  # the runner prints its summary
        rows = list(runner_trials(scratch))
      for kind, fault, outcome in rows:
        if not outcome.startswith("recovered"):
          failures += 1
        print(f"| {kind} | {fault} | {outcome} |")
    if "signals" in args.sections:
      failures += print_signal_section(args, scratch)
    if "refused" in args.sections:
      failures += print_refused_section(scratch)
    if "long-run" in args.sections:
      failures += print_long_run_section(args, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"\nFailures (neither recovered nor a clear error): {failures}.")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
