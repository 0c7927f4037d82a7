"""The data-parallel `jax.pmap` path: advantages -> loss -> gradients -> update, per device.

Each device holds whole groups of a rollout batch (g groups of G completions, n = g·G
sequences) and a copy of the parameters and optimizer state. On every device:

1. group advantages from its own groups' rewards (per-group estimators only);
2. the micro-batched loss and gradient of `gmpo_jax.learner.update_step`, with the number of
   sequences and tokens summed over all devices (`lax.psum`), so that each device's loss is
   its share of the full-batch loss;
3. `lax.psum` of the losses and gradients: every device then holds the full-batch gradient
   and applies the same optimizer update, so the copies stay identical.

The result equals the jitted Mesh path (`learner.make_update_fn` on a `sharding.make_mesh`
mesh) and a single device, whatever the device count: with global counts, per-device losses
add up to the full-batch loss of the aggregation mode in force, so the GMPO objective (Zhao
et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673) does not change scale
with the data-parallel size, a fault of some of its ports. Diagnostics are combined over all
(device, micro-batch) shards exactly as the Mesh path combines micro-batches.

The Mesh path is the one the runner uses (it also shards parameters: FSDP, tensor
parallelism); this path replicates parameters and suits data parallelism on one host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gmpo_jax import learner
from gmpo_jax.config import AlgorithmConfig

AXIS_NAME = "devices"
# Estimators whose advantage of one group depends on other groups (batch_std divides by the
# standard deviation over the whole batch): a device holding some groups cannot compute them.
CROSS_GROUP_ESTIMATORS = frozenset({"batch_std"})


class GroupShard(NamedTuple):
  """One device's share of a rollout batch: g whole groups, their n = g·G sequences.

  Sequence i belongs to group i // G (the runner's group-major layout). For `jax.pmap`,
  every field is stacked on a leading device axis D (`split_across_devices`).

  Attributes:
    tokens: [n, T] int32 prompt then completion.
    positions: [n, T] int32 RoPE positions.
    key_mask: [n, T] bool, real tokens.
    loss_mask: [n, T] bool, trained (completion) tokens.
    old_logp: [n, T] float32 log-probs under the rollout policy.
    ref_logp: [n, T] float32 log-probs under the reference policy (zeros when beta = 0).
    rewards: [g, G] float32.
    group_mask: [g, G] bool, valid completions; a masked completion gets advantage 0 and
      none of its tokens is trained or counted (dynamic sampling drops whole groups so).
  """
  tokens: jax.Array
  positions: jax.Array
  key_mask: jax.Array
  loss_mask: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  rewards: jax.Array
  group_mask: jax.Array


class PmapOutput(NamedTuple):
  """Per device (stacked [D, ...] by pmap): the update's diagnostics and the advantages [g, G]."""
  update: learner.UpdateOutput
  advantages: jax.Array


def make_pmap_update_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                        algo: AlgorithmConfig, micro_loss: learner.MicroLoss, *,
                        devices: Sequence[jax.Device] | None = None, donate: bool = True):
  """Builds `step(params, opt_state, shard) -> (params, opt_state, PmapOutput)`, pmapped.

  Â = advantage(R, mask) per group; loss = Σ_devices Σ_micro loss(micro; global counts);
  θ ← optimizer(Σ_devices ∇loss) on every device.

  Args:
    graphdef: the model's `nnx.split` graph definition.
    optimizer: any optax transformation.
    algo: the algorithm: its advantage estimator and `num_microbatches` are used here.
    micro_loss: the micro-batch loss, e.g. `learner.policy_loss(algo, ...)`.
    devices: the devices to run on (default: all local devices); D = len(devices).
    donate: donate the params and optimizer state buffers.

  Returns:
    The pmapped step. Its inputs carry a leading device axis: params and opt_state as from
    `replicate`, the shard as from `split_across_devices`; n must be a multiple of
    `algo.num_microbatches`. A non-finite loss or gradient norm leaves params and optimizer
    state unchanged on every device (`skipped = 1`), as in `learner.make_update_fn`.

  Raises:
    ValueError: an estimator that couples groups (`batch_std`): use the Mesh path.
  """
  if algo.advantage in CROSS_GROUP_ESTIMATORS:
    raise ValueError(f"advantage estimator {algo.advantage!r} couples the groups of the whole "
                     "batch and cannot run per device under pmap; use the Mesh path "
                     "(learner.make_update_fn on a sharding.make_mesh mesh)")
  advantage_fn = algo.advantage_fn()
  num_micro = algo.num_microbatches
  step = learner.update_step(graphdef, optimizer, micro_loss, axis_name=AXIS_NAME)

  def per_device(params, opt_state, shard: GroupShard):
    chex.assert_rank([shard.tokens, shard.rewards], [2, 2])
    chex.assert_equal_shape([shard.tokens, shard.positions, shard.key_mask, shard.loss_mask,
                             shard.old_logp, shard.ref_logp])
    chex.assert_equal_shape([shard.rewards, shard.group_mask])
    num_sequences = shard.tokens.shape[0]
    if num_sequences != shard.rewards.size:
      raise ValueError(f"{num_sequences} sequences per device but rewards of shape "
                       f"{shard.rewards.shape}: expected one sequence per reward")
    if num_sequences % num_micro:
      raise ValueError(f"{num_sequences} sequences per device do not split into "
                       f"{num_micro} micro-batches")
    advantages = advantage_fn(shard.rewards, shard.group_mask)
    valid = shard.group_mask.reshape(-1)
    batch = learner.Batch(
        tokens=shard.tokens, positions=shard.positions, key_mask=shard.key_mask,
        loss_mask=shard.loss_mask & valid[:, None], old_logp=shard.old_logp,
        ref_logp=shard.ref_logp, advantages=advantages.reshape(-1))
    batch = jax.tree.map(
        lambda x: x.reshape((num_micro, num_sequences // num_micro) + x.shape[1:]), batch)
    params, opt_state, out = step(params, opt_state, batch)
    return params, opt_state, PmapOutput(update=out, advantages=advantages)

  return jax.pmap(per_device, axis_name=AXIS_NAME, devices=devices,
                  donate_argnums=(0, 1) if donate else ())


def replicate(tree: Any, num_devices: int) -> Any:
  """Stacks `num_devices` copies of every leaf on a new leading axis (pmap's input layout)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + jnp.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of every leaf of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def split_across_devices(tree: Any, num_devices: int) -> Any:
  """[N, ...] -> [num_devices, N / num_devices, ...] for every leaf, in order.

  Raises:
    ValueError: a leading dimension that `num_devices` does not divide.
  """

  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"a leading dimension of {x.shape[0]} does not split over "
                       f"{num_devices} devices")
    return jnp.reshape(x, (num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(split, tree)
