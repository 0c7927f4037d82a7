"""A run with RL on LoRA adapters instead of every parameter: the default run's, or another
config's.

    python -m gmpo_jax.main --config=configs/lora.py:8 --workdir=workdirs/lora8
    python -m gmpo_jax.main --config=configs/lora.py:32,ablation_default ...  # beside the grids
    python -m gmpo_jax.plan --config=configs/lora.py:8,qwen2_5_0_5b --model=qwen2.5-7b \
        --topology=v5e:2x2 --config.model.overrides.remat=full

The argument is the rank (default 8), then optionally, after a comma, the config module under
`configs/` the adapters go on (default `default`, `configs/default.py`); the accelerator
configs carry the run-time overrides (`model.overrides.remat`) and dtypes the plan advises on.
Adapters on all seven projections of every layer, the base frozen in the compute dtype
(`--config.model.lora.base_dtype=int8` or `nf4` for QLoRA). Following "LoRA Without Regret"
(Schulman and Thinking Machines Lab, 2025): alpha fixed at 32 (so the best learning rate hardly
depends on the rank) and a learning rate 10x the full-parameter one (1e-3 against 1e-4 for the
default run). The warm start still trains the full model, which becomes the frozen base; its
cache does not depend on `model.lora`, so a full-parameter run's `warm_start/` directory serves
a LoRA run of the same seed. Measured against full-parameter RL in BENCHMARKS.md ("LoRA vs
full-parameter RL").
"""

import importlib

import ml_collections


def get_config(arg: str = "8") -> ml_collections.ConfigDict:
  rank, _, base = arg.partition(",")
  config = importlib.import_module(f"configs.{base or 'default'}").get_config()
  config.model.lora = ml_collections.ConfigDict(
      {
          "rank": int(rank),
          "alpha": 32.0,
          "dropout": 0.0,
          "targets": ".*",
          "base_dtype": ml_collections.FieldReference(None, field_type=str),
      }
  )
  config.optim.learning_rate = 10 * config.optim.learning_rate
  return config
