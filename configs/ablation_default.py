"""The ablations where RL learns: the default task and policy, every point paired by seed.

    python experiments/launch.py --config=configs/ablation_default.py --grid-preset=gmpo_design \\
        --shared-warm-start --seeds=5 --parallel=2 --out=results/default_gmpo_design
    python experiments/launch.py --config=configs/ablation_default.py \\
        --grid-preset=advantage_family --shared-warm-start --seeds=5 --parallel=2 \\
        --out=results/default_advantage_family

The base run is `configs/default.py` unchanged in what it trains (2-digit addition, the 128-wide
char-level policy, a warm start to a train pass rate of 0.3, 500 RL steps of 32 prompts x 8
completions, 2 epochs x 4 minibatches at lr 1e-4), where RL adds +0.24 ± 0.11 held-out greedy
pass@1 over 10 seeds (README), unlike the one-digit grid of `configs/ablation_gmpo.py`. Two
things differ:

- the advantage is GRPO's (group-normalized), as in the GMPO paper's ablations, and the
  objective GMPO's (token clip e^±0.4, seq-mean-token-mean): each grid varies one half;
- the held-out evaluation samples n = 64 completions per prompt (pass@k for k up to 64, the
  curve MaxRL's claim is about; `experiments/aggregate.py` computes every k = 1..64 from the
  saved per-prompt results), every 250 steps: a 64-sample evaluation of the 500 prompts costs
  as much sampling as ~125 RL steps, so the default's every-100 would add more than half again
  to a run.

With `--shared-warm-start` each seed's warm start runs once (`warm_start.init_from`), so the
points of a seed share their starting policy, data order and sampling keys and differ only in
what the grid changes; `aggregate` pairs them by seed.
"""

from collections.abc import Mapping
from typing import Any

from configs import ablation_gmpo, default

_AGG = "seq-mean-token-mean"


def get_config():
  config = default.get_config()
  config.progress = False
  config.eval_every = 250
  config.algorithm.advantage = "grpo"
  config.algorithm.advantage_kwargs = {"normalize": True}
  config.algorithm.objective = "geometric"
  config.algorithm.objective_kwargs = {"epsilon_low": 0.4, "epsilon_high": 0.4}
  config.algorithm.loss_agg_mode = _AGG
  config.eval.num_samples = 64
  config.eval.k = (2, 4, 8, 16, 32, 64)
  return config


def _advantage(name: str, **kwargs: Any) -> dict[str, Any]:
  return {"advantage": name, "algorithm.advantage_kwargs": kwargs}


def get_grid(name: str) -> Mapping[str, Mapping[str, Any]]:
  """Named grid points for `experiments/launch.py --grid-preset=NAME`; the first point of each
  is the one the others are paired with.

  'gmpo_design' (Zhao et al. 2025, arXiv 2507.20673; GRPO advantage for every point):
    gmpo_full      GMPO as published: geometric mean, token-level clip, range e^±0.4
    gmpo_seqclip   the paper's sequence-level clip (clamp Σ_t δ_t, then the 1/|o| root)
    gmpo_noclip    no clip
    grpo           GRPO's arithmetic mean of the token-clipped surrogate, [0.8, 1.2]
    gmpo_clip0.2   token clip e^±0.2
    gmpo_clip0.8   token clip e^±0.8
    pm_p1          power mean of the clipped ratios, p = 1 (arithmetic), e^±0.4
    pm_pm1         the same, p = −1 (harmonic, HMPO)
  Ordered so that the paper's main contrasts come first when a grid is cut short.

  'advantage_family' (GMPO's objective, token clip e^±0.4, for every point):
    grpo           (R − mean) / (std + ε), ddof 1
    maxrl          (R − mean) / (mean + ε) (Tajwar et al. 2026, arXiv 2602.02710)
    dr_grpo        R − mean (its advantage only: the objective and aggregation stay GMPO's)
    rloo           R_i − mean_{j≠i} R_j
    logr_norm      the founding document's log-reward baseline, ÷ std of log R
    logr           the same, unnormalized
    pm_adv_p0.5    Box–Cox power-mean baseline p = 0.5, normalized (p = 1: GRPO, p = 0: logr_norm)
    pm_adv_pm0.5   the same, p = −0.5

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  grids = {
      # The design points of the small-scale grid, on this task.
      "gmpo_design": ablation_gmpo.get_grid("gmpo_design"),
      "advantage_family": {
          "grpo": _advantage("grpo", normalize=True),
          "maxrl": _advantage("maxrl"),
          "dr_grpo": _advantage("dr_grpo"),
          "rloo": _advantage("rloo"),
          "logr_norm": _advantage("gmpo", normalize=True),
          "logr": _advantage("gmpo", normalize=False),
          "pm_adv_p0.5": _advantage("power_mean", p=0.5, normalize=True),
          "pm_adv_pm0.5": _advantage("power_mean", p=-0.5, normalize=True),
      },
  }
  if name not in grids:
    raise ValueError(f"unknown grid {name!r}; known: {sorted(grids)}")
  return grids[name]
