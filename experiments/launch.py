"""Ablation launcher: a base config x a grid of overrides x seeds, one runner process per run.

    python experiments/launch.py --config=configs/default.py --out=results/ablation \\
        --grid advantage=grpo,gmpo --grid objective=token_clip,geometric --seeds=3 --parallel=1
    python experiments/launch.py --config=configs/ablation_gmpo.py --grid-preset=gmpo_design \\
        --seeds=3 --out=results/gmpo_design
    python experiments/launch.py --aggregate-only --out=results/ablation

Grid: each `--grid KEY=V1,V2,...` is one axis and the points are the Cartesian product of the
axes (a `--grid-preset NAME` is one more axis, of named points: the config module's
`get_grid(NAME)`, a mapping point name -> {key: value}). `--set KEY=VALUE` applies to every
run. KEY is a config path (`algorithm.advantage`, with or without a leading `config.`) or an
alias of `ALIASES` (`advantage`, `objective`, `epsilon` = both clip bounds, ...). Values are
passed to the runner verbatim as `--config.KEY=VALUE` flags and parsed there by the field's
type (ml_collections); commas inside brackets or quotes do not split a value, so a whole dict
can be a value: `--grid "algorithm.objective_kwargs={'epsilon_low': 0.2},{'epsilon_low': 0.4}"`.

Each point x seed runs `python -m gmpo_jax.main --config=... --workdir=OUT/runs/POINT/seed_S
--config.KEY=VALUE ... --config.seed=S` (`--runner` replaces the command before the flags),
with its output in `launch.log` of the workdir. Before anything runs, every run's config is
resolved in-process with the runner's own flag parser (a misspelt key or a value of the
wrong type fails here, not after an hour) and its algorithm section is validated; the
resolved config goes to `launch.json` in the workdir.

Shared warm starts (`--shared-warm-start`): the supervised warm start of each seed runs once,
before any point of that seed (they start first; a seed's points start as soon as its own warm
start has finished), in OUT/warm_starts/seed_S (the base config with the `--set` overrides, `gmpo_jax.main
--warm_start_only`), and every point of that seed starts from it
(`--config.warm_start.init_from=OUT/warm_starts/seed_S`): the points of a seed then share their
starting policy without recomputing it, and a point that changes the task or the model is
refused by the runner. The points of a seed whose warm start failed are not run.

Restarts: a run whose summary.json says it reached its last step is skipped; any other is
started again and the runner resumes it from its checkpoint. A workdir whose launch.json
holds a different config is an error (use another --out). A failed run is reported with its
log and the others go on; the exit status is 1 if any run failed. Ctrl-C (or SIGTERM) stops
the runs with SIGTERM: the runner saves a checkpoint and exits, and the next launch resumes.

Afterwards the finished runs are aggregated (`experiments.aggregate`) into OUT/table.md,
table.csv, runs.csv, curves.png and final_bars.png. Runs of one grid share OUT/xla_cache,
a persistent XLA compilation cache (same programs, same results, no recompiles).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, TextIO

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
  # Run as a script: `experiments` and the `configs` package live in the repository root.
  sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=wrong-import-position
import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import aggregate as aggregate_lib
from gmpo_jax.config import ExperimentConfig
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.runner.loop import WARM_START_SUMMARY

# pylint: enable=wrong-import-position

# Short names for the fields an ablation varies most; one alias may set several fields.
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "advantage": ("algorithm.advantage",),
        "objective": ("algorithm.objective",),
        "epsilon": (
            "algorithm.objective_kwargs.epsilon_low",
            "algorithm.objective_kwargs.epsilon_high",
        ),
        "epsilon_low": ("algorithm.objective_kwargs.epsilon_low",),
        "epsilon_high": ("algorithm.objective_kwargs.epsilon_high",),
        "clip_mode": ("algorithm.objective_kwargs.clip_mode",),
        "loss_agg_mode": ("algorithm.loss_agg_mode",),
        "num_generations": ("algorithm.num_generations",),
        "num_epochs": ("algorithm.num_epochs",),
        "beta": ("algorithm.beta",),
        "lr": ("optim.learning_rate",),
        "steps": ("num_steps",),
    }
)

RUNS_DIR = "runs"
MANIFEST = "launch.json"  # in OUT: the points and runs launched there
WARM_STARTS_DIR = "warm_starts"  # in OUT: seed_S, the shared warm start of seed S
RUN_FILE = "launch.json"  # in a workdir: the run's overrides and resolved config
LOG_FILE = "launch.log"
XLA_CACHE = "xla_cache"
DEFAULT_RUNNER = (sys.executable, "-m", "gmpo_jax.main")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SAFE_RE = re.compile(r"[A-Za-z0-9._+-]{1,40}")
_POINT_NAME_RE = re.compile(r"[A-Za-z0-9_+=,-][A-Za-z0-9._+=,-]{0,199}")
_NOT_GIVEN = object()


# ---------------------------------------------------------------------------------------------
# Overrides and grid points
# ---------------------------------------------------------------------------------------------


class Override(NamedTuple):
  """One `--config.PATH=TEXT` flag; `expected` is the Python value it must parse to (a
  preset's value), or `_NOT_GIVEN` for text from the command line (the field's type decides)."""

  path: str
  text: str
  expected: Any = _NOT_GIVEN

  def flag(self) -> str:
    return f"--config.{self.path}={self.text}"


def expand_key(key: str) -> tuple[str, ...]:
  """An alias or a config path (optionally prefixed `config.`) -> the config paths it sets."""
  key = key.strip().removeprefix("config.")
  if key in ALIASES:
    return ALIASES[key]
  if not _KEY_RE.fullmatch(key):
    raise ValueError(
        f"{key!r} is neither a config path (a.b.c) nor an alias in " f"{sorted(ALIASES)}"
    )
  if key == "seed":
    raise ValueError("seeds come from --seeds / --first-seed, not from an override")
  return (key,)


def split_values(text: str) -> list[str]:
  """Splits 'a,b,{...},(1, 2)' at the commas outside brackets and quotes."""
  values, depth, quote, start = [], 0, None, 0
  for i, char in enumerate(text):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced {char!r} in {text!r}")
    elif char == "," and depth == 0:
      values.append(text[start:i])
      start = i + 1
  if depth or quote:
    raise ValueError(f"unclosed bracket or quote in {text!r}")
  values.append(text[start:])
  return [v.strip() for v in values]


def parse_assignment(text: str) -> tuple[str, str]:
  """'KEY=VALUE' -> (KEY, VALUE); VALUE may contain '='."""
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"expected KEY=VALUE, got {text!r}")
  return key.strip(), value.strip()


def flag_text(value: Any) -> str:
  """A Python value as the runner's flag parser reads it back (str fields take text as is)."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def safe_label(value: str) -> str:
  """A stable, filesystem-safe label for a value: itself when short and plain, else a cleaned
  prefix plus 8 hex digits of its SHA-1 (so different values never share a label)."""
  if _SAFE_RE.fullmatch(value) and not value.startswith("."):
    return value
  cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-.")[:24]
  digest = hashlib.sha1(value.encode()).hexdigest()[:8]
  return f"{cleaned}-{digest}" if cleaned else digest


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: a name (its directory under OUT/runs) and the overrides it applies."""

  name: str
  overrides: tuple[Override, ...]

  def override_texts(self) -> list[str]:
    return [f"{o.path}={o.text}" for o in self.overrides]


# An axis of the grid: (label, overrides) per value.
Axis = list[tuple[str, tuple[Override, ...]]]


def grid_axes(specs: Sequence[str]) -> list[Axis]:
  """`--grid` arguments 'KEY=V1,V2' -> axes labelled 'KEY=V' (KEY shortened to its last part
  unless two axes would then share a label)."""
  parsed = []
  for spec in specs:
    key, values = parse_assignment(spec)
    paths = expand_key(key)
    values = split_values(values)
    if len(set(values)) != len(values):
      raise ValueError(f"--grid {spec!r} repeats a value")
    parsed.append((key.removeprefix("config."), paths, values))
  shorts = [key.rsplit(".", 1)[-1] for key, _, _ in parsed]
  axes = []
  for (key, paths, values), short in zip(parsed, shorts):
    label = short if shorts.count(short) == 1 else key
    axes.append(
        [(f"{label}={safe_label(v)}", tuple(Override(p, v) for p in paths)) for v in values]
    )
  return axes


def preset_axis(
    points: Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping[str, Any]]],
) -> Axis:
  """A config module's `get_grid(name)` result (point name -> {key: value}, or a sequence of
  (name, {key: value}) pairs) -> one axis of named points."""
  items = list(points.items()) if isinstance(points, Mapping) else list(points)
  if not items:
    raise ValueError("the grid preset has no points")
  axis = []
  for name, overrides in items:
    if not _POINT_NAME_RE.fullmatch(name):
      raise ValueError(
          f"preset point name {name!r} is not filesystem-safe "
          "(letters, digits, '._+=,-'; not starting with '.')"
      )
    axis.append(
        (
            name,
            tuple(
                Override(path, flag_text(value), value)
                for key, value in overrides.items()
                for path in expand_key(key)
            ),
        )
    )
  return axis


def make_points(axes: Sequence[Axis], fixed: Sequence[Override] = ()) -> list[Point]:
  """The Cartesian product of `axes`, each point also applying `fixed` (`--set`).

  A config path set twice for one point is an error. Overrides are ordered parents first, as
  the runner's flag parser requires (`a.b={...}` before `a.b.c=1`).

  Raises:
    ValueError: a path set twice, or two points with the same name.
  """
  points = []
  for combination in itertools.product(*axes):
    overrides = list(fixed) + [o for _, group in combination for o in group]
    paths = [o.path for o in overrides]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    name = ",".join(label for label, _ in combination) or "base"
    if twice:
      raise ValueError(f"point {name!r} sets {twice} more than once")
    overrides.sort(key=lambda o: o.path.count("."))
    points.append(Point(name, tuple(overrides)))
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"two grid points share a name: {sorted(names)}")
  return points


def load_preset(config: str, name: str) -> Mapping[str, Mapping[str, Any]]:
  """`get_grid(name)` of the config module at `config` ('path.py' or 'path.py:arg')."""
  path = config.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location(f"_grid_module_{name}", path)
  if spec is None:
    raise ValueError(f"cannot load {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_grid"):
    raise ValueError(f"{path} defines no get_grid(name) for --grid-preset")
  return module.get_grid(name)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: a point at a seed, in its own workdir; or, with `warm_start_only`, the shared
  warm start of a seed."""

  point: Point
  seed: int
  config: str  # the --config value: an absolute path, optionally ':arg'
  workdir: pathlib.Path
  init_from: pathlib.Path | None = None  # the seed's shared warm start
  warm_start_only: bool = False

  @property
  def overrides(self) -> tuple[Override, ...]:
    shared = (
        ()
        if self.init_from is None
        else (Override("warm_start.init_from", str(self.init_from), str(self.init_from)),)
    )
    return self.point.overrides + shared + (Override("seed", str(self.seed), self.seed),)

  def config_args(self) -> list[str]:
    """The flags the config is resolved from."""
    return [
        f"--config={self.config}",
        f"--workdir={self.workdir}",
        *(o.flag() for o in self.overrides),
    ]

  def args(self) -> list[str]:
    """The runner's flags (after the runner command)."""
    return self.config_args() + (["--warm_start_only"] if self.warm_start_only else [])

  @property
  def label(self) -> str:
    return f"{self.point.name} seed {self.seed}"

  def finished(self) -> bool:
    if self.warm_start_only:
      return (self.workdir / WARM_START_SUMMARY).exists()
    return is_finished(self.workdir)


def resolve_config(spec: RunSpec) -> ml_collections.ConfigDict:
  """The config the runner will see: the runner's own flag parser on the run's flags.

  Raises:
    ValueError: an unknown key, a value of the wrong type, a preset value that does not parse
      back to itself, or an invalid value in any section (`ExperimentConfig`, the runner's own
      check), so a bad grid point fails before any run starts.
  """
  argv = ["runner", *spec.config_args()]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "the run's directory", flag_values=flag_values)
  try:
    flag_values(argv)
    config = holder.value
    for override in spec.overrides:
      if override.expected is not _NOT_GIVEN:
        got = config_path_value(config, override.path)
        if got != override.expected:
          raise ValueError(f"{override.flag()} parses to {got!r}, not {override.expected!r}")
    ExperimentConfig.from_config(config)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as error:
    raise ValueError(f"{spec.label}: {error}") from error
  return config


def config_path_value(config: ml_collections.ConfigDict, path: str) -> Any:
  value = config
  for part in path.split("."):
    value = value[part]
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def run_identity(spec: RunSpec, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What makes a run itself: its point, seed, overrides and the resolved config (paths of
  the config file and workdir aside, so a results folder can move)."""
  return {
      "point": spec.point.name,
      "seed": spec.seed,
      "overrides": [f"{o.path}={o.text}" for o in spec.overrides],
      "config": json.loads(config.to_json_best_effort(sort_keys=True)),
  }


def is_finished(workdir: pathlib.Path) -> bool:
  """summary.json exists and says the run reached its last step (an interrupted or crashed
  run also writes one, with an earlier last step)."""
  path = workdir / metrics_lib.SUMMARY_FILE
  if not path.exists():
    return False
  summary = json.loads(path.read_text())
  return summary.get("last_step") is not None and summary["last_step"] >= summary["total_steps"]


class RunResult(NamedTuple):
  spec: RunSpec
  status: str  # 'finished' | 'failed' | 'stopped' | 'not run' (its warm start did not finish)
  returncode: int | None
  seconds: float
  log: pathlib.Path


def _failure(result: RunResult) -> str:
  if result.returncode is None:
    return "could not start"
  if result.returncode == 0:
    return "exit code 0 before its last step: stopped from outside?"
  return f"exit code {result.returncode}"


def _tail(path: pathlib.Path, lines: int = 8) -> str:
  text = path.read_text(errors="replace").splitlines()[-lines:]
  return "\n".join("    | " + line for line in text)


class _Launcher:
  """Runs specs through the runner command, `parallel` at a time, and stops them on request."""

  def __init__(
      self, runner: Sequence[str], *, parallel: int, env: Mapping[str, str], stream: TextIO
  ):
    self._runner = list(runner)
    self._parallel = parallel
    self._env = dict(env)
    self._stream = stream
    self._lock = threading.Lock()
    self._processes: dict[int, subprocess.Popen] = {}
    self._stopping = threading.Event()

  def _print(self, text: str) -> None:
    with self._lock:
      print(text, file=self._stream, flush=True)

  def _run(self, spec: RunSpec, after: concurrent.futures.Future | None = None) -> RunResult:
    log = spec.workdir / LOG_FILE
    # `after` was submitted earlier, so it has a worker of its own: waiting cannot deadlock.
    if after is not None and after.result().status != "finished":
      return RunResult(spec, "not run", None, 0.0, log)
    if self._stopping.is_set():
      return RunResult(spec, "stopped", None, 0.0, log)
    command = self._runner + spec.args()
    start = time.monotonic()
    with log.open("a") as file:
      file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
      file.flush()
      try:
        # Own session: a Ctrl-C in the terminal reaches the launcher only, which then stops
        # each run with SIGTERM (the runner checkpoints and exits).
        process = subprocess.Popen(
            command, stdout=file, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
        )
      except OSError as error:  # e.g. a --runner that does not exist
        file.write(f"cannot start the runner: {error}\n")
        return RunResult(spec, "failed", None, 0.0, log)
      with self._lock:
        self._processes[process.pid] = process
      if self._stopping.is_set():
        process.terminate()
      returncode = process.wait()
      with self._lock:
        del self._processes[process.pid]
    seconds = time.monotonic() - start
    if returncode == 0 and spec.finished():
      status = "finished"
    else:
      status = "stopped" if self._stopping.is_set() else "failed"
    return RunResult(spec, status, returncode, seconds, log)

  def stop(self, sig: int) -> None:
    self._stopping.set()
    with self._lock:
      for process in self._processes.values():
        process.send_signal(sig)

  def run_all(
      self, specs: Sequence[RunSpec], warm_starts: Sequence[RunSpec] = ()
  ) -> list[RunResult]:
    """Runs `warm_starts` first, then `specs`, each of which waits for its seed's warm start
    (if among `warm_starts`) and is not run if that one does not finish."""
    results = []
    with concurrent.futures.ThreadPoolExecutor(self._parallel) as pool:
      before = {spec.seed: pool.submit(self._run, spec) for spec in warm_starts}
      futures = list(before.values()) + [
          pool.submit(self._run, spec, before.get(spec.seed)) for spec in specs
      ]
      pending = set(futures)
      while pending:
        try:
          done, pending = concurrent.futures.wait(
              pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
          )
        except KeyboardInterrupt:
          if self._stopping.is_set():
            self._print("second interrupt: killing the runs")
            self.stop(signal.SIGKILL)
          else:
            self._print("interrupted: stopping the runs (they checkpoint; relaunch to resume)")
            self.stop(signal.SIGTERM)
          continue
        for future in done:
          result = future.result()
          results.append(result)
          if result.status == "finished":
            self._print(
                f"[{len(results)}/{len(futures)}] finished {result.spec.label} "
                f"in {result.seconds:.0f} s"
            )
          elif result.status == "failed":
            self._print(
                f"[{len(results)}/{len(futures)}] FAILED {result.spec.label} "
                f"({_failure(result)}); log: {result.log}\n{_tail(result.log)}"
            )
          elif result.status == "not run":
            self._print(
                f"[{len(results)}/{len(futures)}] not run: {result.spec.label} (its "
                "warm start did not finish)"
            )
    return results


def plan_runs(
    points: Sequence[Point],
    seeds: Sequence[int],
    *,
    config: str,
    out: pathlib.Path,
    shared_warm_start: bool = False,
    by_seed: bool = False,
) -> list[RunSpec]:
  """The runs in the order they start: every seed of a point, point after point; `by_seed`:
  every point of a seed, seed after seed (a grid cut short then still holds paired seeds)."""
  pairs = (
      [(p, s) for s in seeds for p in points]
      if by_seed
      else [(p, s) for p in points for s in seeds]
  )
  return [
      RunSpec(
          point,
          seed,
          config,
          out / RUNS_DIR / point.name / f"seed_{seed}",
          init_from=warm_start_dir(out, seed) if shared_warm_start else None,
      )
      for point, seed in pairs
  ]


def select_points(points: Sequence[Point], names: Sequence[str]) -> list[Point]:
  """The points named, in the order named (ValueError for a name the grid lacks)."""
  by_name = {p.name: p for p in points}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"--points {unknown} not in the grid; its points: {list(by_name)}")
  return [by_name[n] for n in names]


def warm_start_dir(out: pathlib.Path, seed: int) -> pathlib.Path:
  return out / WARM_STARTS_DIR / f"seed_{seed}"


def plan_warm_starts(
    seeds: Sequence[int], fixed: Sequence[Override], *, config: str, out: pathlib.Path
) -> list[RunSpec]:
  """One warm-start-only run per seed: the base config with the `--set` overrides."""
  point = Point("warm_start", tuple(sorted(fixed, key=lambda o: o.path.count("."))))
  return [
      RunSpec(point, seed, config, warm_start_dir(out, seed), warm_start_only=True)
      for seed in seeds
  ]


def prepare(specs: Sequence[RunSpec]) -> None:
  """Resolves every run's config and writes (or checks) its workdir's launch.json.

  Raises:
    ValueError: listing every run whose config does not resolve or differs from the one its
      workdir already holds; nothing is written unless all runs are fine.
  """
  identities, errors = [], []
  for spec in specs:
    try:
      identities.append(run_identity(spec, resolve_config(spec)))
    except ValueError as error:
      errors.append(str(error))
      continue
    path = spec.workdir / RUN_FILE
    if path.exists() and json.loads(path.read_text()) != identities[-1]:
      errors.append(
          f"{spec.label}: {spec.workdir} holds a run with other overrides or another "
          f"config (see {path}); launch into another --out"
      )
  if errors:
    raise ValueError("\n".join(errors))
  for spec, identity in zip(specs, identities):
    spec.workdir.mkdir(parents=True, exist_ok=True)
    (spec.workdir / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def update_manifest(out: pathlib.Path, config: str, specs: Sequence[RunSpec]) -> dict[str, Any]:
  """Adds these points and runs to OUT/launch.json (earlier launches into OUT are kept)."""
  path = out / MANIFEST
  manifest = json.loads(path.read_text()) if path.exists() else {"points": [], "runs": []}
  points = {p["name"]: p for p in manifest["points"]}
  for spec in specs:
    entry = points.setdefault(
        spec.point.name,
        {"name": spec.point.name, "config": config, "overrides": spec.point.override_texts()},
    )
    if entry["overrides"] != spec.point.override_texts():
      raise ValueError(
          f"{path} has a point {spec.point.name!r} with other overrides: " f"{entry['overrides']}"
      )
  runs = {(r["point"], r["seed"]): r for r in manifest["runs"]}
  for spec in specs:
    runs.setdefault(
        (spec.point.name, spec.seed),
        {
            "point": spec.point.name,
            "seed": spec.seed,
            "workdir": str(spec.workdir.relative_to(out)),
        },
    )
  manifest = {"points": list(points.values()), "runs": list(runs.values())}
  out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def aggregate_out(
    out: pathlib.Path,
    *,
    metrics: Sequence[aggregate_lib.MetricSpec],
    curves: Sequence[aggregate_lib.MetricSpec] | None,
    stream: TextIO,
    points: Sequence[str] | None = None,
    until_step: int | None = None,
) -> dict[str, pathlib.Path] | None:
  """Aggregates the finished runs listed in OUT/launch.json into OUT; None if none has finished.

  `points`: only these, in this order (the first is the one the others are paired with).
  `until_step`: every run that has evaluated at that step, finished or not, up to that step,
  into OUT/at_step_<S>.
  """
  path = out / MANIFEST
  if not path.exists():
    raise ValueError(f"{path} not found: nothing was launched into {out}")
  manifest = json.loads(path.read_text())
  if points is not None:
    by_name = {p["name"]: p for p in manifest["points"]}
    unknown = [n for n in points if n not in by_name]
    if unknown:
      raise ValueError(f"--points {unknown} were not launched into {out}")
    manifest = {
        "points": [by_name[n] for n in points],
        "runs": [r for r in manifest["runs"] if r["point"] in points],
    }

  def done(run: Mapping[str, Any]) -> bool:
    workdir = out / run["workdir"]
    if until_step is None:
      return is_finished(workdir)
    return (workdir / aggregate_lib.EVAL_RESULTS_DIR / f"step_{until_step:06d}.jsonl").exists()

  finished, missing = [], []
  for run in manifest["runs"]:
    (finished if done(run) else missing).append(run)
  if missing:
    print(
        f"{'not finished' if until_step is None else f'not at step {until_step}'}, left out "
        f"of the table: {', '.join(r['workdir'] for r in missing)}",
        file=stream,
    )
  if not finished:
    print("no finished run to aggregate", file=stream)
    return None
  points = [p["name"] for p in manifest["points"]]
  notes = sorted({f"base config: `{p['config']}`" for p in manifest["points"]})
  notes.append(
      f"runs finished: {len(finished)} of {len(manifest['runs'])}"
      if until_step is None
      else f"runs up to step {until_step} (the evaluation there is the final value): "
      f"{len(finished)} of {len(manifest['runs'])}"
  )
  files = aggregate_lib.aggregate(
      out if until_step is None else out / f"at_step_{until_step}",
      aggregate_lib.load_runs(
          ((r["point"], r["seed"], out / r["workdir"]) for r in finished), until_step=until_step
      ),
      points=points,
      metrics=metrics,
      curves=curves,
      notes=notes,
      point_overrides={p["name"]: p["overrides"] for p in manifest["points"]},
      expected_runs={p: sum(r["point"] == p for r in manifest["runs"]) for p in points},
  )
  print(f"wrote {', '.join(str(f) for f in files.values())}", file=stream)
  return files


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _metric_list(text: str) -> list[aggregate_lib.MetricSpec]:
  return [aggregate_lib.MetricSpec.parse(m) for m in split_values(text) if m]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch.py",
      description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="aliases: " + ", ".join(f"{k} -> {'+'.join(v)}" for k, v in ALIASES.items()),
  )
  parser.add_argument("--config", help="base config file (configs/*.py[:arg])")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="results folder")
  parser.add_argument(
      "--grid",
      action="append",
      default=[],
      metavar="KEY=V1,V2",
      help="one grid axis (repeat for a Cartesian product)",
  )
  parser.add_argument(
      "--grid-preset", metavar="NAME", help="named points from the config module's get_grid(NAME)"
  )
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      dest="fixed",
      help="an override for every run",
  )
  parser.add_argument("--seeds", type=int, default=1, help="seeds per point (default 1)")
  parser.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+N-1")
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
  parser.add_argument(
      "--points",
      type=split_values,
      default=None,
      metavar="NAME,...",
      help="run only these points of the grid, in this order (the first is "
      "the one the others are paired with)",
  )
  parser.add_argument(
      "--by-seed",
      action="store_true",
      help="start the runs seed after seed (all points of a seed, then the "
      "next), not point after point",
  )
  parser.add_argument(
      "--shared-warm-start",
      action="store_true",
      help=f"run each seed's warm start once (OUT/{WARM_STARTS_DIR}/seed_S), "
      "first, and start every point of the seed from it",
  )
  parser.add_argument(
      "--runner",
      default=shlex.join(DEFAULT_RUNNER),
      help="command that gets --config/--workdir/--config.* flags "
      "(default: this Python -m gmpo_jax.main)",
  )
  parser.add_argument(
      "--xla-cache",
      default=None,
      metavar="DIR",
      help="persistent XLA compilation cache of the runs (default: "
      f"$JAX_COMPILATION_CACHE_DIR, else OUT/{XLA_CACHE}; '' disables)",
  )
  parser.add_argument(
      "--dry-run",
      action="store_true",
      help="resolve and list the runs and their commands; run nothing",
  )
  parser.add_argument(
      "--aggregate-only", action="store_true", help="only rebuild the tables and plots from OUT"
  )
  parser.add_argument("--no-aggregate", action="store_true", help="run, but do not aggregate")
  parser.add_argument(
      "--until-step",
      type=int,
      default=None,
      metavar="S",
      help="with --aggregate-only: every run that has evaluated at step S, "
      "finished or not, up to S, into OUT/at_step_S",
  )
  parser.add_argument(
      "--metrics",
      type=_metric_list,
      default=list(aggregate_lib.DEFAULT_METRICS),
      metavar="NAME[:max|min],...",
      help="metrics of the tables and bars, each with the extreme over the "
      "RL steps to report (default: "
      + ", ".join(f"{m.name}:{m.mode}" for m in aggregate_lib.DEFAULT_METRICS)
      + ")",
  )
  parser.add_argument(
      "--curves",
      type=_metric_list,
      default=None,
      metavar="NAME,...",
      help="metrics of the learning curves (default: --metrics)",
  )
  return parser


def _runner_env(out: pathlib.Path, xla_cache: str | None) -> dict[str, str]:
  env = dict(os.environ)
  # Config modules import `configs.*`, which lives in the repository root.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
  if xla_cache is None:  # the default gives way to a cache the environment already names
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / XLA_CACHE))
  elif xla_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(xla_cache).resolve())
  else:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def main(argv: Sequence[str] | None = None, *, stream: TextIO | None = None) -> int:
  """The command line; returns the exit status (0 all fine, 1 a run failed or stopped,
  2 a usage or config error). Progress goes to `stream` (default stdout), errors to stderr."""
  stream = sys.stdout if stream is None else stream
  parser = build_parser()
  args = parser.parse_args(argv)
  out = args.out.resolve()
  try:
    if args.aggregate_only:
      return (
          0
          if aggregate_out(
              out,
              metrics=args.metrics,
              curves=args.curves,
              stream=stream,
              points=args.points,
              until_step=args.until_step,
          )
          else 1
      )
    if not args.config:
      parser.error("--config is required unless --aggregate-only")
    if args.seeds < 1 or args.parallel < 1:
      parser.error("--seeds and --parallel must be >= 1")
    path, colon, arg = args.config.partition(":")
    config = str(pathlib.Path(path).resolve()) + colon + arg
    axes = grid_axes(args.grid)
    if args.grid_preset:
      axes.insert(0, preset_axis(load_preset(config, args.grid_preset)))
    fixed = [
        Override(p, v) for key, v in map(parse_assignment, args.fixed) for p in expand_key(key)
    ]
    points = make_points(axes, fixed)
    if args.points is not None:
      points = select_points(points, args.points)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    specs = plan_runs(
        points,
        seeds,
        config=config,
        out=out,
        shared_warm_start=args.shared_warm_start,
        by_seed=args.by_seed,
    )
    warm_starts = (
        plan_warm_starts(seeds, fixed, config=config, out=out) if args.shared_warm_start else []
    )
    if args.dry_run:
      for spec in warm_starts + specs:
        resolve_config(spec)
        state = "finished" if spec.finished() else "to run"
        print(
            f"{spec.label}: {state}\n  {shlex.join(shlex.split(args.runner) + spec.args())}",
            file=stream,
        )
      return 0
    prepare(warm_starts + specs)
    update_manifest(out, config, specs)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2

  todo = [s for s in specs if not s.finished()]
  skipped = len(specs) - len(todo)
  print(
      f"{len(points)} point(s) x {len(seeds)} seed(s) = {len(specs)} runs in {out}; "
      f"{skipped} already finished, {len(todo)} to run, {args.parallel} at a time",
      file=stream,
  )
  launcher = _Launcher(
      shlex.split(args.runner),
      parallel=args.parallel,
      env=_runner_env(out, args.xla_cache),
      stream=stream,
  )
  previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
  start = time.monotonic()
  try:
    warm_todo = [s for s in warm_starts if not s.finished()]
    if warm_todo:
      print(f"first the shared warm starts of {len(warm_todo)} seed(s)", file=stream)
    results = launcher.run_all(todo, warm_starts=warm_todo)
  finally:
    signal.signal(signal.SIGTERM, previous)
  failed = [r for r in results if r.status == "failed"]
  stopped = [r for r in results if r.status in ("stopped", "not run")]
  print(
      f"done in {time.monotonic() - start:.0f} s: "
      f"{sum(r.status == 'finished' for r in results)} finished, {skipped} skipped, "
      f"{len(failed)} failed, {len(stopped)} stopped or not run",
      file=stream,
  )
  for result in failed:
    print(f"  failed: {result.spec.label} ({_failure(result)}): {result.log}", file=stream)
  if not args.no_aggregate:
    aggregate_out(out, metrics=args.metrics, curves=args.curves, stream=stream)
  return 1 if failed or stopped else 0


if __name__ == "__main__":
  sys.exit(main())
