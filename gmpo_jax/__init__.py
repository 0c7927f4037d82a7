"""gmpo_jax: group-relative policy optimization for language models in JAX.

Two methods share the name GMPO, and both live here, orthogonally:
the log-reward geometric-mean *baseline* (`gmpo_advantages`) and the geometric-mean policy
*objective* of Zhao et al. 2025 (`geometric_mean_loss`). Any advantage estimator combines with
any objective. This module only re-exports the public API.
"""

from gmpo_jax.advantages import ADVANTAGE_ESTIMATORS
from gmpo_jax.advantages import batch_std_advantages
from gmpo_jax.advantages import dr_grpo_advantages
from gmpo_jax.advantages import get_advantage_fn
from gmpo_jax.advantages import gmpo_advantages
from gmpo_jax.advantages import grpo_advantages
from gmpo_jax.advantages import rloo_advantages
from gmpo_jax.advantages import validate_rewards
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.kl import KL_ESTIMATORS
from gmpo_jax.kl import entropy_from_logits
from gmpo_jax.kl import kl_penalty
from gmpo_jax.losses import AGGREGATION_MODES
from gmpo_jax.losses import POLICY_LOSSES
from gmpo_jax.losses import LossExtras
from gmpo_jax.losses import aggregate_loss
from gmpo_jax.losses import geometric_mean_loss
from gmpo_jax.losses import get_policy_loss
from gmpo_jax.losses import gspo_loss
from gmpo_jax.losses import token_clip_loss

__version__ = "0.1.0"

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "AlgorithmConfig",
    "KL_ESTIMATORS",
    "LossExtras",
    "POLICY_LOSSES",
    "aggregate_loss",
    "batch_std_advantages",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "geometric_mean_loss",
    "get_advantage_fn",
    "get_policy_loss",
    "gmpo_advantages",
    "grpo_advantages",
    "gspo_loss",
    "kl_penalty",
    "rloo_advantages",
    "token_clip_loss",
    "validate_rewards",
]
