"""The LoRA sampler: adapters applied in the forward pass vs the base merged once per update.

Per update the sampler gets new adapters. Either it decodes with them as they are (every
adapted projection adds scale·(x·A)·B: two thin matmuls more per projection and step), or the
adapters are merged into a copy of the base once (W + scale·A·B for every adapted weight, a
full-size copy of those weights) and the plain model decodes. Both sides sample the same
prompts with the same key (temperature 1) and exclude compilation; the merged side's time
includes its merge. Interleaved repetitions (a shared machine's load hits both alike), median.

  python benchmarks/lora_sampler_bench.py --rank 8 32 --new-tokens 6 64 --reps 5
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
from flax import nnx

from gmpo_jax.models import lora
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout import sampling

# configs/default.py's policy (the char tokenizer's 99 ids rounded up).
DEFAULT = dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rank", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--new-tokens", type=int, nargs="+", default=[6, 64])
  parser.add_argument("--batch", type=int, default=256, help="rows: prompts x completions")
  parser.add_argument("--prompt-len", type=int, default=6)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  config = dataclasses.replace(TransformerConfig.from_name("tiny"), **DEFAULT)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(
      rng.integers(3, config.vocab_size, (args.batch, args.prompt_len)), jnp.int32
  )
  mask = jnp.ones(prompts.shape, bool)
  print(
      f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {jax.devices()[0]}, "
      f"batch {args.batch}, prompt {args.prompt_len}"
  )
  print(
      "| rank | new tokens | adapters in forward (s) | merge + merged decode (s) | merge "
      "alone (s) | merged / adapters |"
  )
  print("|---|---|---|---|---|---|")
  for rank in args.rank:
    model = lora.apply_lora(
        Transformer(config, rngs=nnx.Rngs(0)), lora.LoRAConfig(rank=rank, alpha=32.0), seed=0
    )
    graphdef, state = nnx.split(model)
    adapters, base = lora.split_adapters(state)
    # Trained adapters (B away from zero), so neither side decodes a degenerate model.
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    state = nnx.merge_state(adapters, base)
    merge = jax.jit(lambda s: nnx.split(lora.merge_adapters(nnx.merge(graphdef, s))))
    plain_graphdef, _ = merge(state)
    for new_tokens in args.new_tokens:
      sampling_config = sampling.SamplingConfig(max_new_tokens=new_tokens, eos_id=1, pad_id=0)
      key = jax.random.key(1)

      def adapted():
        out = sampling.generate((graphdef, state), prompts, mask, key, config=sampling_config)
        return jax.block_until_ready(out.tokens)

      def merged():
        _, plain = merge(state)
        out = sampling.generate((plain_graphdef, plain), prompts, mask, key, config=sampling_config)
        return jax.block_until_ready(out.tokens)

      def merge_only():
        return jax.block_until_ready(merge(state)[1])

      first = np.asarray(adapted())
      # Same sampled tokens up to float rounding of the two forms: most rows agree.
      agree = float(np.mean(np.all(first == np.asarray(merged()), axis=1)))
      merge_only()
      times = {"adapted": [], "merged": [], "merge": []}
      for _ in range(args.reps):
        for name, fn in (("adapted", adapted), ("merged", merged), ("merge", merge_only)):
          start = time.perf_counter()
          fn()
          times[name].append(time.perf_counter() - start)
      a, m, g = (statistics.median(times[n]) for n in ("adapted", "merged", "merge"))
      print(
          f"| {rank} | {new_tokens} | {a:.4f} | {m:.4f} | {g:.4f} | {m / a:.2f} "
          f"(rows identical: {agree:.2f}) |"
      )


if __name__ == "__main__":
  main()
