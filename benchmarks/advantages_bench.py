"""Throughput of the advantage estimators against a memory floor and NumPy.

For each group size G the rewards are [B, G] float32 with B = size // G. Each case is
timed (median wall time of --repeats calls after --warmup calls, block_until_ready)
and reported as a ratio to

* the memory floor: a jitted ``x * 2 + 1`` (``where(mask, x * 2 + 1, 0)`` for masked
  cases) that reads the same input bytes and writes the same output bytes; the input
  is a runtime argument, so XLA cannot elide or constant-fold it;
* a vectorized float32 NumPy implementation of the same estimator, which is also
  checked against the JAX output.

Runs on whatever ``jax.devices()`` holds (CPU or GPU). Example:

    python benchmarks/advantages_bench.py --size 16777216 --groups 8 16 64
"""

from __future__ import annotations

import argparse
import datetime
import functools
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.algo import advantages


def numpy_group_relative(
    rewards: np.ndarray, mask: np.ndarray | None, *, log: bool, eps: float = 1e-6
) -> np.ndarray:
  """Float32 NumPy (R or log R) - masked group mean, / (unbiased std + eps)."""
  values = np.log(np.maximum(rewards, np.float32(1e-8))) if log else rewards
  if mask is None:
    mask = np.ones(values.shape, dtype=bool)
  count = mask.sum(axis=-1, keepdims=True, dtype=np.float32)
  values = np.where(mask, values, np.float32(0))
  mean = values.sum(axis=-1, keepdims=True) / np.maximum(count, 1)
  centered = np.where(mask, values - mean, np.float32(0))
  std = np.sqrt(np.square(centered).sum(axis=-1, keepdims=True) / np.maximum(count - 1, 1))
  return centered / (std + np.float32(eps))


def time_call(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
  """Median wall time in seconds of fn(), whose result is blocked on."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def top_level_fusions(jitted: Callable[..., jax.Array], *args: jax.Array) -> str:
  """The compiled program's top-level kernels as 'shape:kind', to see what XLA fused."""
  text = jitted.lower(*args).compile().as_text()
  kernels = []
  for line in text[text.index("ENTRY") :].splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?%\S+ = (\S+?)(?:\{[^}]*\})? (?:fusion|custom-call)\(", line)
    if match:
      kind = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(\w+)", line)
      kernels.append(f"{match.group(1)}:{kind.group(1) if kind else '?'}")
  return " ".join(kernels)


@jax.jit
def memory_floor(x: jax.Array) -> jax.Array:
  return x * 2.0 + 1.0


@jax.jit
def masked_memory_floor(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, x * 2.0 + 1.0, 0.0)


CASES = {
    # name: (estimator, uses mask, NumPy reference)
    "gmpo normalized": (
        functools.partial(advantages.gmpo_advantages, normalize=True),
        False,
        functools.partial(numpy_group_relative, log=True),
    ),
    "gmpo normalized, mask": (
        functools.partial(advantages.gmpo_advantages, normalize=True),
        True,
        functools.partial(numpy_group_relative, log=True),
    ),
    "grpo": (
        advantages.grpo_advantages,
        False,
        functools.partial(numpy_group_relative, log=False),
    ),
    "grpo, mask": (
        advantages.grpo_advantages,
        True,
        functools.partial(numpy_group_relative, log=False),
    ),
}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=2**24, help="B * G elements per call.")
  parser.add_argument("--groups", type=int, nargs="+", default=[8, 16, 64], help="group sizes G.")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--numpy-repeats", type=int, default=3)
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  parser.add_argument(
      "--fusions", action="store_true", help="also print the kernels XLA compiled each case to."
  )
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  rows = []
  fusions = []
  for group_size in args.groups:
    batch = args.size // group_size
    rewards_np = rng.uniform(0.01, 1.0, (batch, group_size)).astype(np.float32)
    mask_np = rng.uniform(size=(batch, group_size)) < 0.9
    rewards, mask = jax.device_put(rewards_np), jax.device_put(mask_np)
    floor_s = time_call(lambda: memory_floor(rewards), warmup=args.warmup, repeats=args.repeats)
    masked_floor_s = time_call(
        lambda: masked_memory_floor(rewards, mask), warmup=args.warmup, repeats=args.repeats
    )
    for name in args.cases:
      estimator, masked, reference = CASES[name]
      jitted = jax.jit(estimator)
      call_args = (rewards, mask) if masked else (rewards,)
      seconds = time_call(lambda: jitted(*call_args), warmup=args.warmup, repeats=args.repeats)
      np_mask = mask_np if masked else None
      numpy_s = time_call(
          lambda: reference(rewards_np, np_mask), warmup=1, repeats=args.numpy_repeats
      )
      np.testing.assert_allclose(
          np.asarray(jitted(*call_args)), reference(rewards_np, np_mask), rtol=2e-3, atol=2e-3
      )
      floor = masked_floor_s if masked else floor_s
      rows.append((name, batch, group_size, seconds, floor, numpy_s))
      if args.fusions:
        fusions.append(f"{name}, G={group_size}: {top_level_fusions(jitted, *call_args)}")

  print(f"machine: {jax.devices()}")
  print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
  print(f"command: python {' '.join(sys.argv)}")
  print(f"jax {jax.__version__}; median of {args.repeats} calls after {args.warmup} warmup calls")
  print()
  print("| case | B | G | time (ms) | floor (ms) | × floor | NumPy (ms) | × NumPy |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, batch, group_size, seconds, floor, numpy_s in rows:
    print(
        f"| {name} | {batch} | {group_size} | {seconds * 1e3:.2f} | {floor * 1e3:.2f} "
        f"| {seconds / floor:.2f} | {numpy_s * 1e3:.1f} | {seconds / numpy_s:.3f} |"
    )
  if fusions:
    print()
    print("Compiled kernels (shape:kind):")
    for line in fusions:
      print(f"- {line}")


if __name__ == "__main__":
  main()
