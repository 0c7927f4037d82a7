"""Chunked vs naive per-token log-probs: compiled memory and time of value + gradient.

The naive program builds the [B, T, V] float32 logits (`log_softmax(h · W)`); the chunked one
is `gmpo_jax.models.logprobs.token_logprobs`. Both are `jax.value_and_grad` with respect to the
hidden states and the unembedding matrix, as in a policy-gradient step. Memory comes from
`jax.jit(f).lower(...).compile().memory_analysis()` (no allocation needed, so every batch
size is reported even where it would not fit); "peak" = arguments + outputs + scratch − aliased.
Time is the median wall time of --reps runs after one warm-up, for the batches in --time.

  .venv/bin/python benchmarks/logprobs_bench.py --batch 1 2 3 4 --time 1 2 3 4
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.models.logprobs import token_logprobs

GIB = 2**30


def _naive(hidden, unembed, targets):
  logits = jnp.einsum('btd,dv->btv', hidden, unembed, preferred_element_type=jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.take_along_axis(log_p, targets[..., None], axis=-1))


def _measure(loss, specs, inputs, reps):
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*specs).compile()
  stats = compiled.memory_analysis()
  scratch = stats.temp_size_in_bytes
  peak = (
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      + scratch
      - stats.alias_size_in_bytes
  )
  seconds = None
  if inputs is not None:
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
  return scratch, peak, seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, nargs='+', default=[1, 2, 3, 4])
  parser.add_argument(
      '--time', type=int, nargs='*', default=[], help='batch sizes to time (others: memory only)'
  )
  parser.add_argument('--length', type=int, default=2048)
  parser.add_argument('--hidden', type=int, default=896)
  parser.add_argument('--vocab', type=int, default=151_936)
  parser.add_argument('--chunk-size', type=int, default=256)
  parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  parser.add_argument(
      '--with-entropy',
      action='store_true',
      help='chunked side also returns (and differentiates) the entropy',
  )
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)

  def chunked(hidden, unembed, targets):
    out = token_logprobs(
        hidden, unembed, targets, chunk_size=args.chunk_size, with_entropy=args.with_entropy
    )
    return jnp.sum(out.logp + out.entropy) if args.with_entropy else jnp.sum(out)

  rows = []
  for batch in args.batch:
    specs = (
        jax.ShapeDtypeStruct((batch, args.length, args.hidden), dtype),
        jax.ShapeDtypeStruct((args.hidden, args.vocab), dtype),
        jax.ShapeDtypeStruct((batch, args.length), jnp.int32),
    )
    inputs = None
    if batch in args.time:
      rng = np.random.default_rng(batch)
      inputs = (
          jnp.asarray(rng.normal(size=specs[0].shape), dtype),
          jnp.asarray(0.05 * rng.normal(size=specs[1].shape), dtype),
          jnp.asarray(rng.integers(0, args.vocab, specs[2].shape), jnp.int32),
      )
    naive = _measure(_naive, specs, inputs, args.reps)
    chunk = _measure(chunked, specs, inputs, args.reps)
    rows.append((batch, naive, chunk))

  device = jax.devices()[0]
  print('\n### Per-token log-probs, value + grad: chunked vs full logits\n')
  print(f'- device: {device.platform} / {device.device_kind}, jax {jax.__version__}')
  print(f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(f'- command: `{" ".join([sys.executable.split("/")[-1]] + sys.argv)}`')
  print(
      f'- T={args.length}, D={args.hidden}, V={args.vocab}, inputs {args.dtype}, '
      f'chunk_size={args.chunk_size}, entropy={args.with_entropy}; memory from '
      f'compiled memory_analysis; time: median of {args.reps}\n'
  )
  print(
      '| B | naive scratch GiB | chunked scratch GiB | scratch ratio | naive peak GiB '
      '| chunked peak GiB | peak ratio | naive ms | chunked ms | time ratio |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for batch, (n_tmp, n_peak, n_s), (c_tmp, c_peak, c_s) in rows:
    timing = (
        f'{1e3 * n_s:.1f} | {1e3 * c_s:.1f} | {c_s / n_s:.2f}' if n_s is not None else '– | – | –'
    )
    print(
        f'| {batch} | {n_tmp / GIB:.3f} | {c_tmp / GIB:.3f} | {c_tmp / n_tmp:.3f} | '
        f'{n_peak / GIB:.3f} | {c_peak / GIB:.3f} | {c_peak / n_peak:.3f} | {timing} |'
    )


if __name__ == '__main__':
  main()
