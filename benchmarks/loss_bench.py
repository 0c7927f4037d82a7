"""Speed of the policy losses (value and gradient w.r.t. logp) against a memory floor.

The floor is a jitted function that reads the same input bytes as the losses
(logp, old_logp, mask, advantages) and writes one [B, T] float32 array, as the
gradient does: no loss can beat it by much, since its work is the minimum traffic.
The NumPy column is a float32 NumPy forward pass of GMPO (no gradient).

Run on whatever device JAX picks:
  .venv/bin/python benchmarks/loss_bench.py --batch 256 --length 4096
Prints a markdown table with the device, the date and the command.
"""

import argparse
import datetime
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.algo import losses


def _median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int, inner: int) -> float:
  """Median over `repeats` samples of the time per call, each sample timing
  `inner` back-to-back calls and one wait at the end, so that on an
  accelerator the per-call launch and wait overheads overlap the device work."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner - 1):
      fn()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


@jax.jit
def memory_floor(logp, old_logp, advantages, mask):
  # Every input byte reaches the output, so XLA can elide nothing.
  return jnp.where(mask, (logp - old_logp) * advantages[:, None], 0.0)


def numpy_gmpo_forward(logp, old_logp, advantages, mask, *, epsilon_low=0.4, epsilon_high=0.4):
  """GMPO loss (token clip, seq-mean-token-mean) in float32 NumPy."""
  log_ratio = np.where(mask, logp - old_logp, np.float32(0))
  bounded = np.clip(log_ratio, -epsilon_low, epsilon_high)
  positive = (advantages > 0)[:, None]
  clipped = np.where(positive, np.minimum(log_ratio, bounded), np.maximum(log_ratio, bounded))
  lengths = mask.sum(-1)
  mean = clipped.sum(-1) / np.maximum(lengths, 1)
  sequence_loss = -advantages * np.exp(np.minimum(mean, np.float32(20)))
  nonempty = lengths > 0
  return np.sum(np.where(nonempty, sequence_loss, 0)) / max(nonempty.sum(), 1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256, help='B sequences')
  parser.add_argument('--length', type=int, default=4096, help='T tokens')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--inner', type=int, default=10, help='back-to-back calls per timed sample')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(args.seed)
  shape = (args.batch, args.length)
  old_logp_np = rng.normal(-1.5, 0.5, size=shape).astype(np.float32)
  logp_np = (old_logp_np + rng.normal(0.0, 0.3, size=shape)).astype(np.float32)
  lengths = rng.integers(args.length // 4, args.length + 1, size=(args.batch, 1))
  mask_np = np.arange(args.length) < lengths
  advantages_np = rng.normal(size=args.batch).astype(np.float32)
  inputs = [jax.device_put(x) for x in (logp_np, old_logp_np, advantages_np, mask_np)]

  gmpo = jax.jit(jax.value_and_grad(losses.geometric_mean_loss, has_aux=True))
  token_clip = jax.jit(jax.value_and_grad(losses.token_clip_loss, has_aux=True))

  @jax.jit
  def gmpo_without_extras(*args):
    # Only the loss and the gradient leave: XLA drops the diagnostics.
    (loss, _), grad = jax.value_and_grad(losses.geometric_mean_loss, has_aux=True)(*args)
    return loss, grad

  # The NumPy forward and the JAX loss must agree before their times mean anything.
  np.testing.assert_allclose(
      gmpo(*inputs)[0][0],
      numpy_gmpo_forward(logp_np, old_logp_np, advantages_np, mask_np),
      rtol=1e-4,
  )

  timing = dict(repeats=args.repeats, warmup=args.warmup, inner=args.inner)
  floor = _median_seconds(lambda: memory_floor(*inputs), **timing)
  numpy_time = _median_seconds(
      lambda: numpy_gmpo_forward(logp_np, old_logp_np, advantages_np, mask_np), **timing
  )
  rows = [
      ('memory floor (read inputs, write [B,T])', floor),
      ('GMPO value+grad (jit)', _median_seconds(lambda: gmpo(*inputs), **timing)),
      (
          'GMPO value+grad, extras unused (jit)',
          _median_seconds(lambda: gmpo_without_extras(*inputs), **timing),
      ),
      ('token-clip value+grad (jit)', _median_seconds(lambda: token_clip(*inputs), **timing)),
      ('GMPO forward, NumPy float32', numpy_time),
  ]
  floor_bytes = sum(x.nbytes for x in inputs) + logp_np.nbytes
  device = jax.devices()[0]
  print(
      f'device: {device.platform} ({device.device_kind}), '
      f'{jax.device_count()} device(s), jax {jax.__version__}'
  )
  print(f'date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}')
  print(f'command: {shlex.join([sys.executable] + sys.argv)}')
  print(
      f'B={args.batch}, T={args.length}, float32; median over {args.repeats} '
      f'samples of {args.inner} back-to-back calls, after {args.warmup} '
      'warm-up calls\n'
  )
  print('| function | median ms | / floor | / NumPy fwd | floor bytes / time (GB/s) |')
  print('|---|---:|---:|---:|---:|')
  for name, seconds in rows:
    print(
        f'| {name} | {seconds * 1e3:.3f} | {seconds / floor:.2f} | '
        f'{seconds / numpy_time:.2f} | {floor_bytes / seconds / 1e9:.1f} |'
    )


if __name__ == '__main__':
  main()
