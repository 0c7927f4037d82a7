"""The default run (`configs/default.py`) with RL on LoRA adapters instead of every parameter.

    python -m gmpo_jax.main --config=configs/lora.py:8 --workdir=workdirs/lora8
    python -m gmpo_jax.main --config=configs/lora.py:8,ablation_default ...

The argument is the rank (default 8), optionally followed by the base config's module in
`configs/` (`default`, or `ablation_default` to compare with the ablation grids' runs). Adapters on all seven projections of every layer, the
base frozen in float32 (the compute dtype). Following "LoRA Without Regret" (Schulman and
Thinking Machines Lab, 2025): alpha fixed at 32 (so the best learning rate hardly depends on the
rank) and a learning rate 10x the full-parameter one (1e-3 against 1e-4). The warm start still
trains the full model, which becomes the frozen base; its cache does not depend on
`model.lora`, so a full-parameter run's `warm_start/` directory serves a LoRA run of the same
seed. Measured against full-parameter RL in BENCHMARKS.md ("LoRA vs full-parameter RL").
"""

import ml_collections

from configs import ablation_default, default

_BASES = {"default": default, "ablation_default": ablation_default}


def get_config(spec: str = "8") -> ml_collections.ConfigDict:
  rank, _, base = spec.partition(",")
  if (base or "default") not in _BASES:
    raise ValueError(f"configs/lora.py:{spec}: base {base!r} is not one of {sorted(_BASES)}")
  config = _BASES[base or "default"].get_config()
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
