"""GMPO's design ablation at small scale: 1-digit arithmetic, the tiny char-level policy, CPU.

    python experiments/launch.py --config=configs/ablation_gmpo.py --grid-preset=gmpo_design \\
        --seeds=5 --parallel=3 --out=results/gmpo_design
    python experiments/launch.py --config=configs/ablation_gmpo.py:stress \\
        --grid-preset=gmpo_stress --seeds=3 --parallel=3 --out=results/gmpo_stress

Zhao et al. 2025, "Geometric-Mean Policy Optimization" (arXiv 2507.20673) ablate GMPO's design
on Qwen2.5-Math-7B: the token-level clip against no clip and a sequence-level clip, and clip
ranges e^±0.2 / e^±0.4 / e^±0.8, next to GRPO. `get_grid('gmpo_design')` is that grid here (the
paper's "no 1/|o| exponent" variant has no switch in `gmpo_jax.algo.losses` and is left out).
Every point uses the same group-normalized (GRPO) advantage, as the paper does, so only the
objective changes; note that the registry's `gmpo` *advantage* is the log-reward baseline of
the founding document, not part of the paper's method.

The base run (`get_config()`): a 150-step supervised warm start on 150 one-digit +/- problems
(held-out greedy pass@1 0.36 ± 0.18 over seeds 0-4, 95% CI), then 100 RL steps of 16 prompts x
8 completions, each rollout batch reused for 2 epochs x 4 minibatches so the importance ratios
leave 1 and the clip matters (full GMPO: clip fractions up to 0.036 / 0.013 per step, ratios
0.04-7.4). The held-out evaluation covers all 50 test problems every 25 steps. On 2 CPU cores
with other jobs at nice 19, 3 runs at a time: the 8-point x 5-seed grid took 46 minutes
(2026-12-02); results and the orderings they do and do not resolve are in
docs/gmpo_design_ablation.md.

Read the table for reward (reward/mean, reward/geometric_mean, eval/*) and stability: the
importance-ratio range (ratio_max / ratio_min extremes over training), entropy (its minimum:
collapse), approx_kl (policy drift within a step) and the clip fractions.
"""

from collections.abc import Mapping
from typing import Any

from configs import default

# Learning rate per regime: "clip" moves the policy far enough within each rollout's 8 updates
# that the clip binds (ratios leave e^±0.4; measured clip fraction 0.0073, ratios 0.09-4.5);
# "stress" is 10x that, where the GMPO paper expects the unclipped and token-mean variants to
# become unstable.
REGIMES = {"clip": 1e-4, "stress": 1e-3}


def get_config(regime: str = "clip"):
  """The base run; `regime` is 'clip' (default) or 'stress' (`configs/ablation_gmpo.py:stress`)."""
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}; known: {sorted(REGIMES)}")
  config = default.get_config()
  config.num_steps = 100
  config.prompts_per_step = 16
  config.eval_every = 25
  config.progress = False
  config.task.kwargs = {"num_digits": 1, "operations": ("+", "-"), "num_train": 150, "num_test": 50}
  config.model.name = "tiny"
  config.model.overrides = {}
  config.algorithm.advantage = "grpo"
  config.algorithm.advantage_kwargs = {"normalize": True}
  config.algorithm.objective = "geometric"
  # Only keys that both the geometric and the token-clip objective take, so that
  # `--grid objective=token_clip,geometric` works on this base too.
  config.algorithm.objective_kwargs = {"epsilon_low": 0.4, "epsilon_high": 0.4}
  config.algorithm.num_epochs = 2
  config.algorithm.num_minibatches = 4
  config.optim.learning_rate = REGIMES[regime]
  config.optim.warmup_steps = 5
  config.warm_start.steps = 150
  config.warm_start.target_train_pass_rate = None  # a fixed 150 steps (measured above)
  config.warm_start.batch_size = 64
  config.warm_start.optim.learning_rate = 3e-3
  config.eval.num_examples = 50
  config.eval.num_samples = 8
  config.eval.k = (4, 8)
  config.checkpoint.every = 25
  return config


def _geometric(clip_mode: str, epsilon: float) -> dict[str, Any]:
  return {
      "objective": "geometric",
      "loss_agg_mode": "seq-mean-token-mean",
      "algorithm.objective_kwargs": {
          "epsilon_low": epsilon,
          "epsilon_high": epsilon,
          "clip_mode": clip_mode,
      },
  }


def _power_mean(p: float) -> dict[str, Any]:
  return {
      "objective": "power_mean",
      "loss_agg_mode": "seq-mean-token-mean",
      "algorithm.objective_kwargs": {
          "epsilon_low": 0.4,
          "epsilon_high": 0.4,
          "clip_mode": "token",
          "p": p,
      },
  }


def get_grid(name: str) -> Mapping[str, Mapping[str, Any]]:
  """Named grid points for `experiments/launch.py --grid-preset=NAME`.

  'gmpo_design' (point -> what it sets; keys are config paths or launcher aliases):
    gmpo_full      GMPO as published: geometric mean, token-level clip, range e^±0.4
    gmpo_noclip    the same without any clip
    gmpo_seqclip   the clip applied once per sequence, to the product of its token ratios
                   (the official code's `seqclip`: clamp Σ_t δ_t, then take the 1/|o| root)
    gmpo_clip0.2   token-level clip, range e^±0.2
    gmpo_clip0.8   token-level clip, range e^±0.8
    grpo           GRPO: arithmetic mean of the token-clipped surrogate, range [0.8, 1.2]
    pm_p1          the power mean of the token-clipped ratios (`gmpo_jax.power_mean_loss`)
                   with p = 1 (arithmetic mean), e^±0.4; gmpo_full is its p = 0
    pm_pm1         the same with p = -1 (harmonic mean)
  All use seq-mean-token-mean aggregation (GRPO as published: mean over tokens, then over
  sequences), so GRPO and GMPO differ only in the mean they take.

  'gmpo_stress': the points whose stability the paper contrasts (gmpo_full, gmpo_noclip,
  gmpo_seqclip, grpo), for the `stress` regime, where a 5-seed run of the whole design grid
  would not fit the hour the two grids get on 2 CPU cores.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  grids = {
      "gmpo_design": {
          "gmpo_full": _geometric("token", 0.4),
          "gmpo_noclip": _geometric("none", 0.4),
          "gmpo_seqclip": _geometric("sequence", 0.4),
          "gmpo_clip0.2": _geometric("token", 0.2),
          "gmpo_clip0.8": _geometric("token", 0.8),
          "grpo": {
              "objective": "token_clip",
              "loss_agg_mode": "seq-mean-token-mean",
              "algorithm.objective_kwargs": {"epsilon_low": 0.2, "epsilon_high": 0.2},
          },
          "pm_p1": _power_mean(1.0),
          "pm_pm1": _power_mean(-1.0),
      },
  }
  grids["gmpo_stress"] = {
      point: grids["gmpo_design"][point]
      for point in ("gmpo_full", "gmpo_noclip", "gmpo_seqclip", "grpo")
  }
  if name not in grids:
    raise ValueError(f"unknown grid {name!r}; known: {sorted(grids)}")
  return grids[name]
