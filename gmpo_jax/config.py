"""The validated, hashable algorithm configuration.

Experiment configs are `ml_collections.ConfigDict`s (see `configs/`); the part that decides the
math of an update is turned into `AlgorithmConfig`, a frozen dataclass that checks itself in
`__post_init__` and can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from gmpo_jax import advantages as advantages_lib
from gmpo_jax import kl as kl_lib
from gmpo_jax import losses as losses_lib



def _frozen(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted((mapping or {}).items()))


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """What one policy update computes; every field is validated on construction.

  Attributes:
    advantage: advantage estimator name in `gmpo_jax.ADVANTAGE_ESTIMATORS`.
    advantage_kwargs: its hyperparameters, as sorted (name, value) pairs.
    objective: policy objective name in `gmpo_jax.POLICY_LOSSES`.
    objective_kwargs: its clip hyperparameters (`epsilon_low`, `clip_mode`, ...).
    loss_agg_mode: aggregation over tokens and sequences; None keeps the objective's default.
    num_generations: G, completions per prompt (>= 2: a group of one has no baseline).
    num_epochs: mu, optimisation passes over each rollout batch.
    num_minibatches: optimizer steps per epoch (the rollout batch is split evenly).
    num_microbatches: gradient-accumulation slices of a minibatch; the loss and gradient do not
      depend on it (global token and sequence counts are passed to the loss).
    beta: KL coefficient to the frozen reference policy (0 disables the reference model).
    kl_estimator: 'k1', 'k2' or 'k3'.
    dynamic_sampling: drop groups whose rewards are all equal (DAPO); they carry no signal.
    overlong_buffer: DAPO soft overlong punishment: completions longer than
      `max_new_tokens - overlong_buffer` lose up to `overlong_penalty` reward, linearly (0 disables).
    overlong_penalty: the largest such penalty.
    require_positive_rewards: reject (with the group named) any reward with R + offset <= 0
      before it enters jit; on by default for the log-reward baseline.
  """

  advantage: str = "gmpo"
  advantage_kwargs: tuple[tuple[str, Any], ...] = ()
  objective: str = "geometric"
  objective_kwargs: tuple[tuple[str, Any], ...] = ()
  loss_agg_mode: str | None = None
  num_generations: int = 8
  num_epochs: int = 1
  num_minibatches: int = 1
  num_microbatches: int = 1
  beta: float = 0.0
  kl_estimator: str = "k3"
  dynamic_sampling: bool = False
  overlong_buffer: int = 0
  overlong_penalty: float = 1.0
  require_positive_rewards: bool | None = None

  def __post_init__(self):
    for key in ("loss_agg_mode", "beta", "kl_estimator"):
      if key in dict(self.objective_kwargs):
        raise ValueError(f"set algorithm.{key}, not algorithm.objective_kwargs.{key}")
    # Building the functions checks names and hyperparameters with the registries' own errors.
    self.advantage_fn()
    self.loss_fn()
    if self.loss_agg_mode is not None and self.loss_agg_mode not in losses_lib.AGGREGATION_MODES:
      raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r}; expected one of "
                       f"{losses_lib.AGGREGATION_MODES}")
    if self.num_generations < 2:
      raise ValueError(f"num_generations={self.num_generations}: a group needs >= 2 completions")
    for name in ("num_epochs", "num_minibatches", "num_microbatches"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.beta < 0:
      raise ValueError(f"beta={self.beta} must be >= 0")
    if self.kl_estimator not in kl_lib.KL_ESTIMATORS:
      raise ValueError(f"kl_estimator={self.kl_estimator!r}; expected one of {tuple(kl_lib.KL_ESTIMATORS)}")
    if self.overlong_buffer < 0 or self.overlong_penalty < 0:
      raise ValueError("overlong_buffer and overlong_penalty must be >= 0")
    if self.require_positive_rewards is None:
      domain = advantages_lib.reward_domain(self.advantage, **dict(self.advantage_kwargs))
      object.__setattr__(self, "require_positive_rewards", domain == "positive")

  @property
  def reward_domain(self) -> str:
    """'positive', 'non_negative' or 'real': the rewards the estimator is defined for."""
    return advantages_lib.reward_domain(self.advantage, **dict(self.advantage_kwargs))

  def check_reward_range(self, reward_range: tuple[float, float]) -> None:
    """Raises ValueError, before any work, when a task's rewards can leave the estimator's domain.

    Args:
      reward_range: the task's (smallest, largest) reward (`Task.reward_range`).
    """
    low = reward_range[0]
    if self.require_positive_rewards and low + self.offset <= 0:
      raise ValueError(
          f"advantage={self.advantage!r} takes log(R + offset) and needs R + offset > 0, but the "
          f"task's smallest reward is {low} (offset {self.offset}); raise the task's min_reward "
          "or set algorithm.advantage_kwargs.offset")
    if self.reward_domain == "non_negative" and low < 0:
      raise ValueError(f"advantage={self.advantage!r} needs rewards >= 0, but the task's "
                       f"smallest reward is {low}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> AlgorithmConfig:
    """Builds it from the `algorithm` section of an experiment ConfigDict."""
    fields = dict(config)
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown algorithm options {sorted(unknown)}")
    for key in ("advantage_kwargs", "objective_kwargs"):
      fields[key] = _frozen(fields.get(key))
    return cls(**fields)

  @property
  def offset(self) -> float:
    return float(dict(self.advantage_kwargs).get("offset", 0.0))

  @property
  def agg_mode(self) -> str:
    """The aggregation in force: `loss_agg_mode`, or the objective's own default."""
    if self.loss_agg_mode is not None:
      return self.loss_agg_mode
    signature = inspect.signature(losses_lib.POLICY_LOSSES[self.objective])
    return signature.parameters["loss_agg_mode"].default

  def advantage_fn(self):
    """`(rewards [B, G], mask [B, G]) -> advantages [B, G]`."""
    return advantages_lib.get_advantage_fn(self.advantage, **dict(self.advantage_kwargs))

  def loss_fn(self):
    """The objective with its hyperparameters and aggregation bound; see `gmpo_jax.losses`."""
    kwargs = dict(self.objective_kwargs)
    if self.loss_agg_mode is not None:
      kwargs["loss_agg_mode"] = self.loss_agg_mode
    return losses_lib.get_policy_loss(self.objective, **kwargs)
