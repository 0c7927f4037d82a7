"""The learner's update with LoRA adapters (rank r) vs every parameter, on the default policy.

One optimizer step of the default run (configs/default.py: a minibatch of 64 sequences of 13
tokens, GMPO, AdamW) compiled once per variant, timed interleaved (a shared machine's load hits
every variant alike; median of --reps), plus what the compiler reports of the compiled step's
memory (`memory_analysis`: arguments, outputs, temporaries; a deterministic figure, unlike the
process's resident set) and the trained parameters and optimizer-state bytes.

  python benchmarks/lora_update_bench.py --rank 8 32 --reps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.learner import update as learner
from gmpo_jax.models import lora
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.models.transformer import Transformer, TransformerConfig

DEFAULT = dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32
)


def _batch(rows: int, length: int, vocab: int) -> learner.Batch:
  rng = np.random.default_rng(0)
  key_mask = np.ones((rows, length), bool)
  loss_mask = key_mask & (np.arange(length)[None] >= 7)
  old = np.where(loss_mask, rng.normal(-2.0, 0.3, (rows, length)), 0.0).astype(np.float32)
  batch = learner.Batch(
      tokens=jnp.asarray(rng.integers(3, vocab, (rows, length)), jnp.int32),
      positions=positions_from_mask(jnp.asarray(key_mask)),
      key_mask=jnp.asarray(key_mask),
      loss_mask=jnp.asarray(loss_mask),
      old_logp=jnp.asarray(old),
      ref_logp=jnp.asarray(old),
      advantages=jnp.asarray(rng.normal(size=rows), jnp.float32),
  )
  return jax.tree.map(lambda x: x[None], batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rank", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--length", type=int, default=13)
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args()
  config = dataclasses.replace(TransformerConfig.from_name("tiny"), **DEFAULT)
  batch = _batch(args.rows, args.length, config.vocab_size)
  loss = learner.policy_loss(
      AlgorithmConfig(objective="geometric"), temperature=1.0, chunk_size=32, max_length=6
  )
  optimizer = optax.adamw(1e-4)
  variants = {}
  for rank in [None, *args.rank]:
    model = Transformer(config, rngs=nnx.Rngs(0))
    trainable = None
    if rank is not None:
      model = lora.apply_lora(model, lora.LoRAConfig(rank=rank, alpha=32.0), seed=0)
      trainable = lora.LoRAParam
    graphdef, params = nnx.split(model)
    trained = params if rank is None else lora.split_adapters(params)[0]
    opt_state = optimizer.init(trained)
    update = learner.make_update_fn(graphdef, optimizer, loss, donate=False, trainable=trainable)
    jitted = update if rank is None else update.jitted
    args_ = (
        (params, opt_state, batch)
        if rank is None
        else (trained, opt_state, batch, lora.split_adapters(params)[1])
    )
    memory = jitted.lower(*args_).compile().memory_analysis()
    update(params, opt_state, batch)  # compile
    variants["full" if rank is None else f"LoRA r{rank}"] = dict(
        run=lambda u=update, p=params, o=opt_state: jax.block_until_ready(u(p, o, batch)),
        trained=sum(x.size for x in jax.tree.leaves(trained)),
        opt_bytes=sum(x.nbytes for x in jax.tree.leaves(opt_state)),
        memory=memory,
    )
  times = {name: [] for name in variants}
  for _ in range(args.reps):
    for name, v in variants.items():
      start = time.perf_counter()
      v["run"]()
      times[name].append(time.perf_counter() - start)
  full = statistics.median(times["full"])
  print(
      f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {jax.devices()[0]}, "
      f"{args.rows} x {args.length} tokens, median of {args.reps}"
  )
  print(
      "| variant | trained parameters | AdamW state (MiB) | update (ms) | vs full | compiled "
      "step: arguments + outputs + temporaries (MiB) |"
  )
  print("|---|---|---|---|---|---|")
  for name, v in variants.items():
    t = statistics.median(times[name])
    m = v["memory"]
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20
    print(
        f"| {name} | {v['trained']:,} | {v['opt_bytes'] / 2**20:.2f} | {1e3 * t:.1f} | "
        f"{t / full:.2f} | {total:.1f} (temp {m.temp_size_in_bytes / 2**20:.1f}) |"
    )


if __name__ == "__main__":
  main()
