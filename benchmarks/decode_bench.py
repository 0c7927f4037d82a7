"""Decode throughput: KV-cached `gmpo_jax.rollout.sampling.generate` vs recomputing the prefix.

Both sides decode greedily with random weights (no stop token, so every row runs all N
steps) and exclude compilation. The baseline has no KV cache: every step runs the model over
the whole prefix, padded up to a multiple of --bucket tokens so that it compiles
ceil((P + N) / bucket) programs rather than N. `--quick` times one baseline step per bucket
(median of --reps) and sums them over the N steps instead of running all N: the step cost
only depends on the bucket, so this estimates the same quantity, and the table says so.

  .venv/bin/python benchmarks/decode_bench.py --config tiny llama-100m --batch 32 \\
      --new-tokens 256 --quick

`--steps-per-check 1 4 8` instead times the cached decoder alone for each k decode steps per
"all rows stopped" check (`SamplingConfig.steps_per_check`), one repetition of each k in turn
(so load changes on a shared machine hit every k alike), and checks that every k returns the
tokens of the first:

  .venv/bin/python benchmarks/decode_bench.py --config tiny --steps-per-check 1 4 8 --reps 7
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models.logprobs import project_logits
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout import sampling


@functools.partial(jax.jit, static_argnames=('graphdef', 'length'), donate_argnames=('buffer',))
def _recompute_step(graphdef, state, buffer, filled, *, length):
  """Appends argmax π(· | buffer[:, :filled]) by a full forward over the first `length` slots."""
  model = nnx.merge(graphdef, state)
  tokens = buffer[:, :length]
  key_mask = jnp.broadcast_to(jnp.arange(length) < filled, tokens.shape)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
  hidden, _ = model(tokens, positions, key_mask=key_mask)
  last = jax.lax.dynamic_index_in_dim(hidden, filled - 1, axis=1, keepdims=False)
  token = jnp.argmax(project_logits(last, model.unembed_matrix()), axis=-1).astype(jnp.int32)
  return jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], filled, axis=1)


def _bucket(length: int, bucket: int) -> int:
  return -(-length // bucket) * bucket


def _timed(fn, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _model_and_prompts(name: str, args):
  """A randomly initialised `name` model (graphdef, state) and [batch, prompt_len] prompts."""
  config = dataclasses.replace(
      TransformerConfig.from_name(name), dtype=args.dtype, param_dtype=args.dtype
  )
  model = nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(0)))()
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  return graphdef, state, prompt, mask


def bench(name: str, args) -> dict:
  graphdef, state, prompt, mask = _model_and_prompts(name, args)
  n_new = args.new_tokens

  sampling_config = sampling.SamplingConfig(
      max_new_tokens=n_new, temperature=0.0, batch_multiple=1, min_prompt_bucket=1
  )

  def cached():
    return sampling.generate(
        (graphdef, state), prompt, mask, jax.random.key(0), config=sampling_config
    )

  cached_out = cached()  # compile
  cached_s = _timed(cached, args.reps)

  width = _bucket(args.prompt_len + n_new, args.bucket)
  lengths = [min(_bucket(args.prompt_len + t, args.bucket), width) for t in range(n_new)]

  def run_steps(steps):
    buffer = jnp.zeros((args.batch, width), jnp.int32).at[:, : args.prompt_len].set(prompt)
    for t in steps:
      buffer = _recompute_step(graphdef, state, buffer, args.prompt_len + t, length=lengths[t])
    return buffer

  first_step_of_bucket = {length: t for t, length in reversed(list(enumerate(lengths)))}
  for t in first_step_of_bucket.values():  # compile every bucket
    jax.block_until_ready(run_steps([t]))
  if args.quick:
    step_s = {
        length: _timed(lambda t=t: run_steps([t]), args.reps)
        for length, t in first_step_of_bucket.items()
    }
    recompute_s = sum(step_s[length] for length in lengths)
    agree = 'n/a (quick)'
  else:
    recompute_s = _timed(lambda: run_steps(range(n_new)), args.reps)
    recomputed = np.asarray(run_steps(range(n_new)))[:, args.prompt_len : args.prompt_len + n_new]
    agree = f'{np.mean(recomputed == np.asarray(cached_out.completion_tokens)):.3f}'
  tokens = args.batch * n_new
  return dict(
      config=name,
      cached=tokens / cached_s,
      recompute=tokens / recompute_s,
      cached_s=cached_s,
      recompute_s=recompute_s,
      agree=agree,
  )


def bench_steps_per_check(name: str, args) -> list[dict]:
  """Cached greedy decoding for each k in --steps-per-check, repetitions interleaved."""
  graphdef, state, prompt, mask = _model_and_prompts(name, args)

  def decoder(k):
    sampling_config = sampling.SamplingConfig(
        max_new_tokens=args.new_tokens,
        temperature=0.0,
        batch_multiple=1,
        min_prompt_bucket=1,
        steps_per_check=k,
    )
    return lambda: sampling.generate(
        (graphdef, state), prompt, mask, jax.random.key(0), config=sampling_config
    )

  decoders = {k: decoder(k) for k in args.steps_per_check}
  tokens = {k: np.asarray(run().completion_tokens) for k, run in decoders.items()}  # compile
  times = {k: [] for k in decoders}
  for _ in range(args.reps):
    for k, run in decoders.items():
      times[k].append(_timed(run, 1))
  first = args.steps_per_check[0]
  rows = []
  for k in decoders:
    seconds = statistics.median(times[k])
    rows.append(
        dict(
            config=name,
            k=k,
            tok_s=args.batch * args.new_tokens / seconds,
            seconds=seconds,
            ratio=statistics.median(times[first]) / seconds,
            same=bool(np.array_equal(tokens[k], tokens[first])),
        )
    )
  return rows


def _print_steps_per_check(args):
  device = jax.devices()[0]
  first = args.steps_per_check[0]
  print('\n### Cached decode, k steps per finish check\n')
  print(
      f'- device: {device.platform} / {device.device_kind} ({jax.device_count()} device(s)), '
      f'jax {jax.__version__}'
  )
  print(f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(f'- command: `{" ".join([sys.executable.split("/")[-1]] + sys.argv)}`')
  print(
      f'- batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, '
      f'no stop token, {args.dtype}; median of {args.reps} interleaved repetitions\n'
  )
  print(f'| config | k | tok/s | median s | speed vs k={first} | tokens equal to k={first} |')
  print('|---|---|---|---|---|---|', flush=True)
  for name in args.config:  # each config's rows as soon as they are measured
    for r in bench_steps_per_check(name, args):
      print(
          f'| {r["config"]} | {r["k"]} | {r["tok_s"]:.0f} | {r["seconds"]:.4f} | '
          f'{r["ratio"]:.3f} | {r["same"]} |',
          flush=True,
      )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', nargs='+', default=['tiny', 'llama-100m'])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--prompt-len', type=int, default=32)
  parser.add_argument('--new-tokens', type=int, default=256)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument(
      '--bucket',
      type=int,
      default=32,
      help='baseline prefix lengths are padded to a multiple of this',
  )
  parser.add_argument('--reps', type=int, default=3, help='timed repetitions (median)')
  parser.add_argument(
      '--quick',
      action='store_true',
      help='estimate the baseline from one timed step per length bucket',
  )
  parser.add_argument(
      '--steps-per-check',
      type=int,
      nargs='+',
      default=None,
      help='instead: time the cached decoder for each k (ratios vs the first)',
  )
  args = parser.parse_args(argv)
  if args.steps_per_check:
    _print_steps_per_check(args)
    return

  rows = [bench(name, args) for name in args.config]
  device = jax.devices()[0]
  print('\n### Decode throughput, KV cache vs full-prefix recompute\n')
  print(
      f'- device: {device.platform} / {device.device_kind} ({jax.device_count()} device(s)), '
      f'jax {jax.__version__}'
  )
  print(f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(f'- command: `{" ".join([sys.executable.split("/")[-1]] + sys.argv)}`')
  baseline = (
      'ESTIMATED from one timed step per bucket (--quick)'
      if args.quick
      else 'measured over all steps'
  )
  print(
      f'- batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, '
      f'{args.dtype}; baseline prefix padded to a multiple of {args.bucket}; '
      f'baseline {baseline}; median of {args.reps}\n'
  )
  print(
      '| config | cached tok/s | recompute tok/s | speedup | cached s | recompute s '
      '| greedy tokens agree |'
  )
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(
        f'| {r["config"]} | {r["cached"]:.0f} | {r["recompute"]:.0f} | '
        f'{r["cached"] / r["recompute"]:.1f}x | {r["cached_s"]:.3f} | {r["recompute_s"]:.3f} '
        f'| {r["agree"]} |'
    )


if __name__ == '__main__':
  main()
