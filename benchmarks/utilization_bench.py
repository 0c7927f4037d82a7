"""Accelerator utilization: decode memory-bandwidth use and train-step MFU.

    python benchmarks/utilization_bench.py --config qwen2.5-0.5b --batch 64 --cache 1024

1. Copy bandwidth: a jitted `x * 2 + 1` over a 2 GiB float32 array (read + write), the
   measured ceiling for memory-bound kernels on this device. The array is donated and
   rewritten in place, as the decode loop's cache is (a fresh 2 GiB output per call would
   time the CPU's page faults, not its memory).
2. Decode: one cached decode step of the whole model (bf16) at a full cache; the bytes it must
   read (parameters + the K/V cache) per step time, as a fraction of (1). The cache is donated
   and its index held fixed, so the step writes its K/V slot in place like a step of
   `sampling.generate`'s loop; the same step without donation (XLA then copies the whole
   cache into a new output first) is timed too, for comparison with figures taken that way.
3. Train step: value and gradient of the summed chunked log-probs (the learner's forward and
   backward) on B x T tokens; MFU = 6 * params * tokens / time / peak (the attention FLOPs are
   left out, so this slightly understates the useful work).
"""

import argparse
import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models.logprobs import positions_from_mask, sequence_logprobs
from gmpo_jax.models.transformer import Transformer, TransformerConfig, init_cache


def _median_time(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _median_time_in_place(step, value, repeats=10):
  """Median seconds of `value = step(value)` (a step that donates its input), after a warm-up."""
  value = jax.block_until_ready(step(value))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    value = jax.block_until_ready(step(value))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="qwen2.5-0.5b")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--cache", type=int, default=1024)
  parser.add_argument("--train-batch", type=int, default=8)
  parser.add_argument("--train-length", type=int, default=1024)
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
  parser.add_argument(
      "--dtype",
      default="bfloat16",
      choices=["bfloat16", "float32"],
      help="parameters, compute and cache (XLA:CPU has no fast bf16 matmul)",
  )
  parser.add_argument("--copy-mib", type=int, default=2048, help="size of the copied array")
  args = parser.parse_args()

  x = jnp.ones((args.copy_mib * 2**18,), jnp.float32)
  copy_bytes = 2 * x.nbytes
  copy_bw = copy_bytes / _median_time_in_place(jax.jit(lambda a: a * 2 + 1, donate_argnums=0), x)

  config = dataclasses.replace(
      TransformerConfig.from_name(args.config), param_dtype=args.dtype, dtype=args.dtype
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(state))
  num_params = sum(p.size for p in jax.tree.leaves(state))

  cache = init_cache(config, args.batch, args.cache + 8, args.dtype)
  cache = cache.replace(
      key_mask=jnp.ones_like(cache.key_mask), index=jnp.asarray(args.cache, jnp.int32)
  )
  cache_bytes = cache.k.nbytes * args.cache // cache.capacity * 2

  def decode_step(state, cache, tokens):
    m = nnx.merge(graphdef, state)
    hidden, new_cache = m(tokens, jnp.full_like(tokens, args.cache), cache=cache)
    # Same slot every call: a steady state of the loop's step at cache length args.cache.
    return m.logits(hidden), new_cache.replace(index=cache.index)

  tokens = jnp.zeros((args.batch, 1), jnp.int32)
  copying = jax.jit(decode_step)
  copying_time = _median_time(lambda s, c, t: copying(s, c, t)[0], state, cache, tokens)
  in_place = jax.jit(decode_step, donate_argnums=1)
  decode_time = _median_time_in_place(lambda out: in_place(state, out[1], tokens), (None, cache))
  decode_bw = (param_bytes + cache_bytes) / decode_time
  del cache

  b, t = args.train_batch, args.train_length
  train_tokens = jax.random.randint(jax.random.key(1), (b, t), 0, config.vocab_size)
  key_mask = jnp.ones((b, t), bool)

  @jax.jit
  def train_step(state):
    def loss(s):
      m = nnx.merge(graphdef, s)
      return -jnp.mean(
          sequence_logprobs(
              m, train_tokens, positions_from_mask(key_mask), key_mask, chunk_size=256
          )
      )

    return jax.value_and_grad(loss)(state)

  train_time = _median_time(train_step, state, repeats=5)
  mfu = 6 * num_params * b * t / train_time / (args.peak_tflops * 1e12)

  print(
      f"device: {jax.devices()[0].device_kind}; date {datetime.date.today()}; jax {jax.__version__}"
  )
  print("| measurement | value |\n|---|---|")
  print(
      f"| copy bandwidth ({args.copy_mib} MiB f32, read+write, in place) | "
      f"{copy_bw / 1e9:.1f} GB/s |"
  )
  print(
      f"| {args.config} {args.dtype}: params | {num_params / 1e6:.1f} M "
      f"({param_bytes / 2**30:.2f} GiB) |"
  )
  print(
      f"| decode step, B={args.batch}, cache {args.cache}, cache donated (in place) | "
      f"{decode_time * 1e3:.2f} ms ({args.batch / decode_time:.0f} tok/s) |"
  )
  print(f"| the same step without donation (copies the cache) | {copying_time * 1e3:.2f} ms |")
  print(
      f"| decode bytes read / step (params + K/V) | {(param_bytes + cache_bytes) / 2**30:.2f} GiB |"
  )
  print(
      f"| decode bandwidth utilization | {decode_bw / 1e9:.1f} GB/s = {decode_bw / copy_bw:.1%} "
      f"of copy |"
  )
  print(
      f"| train fwd+bwd, B={b}, T={t} | {train_time * 1e3:.1f} ms ({b * t / train_time:.0f} tok/s) |"
  )
  print(f"| MFU (6·N·tokens, peak {args.peak_tflops:g} TFLOP/s) | {mfu:.1%} |")


if __name__ == "__main__":
  main()
