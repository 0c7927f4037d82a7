"""The `jax.pmap` form of the RL update: data parallel over devices, parameters replicated.

`config.parallelism = 'pmap'` makes the runner use it instead of the Mesh program of
`gmpo_jax.learner.update.make_update_fn`. The step is the same `learner.update_step`, run per device
with `axis_name`: each of the D devices gets 1/D of the sequences of every micro-batch, and

1. the number of sequences and tokens of the minibatch is summed over the devices
   (`lax.psum`), so each device's loss is its share of the full-minibatch loss;
2. the losses and gradients are summed over the devices: every device holds the
   full-minibatch gradient and applies the same optimizer update;
3. each micro-batch's diagnostics are pooled over the devices (`PolicyMetrics.pool`).

So the update, its loss and its diagnostics equal the Mesh path's (and one device's) to float
rounding, whatever D: with global counts the per-device losses add up to the full-batch loss
of the aggregation mode in force, so the GMPO objective (Zhao et al. 2025, "Geometric-Mean
Policy Optimization", arXiv 2507.20673) does not change scale with the data-parallel size, a
fault of some of its ports.

The parameters and optimizer state enter pmap broadcast (`in_axes=None`) and leave it unmapped
(`out_axes=None`): one replicated copy on the run's mesh, as the Mesh path keeps them, with no
stacked [D, ...] copy. The whole step is jitted with the Mesh path's in/out shardings and
donation, so the runner swaps one builder for the other and nothing else changes. Advantages
come from the runner, computed once over the whole batch for both paths, so every estimator
(the cross-group 'batch_std' included) and any minibatch shuffle work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx

from gmpo_jax.learner import update as learner

AXIS_NAME = "devices"


def make_pmap_update_fn(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    micro_loss: learner.MicroLoss,
    *,
    devices: Sequence[jax.Device],
    donate: bool = True,
    param_shardings: Any = None,
    opt_shardings: Any = None,
):
  """Builds `update(params, opt_state, batch) -> (params, opt_state, UpdateOutput)`.

  The same contract as `learner.make_update_fn` (see there), computed by `jax.pmap` over
  `devices`.

  Args:
    graphdef: the model's `nnx.split` graph definition.
    optimizer: any optax transformation.
    micro_loss: the micro-batch loss, e.g. `gmpo_jax.runner.build.policy_loss(algo, ...)`.
    devices: the D devices to map over (the runner passes its mesh's, in mesh order, so a
      batch placed by `learner.place_batch` is already where pmap wants it).
    donate: donate the params and optimizer state buffers.
    param_shardings / opt_shardings: the replicated shardings the parameters and optimizer
      state keep, in and out; None lets the inputs' placement decide.

  Returns:
    The jitted step. `batch` is [M, b, ...] as for the Mesh path; b must be a multiple of D
    (a ValueError at the first call otherwise).
  """
  num_devices = len(devices)
  per_device = jax.pmap(
      learner.update_step(graphdef, optimizer, micro_loss, axis_name=AXIS_NAME),
      axis_name=AXIS_NAME,
      in_axes=(None, None, 1),
      out_axes=None,
      devices=devices,
  )

  def split(x):
    size = x.shape[1]
    if size % num_devices:
      raise ValueError(
          f"micro-batches of {size} sequences do not split over " f"{num_devices} devices"
      )
    return x.reshape(x.shape[:1] + (num_devices, size // num_devices) + x.shape[2:])

  # pmap runs on its own 1-D mesh of `devices`, which must be the context mesh while it is
  # traced; the runner traces under its (data, fsdp, tensor) mesh.
  own_mesh = jax.sharding.Mesh(devices, (AXIS_NAME,)).abstract_mesh

  def update(params, opt_state, batch: learner.Batch):
    with jax.sharding.use_abstract_mesh(own_mesh):
      return per_device(params, opt_state, jax.tree.map(split, batch))

  shardings = (param_shardings, opt_shardings, None)
  return jax.jit(
      update,
      donate_argnums=(0, 1) if donate else (),
      in_shardings=shardings,
      out_shardings=shardings,
  )
