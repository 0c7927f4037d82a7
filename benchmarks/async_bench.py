"""Synchronous vs bounded-staleness RL steps: the speedup model, measured step times, the split.

Each run is the real runner (`gmpo_jax.loop.train_and_evaluate`) on `--config` for `--steps`
RL steps from the same short warm start (`--warm-start-steps`, no pass-rate target; the second
run reuses the first one's cached warm start), with one small evaluation at the end.

1. The model, from the synchronous run (max_staleness 0): sampler time S (`time/rollout` +
   `time/reward`) and learner time L (`time/update`) per step; a synchronous loop takes S + L,
   a sampler that overlaps the learner perfectly max(S, L).
2. The measurement: the median `time/step` at max_staleness 0 and 1, and the share of the step
   the learner waited for its rollout (`time/wait_rollout` / `time/step`, summed over steps).
   Sampler and learner share the machine's cores, so the overlap is bounded by what the cores
   leave idle, not by the model.
3. `--split N`: a third run at max_staleness 1 with the sampler on the first N devices and the
   learner on the rest (`config.rollout.devices`), whose non-timing metrics are compared with
   the shared-device run at max_staleness 1: on simulated CPU devices a check of correctness,
   not of speed.

The first `--skip` steps (compilation) are left out of the medians.

    .venv/bin/python benchmarks/async_bench.py --steps 30
    .venv/bin/python benchmarks/async_bench.py --devices 8 --split 4 --steps 6
"""

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="default", help="a module of configs/")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--skip", type=int, default=3, help="leading steps left out (compiles)")
  parser.add_argument("--warm-start-steps", type=int, default=50)
  parser.add_argument("--eval-examples", type=int, default=32)
  parser.add_argument(
      "--devices", type=int, default=None, help="simulated CPU devices (ignored on an accelerator)"
  )
  parser.add_argument(
      "--split",
      type=int,
      default=None,
      help="sampler devices of the split run (None: no split run)",
  )
  parser.add_argument("--workdir", default=None, help="kept when given; a temporary one if not")
  return parser.parse_args()


ARGS = _parse()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if ARGS.devices:  # must precede JAX's initialisation
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
  ).strip()

import importlib  # noqa: E402

import jax  # noqa: E402

from gmpo_jax.infra import metrics as metrics_lib  # noqa: E402
from gmpo_jax.runner import (
    loop,  # noqa: E402
    rl_step,  # noqa: E402
)


def _config(staleness, devices):
  config = importlib.import_module(f"configs.{ARGS.config}").get_config()
  config.num_steps = ARGS.steps
  config.eval_every = ARGS.steps
  config.checkpoint.every = ARGS.steps
  config.eval.num_examples = ARGS.eval_examples
  config.warm_start.steps = ARGS.warm_start_steps
  config.warm_start.target_train_pass_rate = None
  config.progress = False
  config.rollout.max_staleness = staleness
  config.rollout.devices = devices
  return config


def _run(root, name, staleness, devices=None):
  workdir = root / name
  first = root / "k0"
  if workdir != first and (first / "warm_start").exists():
    shutil.copytree(first / "warm_start", workdir / "warm_start")
  start = time.perf_counter()
  loop.train_and_evaluate(_config(staleness, devices), workdir)
  seconds = time.perf_counter() - start
  return metrics_lib.read_metrics(workdir)[1:], seconds


def _timing(records):
  timed = records[ARGS.skip :]
  median = lambda key: statistics.median(r[key] for r in timed)
  sampler = statistics.median(r["time/rollout"] + r["time/reward"] for r in timed)
  wait = sum(r["time/wait_rollout"] for r in timed) / sum(r["time/step"] for r in timed)
  return {"S": sampler, "L": median("time/update"), "step": median("time/step"), "wait": wait}


def _largest_difference(got, want):
  """The largest relative difference of a numeric non-timing metric, and where."""
  worst, where = 0.0, "none"
  for a, b in zip(got, want):
    for key, value in b.items():
      if key in rl_step.TIMING_METRICS or not isinstance(value, (int, float)):
        continue
      if key == "mismatch/kl" and max(abs(a[key]), abs(value)) < 1e-6:
        continue  # float noise of two partitionings
      diff = abs(a[key] - value) / max(abs(value), 1e-6)
      if diff > worst:
        worst, where = diff, f"step {b['step']} {key}: {a[key]} vs {value}"
  return worst, where


def main():
  root = pathlib.Path(ARGS.workdir or tempfile.mkdtemp(prefix="async_bench_"))
  print(
      f"# async_bench {' '.join(sys.argv[1:])}: {time.strftime('%Y-%m-%d %H:%M')}, "
      f"{jax.device_count()} x {jax.devices()[0].platform}, load {os.getloadavg()[0]:.1f}"
  )
  sync, sync_s = _run(root, "k0", 0)
  async_, async_s = _run(root, "k1", 1)
  t0, t1 = _timing(sync), _timing(async_)
  print(
      f"model (k=0): S = {t0['S']:.3f} s, L = {t0['L']:.3f} s; sync S+L = {t0['S'] + t0['L']:.3f} s, "
      f"async max(S, L) = {max(t0['S'], t0['L']):.3f} s, predicted speedup "
      f"{(t0['S'] + t0['L']) / max(t0['S'], t0['L']):.2f}x"
  )
  print(
      f"measured median time/step: k=0 {t0['step']:.3f} s, k=1 {t1['step']:.3f} s, "
      f"speedup {t0['step'] / t1['step']:.2f}x"
  )
  print(f"k=1 sampler S = {t1['S']:.3f} s, learner L = {t1['L']:.3f} s (in parallel threads)")
  print(f"learner's wait share: k=0 {t0['wait']:.3f}, k=1 {t1['wait']:.3f}")
  print(f"whole command: k=0 {sync_s:.0f} s, k=1 {async_s:.0f} s")
  if ARGS.split:
    split, _ = _run(root, "k1_split", 1, ARGS.split)
    worst, where = _largest_difference(split, async_)
    print(
        f"split {ARGS.split} + {jax.device_count() - ARGS.split} vs shared at k=1: "
        f"largest relative difference of a non-timing metric {worst:.2e} ({where})"
    )
  if ARGS.workdir is None:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
