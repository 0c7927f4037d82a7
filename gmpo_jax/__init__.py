"""gmpo_jax: group-relative policy optimization for language models in JAX.

Two methods share the name GMPO, and both live here, orthogonally:
the log-reward geometric-mean *baseline* (`gmpo_advantages`) and the geometric-mean policy
*objective* of Zhao et al. 2025 (`geometric_mean_loss`). Each is the p = 0 member of a power-mean
family (`power_mean_advantages`, `power_mean_loss`). Any advantage estimator combines with any
objective. This module only re-exports the public API.
"""

from gmpo_jax.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_std_advantages,
    dr_grpo_advantages,
    get_advantage_fn,
    gmpo_advantages,
    grpo_advantages,
    maxrl_advantages,
    power_mean_advantages,
    reward_domain,
    rloo_advantages,
    validate_rewards,
)
from gmpo_jax.algo.aggregation import AGGREGATION_MODES, LossExtras, aggregate_loss
from gmpo_jax.algo.kl import KL_ESTIMATORS, entropy_from_logits, kl_penalty
from gmpo_jax.algo.losses import (
    CLIP_MODES,
    POLICY_LOSSES,
    geometric_mean_loss,
    get_policy_loss,
    gspo_loss,
    power_mean_loss,
    token_clip_loss,
)
from gmpo_jax.algo.reward_shape import recommend_advantage, reward_diagnostics
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.models.hf_export import export_hf

__version__ = "0.1.0"

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "AlgorithmConfig",
    "CLIP_MODES",
    "KL_ESTIMATORS",
    "LossExtras",
    "POLICY_LOSSES",
    "aggregate_loss",
    "batch_std_advantages",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "export_hf",
    "geometric_mean_loss",
    "get_advantage_fn",
    "get_policy_loss",
    "gmpo_advantages",
    "grpo_advantages",
    "gspo_loss",
    "kl_penalty",
    "maxrl_advantages",
    "power_mean_advantages",
    "power_mean_loss",
    "recommend_advantage",
    "reward_diagnostics",
    "reward_domain",
    "rloo_advantages",
    "token_clip_loss",
    "validate_rewards",
]
