"""Dense vs blockwise attention in the train step: compiled scratch memory and time vs T.

The program is `jax.value_and_grad` (with respect to every parameter) of the summed
`gmpo_jax.models.logprobs.sequence_logprobs` of a left-padded batch, as in a policy-gradient step,
with the model's `attention_impl` set to 'xla' (dense [B, H, T, T] scores, the reference) or
'blockwise' (`gmpo_jax.models.attention.blockwise_attention`). Scratch memory is
`temp_size_in_bytes` of `jax.jit(...).lower(...).compile().memory_analysis()` (no allocation
needed); time is the median of --reps runs after one warm-up, for the lengths in --time.

  .venv/bin/python benchmarks/attention_memory_bench.py                  # tiny, B = 1
  .venv/bin/python benchmarks/attention_memory_bench.py --lengths 256 1024 --time 256 1024
  .venv/bin/python benchmarks/attention_memory_bench.py --sweep-blocks 64 128 256 512 \
      --time 64 128 256 512 1024 4096 --reps 7 --dense-max 1024     # block-size sweep

The dense program is not compiled above --dense-max (its T = 8192 step needs > 8 GiB).
On a GPU, `--cudnn` adds the cuDNN flash kernel (`attention_impl='cudnn'`, float16 / bfloat16
only: pass `--dtype bfloat16`) to the block-size sweep:

  python benchmarks/attention_memory_bench.py --config qwen2.5-0.5b --dtype bfloat16 \
      --sweep-blocks 512 --cudnn --time 1024 4096 --dense-max 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models.attention import default_block_size
from gmpo_jax.models.logprobs import positions_from_mask, sequence_logprobs
from gmpo_jax.models.transformer import Transformer, TransformerConfig

MIB = 2**20


def _step(graphdef):
  def loss(params, rest, tokens, positions, key_mask):
    model = nnx.merge(graphdef, params, rest)
    return jnp.sum(sequence_logprobs(model, tokens, positions, key_mask))

  return jax.jit(jax.value_and_grad(loss))


def _batch(config, batch, length, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
  # Left padding of up to 1/8 of the row, different per row.
  pads = rng.integers(0, max(length // 8, 1), batch)
  key_mask = np.arange(length)[None, :] >= pads[:, None]
  return (jnp.asarray(tokens), positions_from_mask(jnp.asarray(key_mask)), jnp.asarray(key_mask))


def measure(config, batch, length, timed, reps):
  """(scratch bytes, median seconds or None) of one value-and-grad step."""
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs = (params, rest) + _batch(config, batch, length)
  compiled = _step(graphdef).lower(*inputs).compile()
  scratch = compiled.memory_analysis().temp_size_in_bytes
  seconds = None
  if timed:
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
  return scratch, seconds


def sweep_blocks(base, batch, lengths, blocks, reps, dense_max, cudnn=False):
  """Median ms of dense and of blockwise at each block size (and of cuDNN), repetitions
  interleaved (one of each program in turn), so load changes hit all programs alike."""
  print(
      "| T | dense ms | "
      + " | ".join(f"block {b} ms" for b in blocks)
      + (" | cudnn ms" if cudnn else "")
      + " |"
  )
  print("|---|---|" + "---|" * (len(blocks) + cudnn))
  for length in lengths:
    programs = {}
    configs = (
        [("xla", dataclasses.replace(base, attention_impl="xla"))] if (length <= dense_max) else []
    )
    configs += [
        (b, dataclasses.replace(base, attention_impl="blockwise", attention_block_size=b))
        for b in blocks
    ]
    if cudnn:
      configs.append(("cudnn", dataclasses.replace(base, attention_impl="cudnn")))
    for name, config in configs:
      model = Transformer(config, rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      inputs = (params, rest) + _batch(config, batch, length)
      compiled = _step(graphdef).lower(*inputs).compile()
      jax.block_until_ready(compiled(*inputs))
      programs[name] = (compiled, inputs, [])
    for _ in range(reps):
      for compiled, inputs, times in programs.values():
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    median = {name: statistics.median(times) * 1e3 for name, (_, _, times) in programs.items()}
    dense = f"{median['xla']:.1f}" if "xla" in median else "—"
    print(
        f"| {length} | {dense} | "
        + " | ".join(f"{median[b]:.1f}" for b in blocks)
        + (f" | {median['cudnn']:.1f}" if cudnn else "")
        + " |",
        flush=True,
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
  parser.add_argument(
      "--time",
      type=int,
      nargs="*",
      default=[256, 1024],
      help="lengths to time (others: memory only)",
  )
  parser.add_argument(
      "--run",
      type=int,
      nargs="*",
      default=[8192],
      help="lengths at which the blockwise step is also executed once",
  )
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--block-size", type=int, default=None)
  parser.add_argument("--dense-max", type=int, default=4096)
  parser.add_argument(
      "--sweep-blocks",
      type=int,
      nargs="*",
      default=None,
      help="instead: time dense and these block sizes at the --time lengths",
  )
  parser.add_argument(
      "--cudnn",
      action="store_true",
      help="with --sweep-blocks: time the cuDNN kernel too (GPU, 16-bit dtype)",
  )
  parser.add_argument(
      "--dtype",
      default=None,
      choices=["float32", "bfloat16"],
      help="parameters and compute; default the config's",
  )
  args = parser.parse_args(argv)

  base = TransformerConfig.from_name(args.config)
  if args.dtype is not None:
    base = dataclasses.replace(base, dtype=args.dtype, param_dtype=args.dtype)
  if args.block_size is not None:
    base = dataclasses.replace(base, attention_block_size=args.block_size)
  block = base.attention_block_size or default_block_size(jax.default_backend())
  print(
      f"# {datetime.date.today()}  jax {jax.__version__}  backend {jax.default_backend()}  "
      f"{args.config} {base.dtype} B={args.batch} block={block}  "
      f"argv: {' '.join(sys.argv[1:])}"
  )
  if args.sweep_blocks:
    sweep_blocks(
        base, args.batch, args.time, args.sweep_blocks, args.reps, args.dense_max, cudnn=args.cudnn
    )
    return
  rows = {}
  for length in args.lengths:
    for impl in ("xla", "blockwise"):
      if impl == "xla" and length > args.dense_max:
        continue
      config = dataclasses.replace(base, attention_impl=impl)
      timed = length in args.time or (impl == "blockwise" and length in args.run)
      rows[impl, length] = measure(
          config, args.batch, length, timed, args.reps if length in args.time else 1
      )
  reference = 1024 if ("blockwise", 1024) in rows else args.lengths[0]

  def mib(impl, length):
    return rows[impl, length][0] / MIB if (impl, length) in rows else float("nan")

  print(
      "| T | dense MiB | blockwise MiB | blockwise / dense | dense ÷ dense@{0} | "
      "blockwise ÷ blockwise@{0} | time blockwise / dense |".format(reference)
  )
  print("|---|---|---|---|---|---|---|")
  for length in args.lengths:
    dense, blockwise = mib("xla", length), mib("blockwise", length)
    dense_t = rows.get(("xla", length), (0, None))[1]
    block_t = rows.get(("blockwise", length), (0, None))[1]
    timing = (
        f"{block_t / dense_t:.2f} ({dense_t * 1e3:.0f} ms dense)"
        if (dense_t and block_t and length in args.time)
        else (f"ran: {block_t:.1f} s" if block_t else "—")
    )
    print(
        f"| {length} | {dense:.1f} | {blockwise:.1f} | {blockwise / dense:.3f} | "
        f"{dense / mib('xla', reference):.2f} | {blockwise / mib('blockwise', reference):.2f} "
        f"| {timing} |"
    )


if __name__ == "__main__":
  main()
