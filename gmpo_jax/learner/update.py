"""The compiled learner: one optimizer step over a minibatch, split into micro-batches.

One concept: the compiled learner step and the pieces that feed it (its losses, micro-batches,
placement and rescoring), hence its length.

`make_update_fn` turns a per-micro-batch loss into a jitted, buffer-donating step that
accumulates gradients over micro-batches with `lax.scan`, clips and applies them with optax,
and refuses a non-finite update: when the loss or the gradient norm is not finite, the
parameters and optimizer state come back unchanged and `skipped` is 1.

Precision (`gmpo_jax.learner.precision`): gradients accumulate in float32 whatever the
parameters' dtype, the optimizer runs on the float32 view of the parameters (its moments are
float32), and the new values are cast back to the stored dtype (float32 masters by default;
bfloat16 only with the optimizer's stochastic rounding). Every step reports what reached the
stored parameters (`UpdateOutput.relative_change`, `lost_fraction`).

Gradient reduction: on a mesh with a `data` axis (and no `tensor` axis), each data replica
accumulates the gradient of its own rows over the micro-batches and the replicas' sums are
added once, after the scan (`jax.shard_map` over `data`); left to the SPMD partitioner, the
gradient is all-reduced inside the scan, once per micro-batch. Over `fsdp` the gradient is
still reduced (reduce-scattered on TPU/GPU) per micro-batch, which keeps it sharded: the
deferred sum would hold a whole gradient on every device.

The rest of the learner's machinery lives here too, each piece taking the graph definition,
the shardings and the mesh rather than a whole run: the sharded log-prob program of rollout
rows (`make_logprob_fn`), optimizer-state placement (`init_opt_state`), micro-batching
(`to_microbatches`) and batch placement (`place_batch`).

Micro-batching never changes the result: the loss functions receive the number of sequences
and tokens of the whole minibatch (`gmpo_jax.algo.aggregation.aggregate_loss`), so micro-batch losses
and gradients add up to the full-minibatch ones, whatever the split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from gmpo_jax.algo import aggregation
from gmpo_jax.algo import importance as importance_lib
from gmpo_jax.algo import kl as kl_lib
from gmpo_jax.infra import compilation, sharding
from gmpo_jax.learner import precision
from gmpo_jax.models.logprobs import sequence_logprobs, split_model_logprobs

# The mesh axis over which the parameters are replicated and the rows split
# (`gmpo_jax.infra.sharding`): the one gradient reduction the update defers to the step's end.
DATA_AXIS = "data"


class Batch(NamedTuple):
  """Sequences for the learner, stacked as [M, b, ...]: M micro-batches of b sequences.

  Attributes:
    tokens: [M, b, T] int32 prompt then completion (`gmpo_jax.rollout.backends.Rollout` layout).
    positions: [M, b, T] int32 RoPE positions.
    key_mask: [M, b, T] bool, real tokens.
    loss_mask: [M, b, T] bool, the tokens whose log-prob is trained (completion tokens; for
      supervised warm start, the answer tokens).
    old_logp: [M, b, T] float32 log-probs under the rollout policy as the learner rescores it
      at update time, the proximal policy of the ratio (zeros for supervised); None for an
      on-policy update, whose loss takes them from its own forward pass (`policy_loss`).
    ref_logp: [M, b, T] float32 log-probs under the reference policy (zeros when unused).
    advantages: [M, b] float32, one per sequence (zeros for supervised).
    behav_logp: [M, b, T] float32 log-probs under the behaviour policy, the sampler's own
      (`Rollout.policy_logprobs`), for the importance correction; None without one.
  """

  tokens: jax.Array
  positions: jax.Array
  key_mask: jax.Array
  loss_mask: jax.Array
  old_logp: jax.Array | None
  ref_logp: jax.Array
  advantages: jax.Array
  behav_logp: jax.Array | None = None


class Counts(NamedTuple):
  """Global normalizers of a minibatch (see `gmpo_jax.algo.aggregation.aggregate_loss`)."""

  num_sequences: jax.Array
  num_tokens: jax.Array


class PolicyMetrics(NamedTuple):
  """Diagnostics of the policy loss (float32 scalars, or stacked over micro-batches/updates).

  Attributes:
    extras: the objective's `gmpo_jax.algo.aggregation.LossExtras` (clip fractions, ratio statistics,
      approximate KL, KL to the reference).
    entropy: token-mean entropy of the current policy on the trained tokens.
    importance: the applied importance weights' `gmpo_jax.algo.importance.ImportanceStats`; None
      without a correction (`algorithm.is_correction='none'`: nothing is computed or logged).
    mismatch_kl: an on-policy update's `sampler_learner_kl` between its own log-probs and the
      sampler's (`Batch.behav_logp`), token-mean per micro-batch; None otherwise (the runner
      measures it from its rescoring).
  """

  extras: aggregation.LossExtras
  entropy: jax.Array
  importance: importance_lib.ImportanceStats | None = None
  mismatch_kl: jax.Array | None = None

  def combine(self) -> PolicyMetrics:
    """One value per field over every axis (micro-batches, updates): the ratio and weight
    maxima and minima stay extremes, every other field is averaged. Traced inside the update,
    and on the host over the updates of a step: array methods, so NumPy input stays NumPy
    (jnp would compile a program per reduction and shape)."""
    mean = jax.tree.map(lambda x: x.mean(), self)
    combined = mean._replace(
        extras=mean.extras._replace(
            ratio_min=self.extras.ratio_min.min(), ratio_max=self.extras.ratio_max.max()
        )
    )
    if self.importance is None:
      return combined
    return combined._replace(
        importance=mean.importance._replace(weight_max=self.importance.weight_max.max())
    )

  def pool(self, counts: Counts, axis_name: str) -> PolicyMetrics:
    """Each micro-batch's metrics over the devices of `axis_name`, each device holding a
    shard of it: what the whole micro-batch gives, to float rounding.

    Token statistics are averaged with the shards' token counts as weights,
    `fully_clipped_fraction` with their sequence counts, extremes are taken over the shards
    that hold a token; a micro-batch without any token keeps the (common) empty values.

    Args:
      counts: this device's `Counts` of each of its micro-batch shards, [M] each.
      axis_name: the device axis (inside `jax.pmap` / `shard_map`).
    """
    tokens = counts.num_tokens
    any_token = jax.lax.psum(tokens, axis_name) > 0

    def mean(x, weight):
      total = jax.lax.psum(weight, axis_name)
      pooled = jax.lax.psum(weight * x, axis_name) / jnp.maximum(total, 1.0)
      return jnp.where(total > 0, pooled, x)

    def extreme(x, reduce, neutral):
      return jnp.where(any_token, reduce(jnp.where(tokens > 0, x, neutral), axis_name), x)

    pooled = jax.tree.map(lambda x: mean(x, tokens), self)
    pooled = pooled._replace(
        extras=pooled.extras._replace(
            fully_clipped_fraction=mean(self.extras.fully_clipped_fraction, counts.num_sequences),
            ratio_min=extreme(self.extras.ratio_min, jax.lax.pmin, jnp.inf),
            ratio_max=extreme(self.extras.ratio_max, jax.lax.pmax, -jnp.inf),
        )
    )
    if self.importance is None:
      return pooled
    return pooled._replace(
        importance=pooled.importance._replace(
            weight_max=extreme(self.importance.weight_max, jax.lax.pmax, -jnp.inf)
        )
    )

  def as_record(self) -> dict[str, float]:
    """Flat metric names (the `LossExtras` field names, 'entropy', with a correction
    'is/weight_mean', 'is/weight_max', 'is/masked_fraction', and on-policy 'mismatch/kl')
    -> Python floats."""
    record = {
        **{name: float(value) for name, value in self.extras._asdict().items()},
        "entropy": float(self.entropy),
    }
    if self.importance is not None:
      record.update(
          {f"is/{name}": float(value) for name, value in self.importance._asdict().items()}
      )
    if self.mismatch_kl is not None:
      record["mismatch/kl"] = float(self.mismatch_kl)
    return record


# loss(model, micro-batch, counts) -> (scalar loss, its diagnostics; None for none)
MicroLoss = Callable[[nnx.Module, Batch, Counts], tuple[jax.Array, PolicyMetrics | None]]


def sampler_learner_kl(
    learner_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array
) -> jax.Array:
  """Mean k3 estimate of KL(sampler ‖ learner) over the completion tokens ([B, T] each).

  The sampler's own log-probs of its tokens (`Rollout.policy_logprobs`, the untruncated
  temperature-scaled policy) against the learner's log-probs of the same tokens with the same
  parameters: 0 up to numerics. It measures the sampler/learner drift (another dtype, kernel or
  engine) that rescoring π_old hides from the ratio; x = log π_learner − log π_sampler and
  k3 = e^x − x − 1 on tokens drawn from the sampler. No completion token: 0.
  """
  k3 = kl_lib.kl_penalty(sampler_logp, learner_logp, estimator="k3")
  return aggregation.aggregate_loss(k3, mask, mode="token-mean")


def policy_loss(
    objective: Callable[..., tuple[jax.Array, aggregation.LossExtras]],
    *,
    with_reference: bool,
    is_correction: str,
    is_cap: float,
    temperature: float,
    chunk_size: int,
    on_policy: bool = False,
) -> MicroLoss:
  """The RL objective on one micro-batch, plus its `PolicyMetrics`.

  With `is_correction` other than 'none', every token's loss is weighted by the
  importance weight between `batch.old_logp` (the proximal policy) and `batch.behav_logp`
  (the behaviour policy), `gmpo_jax.algo.importance.correction_weights`; with 'none' no weight is
  computed or passed, and the program is the uncorrected one. `gmpo_jax.runner.build.policy_loss`
  makes these arguments from an `AlgorithmConfig`.

  Args:
    objective: a policy objective of `gmpo_jax.algo.losses` with every option bound but the
      per-batch ones (`get_policy_loss`: hyperparameters, aggregation, beta, KL estimator and,
      for 'seq-mean-token-sum-norm', the generation budget as `max_length`); called as
      `objective(logp, old_logp, advantages, mask, ref_logp=, num_sequences=, num_tokens=,
      token_weights=)`.
    with_reference: pass `batch.ref_logp` (the KL penalty's reference, beta > 0); otherwise
      the objective gets None and the batch's reference log-probs are not read.
    is_correction: 'none' or one of `gmpo_jax.algo.importance.IS_CORRECTIONS`.
    is_cap: the correction's cap c > 1; unused with 'none'.
    temperature: the sampler's logit temperature, so the learner's log-probs describe the
      policy that generated the rollout.
    chunk_size: sequence chunk of the memory-lean log-prob computation.
    on_policy: the update is the only one on its rollout and starts from the parameters that
      sampled it (one epoch, one minibatch, no staleness), so π_old is the current policy:
      the loss takes `stop_gradient` of its own log-probs as π_old (the ratio is exactly 1,
      the gradient the same) and `batch.old_logp` is not read, which saves the runner a
      rescoring forward pass. The sampler/learner drift is then measured here, from
      `batch.behav_logp` (`PolicyMetrics.mismatch_kl`).
  """

  def micro_loss(model, batch: Batch, counts: Counts):
    out = sequence_logprobs(
        model,
        batch.tokens,
        batch.positions,
        batch.key_mask,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=True,
    )
    old_logp = jax.lax.stop_gradient(out.logp) if on_policy else batch.old_logp
    weights, stats = None, None
    if is_correction != "none":
      if batch.behav_logp is None:
        raise ValueError(
            f"algorithm.is_correction={is_correction!r} needs the sampler's "
            "log-probs in Batch.behav_logp"
        )
      weights, stats = importance_lib.correction_weights(
          old_logp, batch.behav_logp, batch.loss_mask, mode=is_correction, cap=is_cap
      )
    loss, extras = objective(
        out.logp,
        old_logp,
        batch.advantages,
        batch.loss_mask,
        ref_logp=batch.ref_logp if with_reference else None,
        num_sequences=counts.num_sequences,
        num_tokens=counts.num_tokens,
        token_weights=weights,
    )
    entropy = aggregation.aggregate_loss(
        jax.lax.stop_gradient(out.entropy), batch.loss_mask, mode="token-mean"
    )
    mismatch = (
        sampler_learner_kl(old_logp, batch.behav_logp, batch.loss_mask) if on_policy else None
    )
    return loss, PolicyMetrics(
        extras=extras, entropy=entropy, importance=stats, mismatch_kl=mismatch
    )

  return micro_loss


def supervised_loss(*, chunk_size: int) -> MicroLoss:
  """Token-mean negative log-likelihood of the `loss_mask` tokens (the warm start)."""

  def micro_loss(model, batch: Batch, counts: Counts):
    logp = sequence_logprobs(
        model, batch.tokens, batch.positions, batch.key_mask, chunk_size=chunk_size
    )
    loss = aggregation.aggregate_loss(
        -logp, batch.loss_mask, mode="token-mean", num_tokens=counts.num_tokens
    )
    return loss, None

  return micro_loss


def minibatch_counts(loss_mask: jax.Array) -> Counts:
  """Sequences with at least one trained token, and trained tokens, over all micro-batches."""
  valid = loss_mask.astype(bool)
  return Counts(
      num_sequences=jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32),
      num_tokens=jnp.sum(valid).astype(jnp.float32),
  )


class UpdateOutput(NamedTuple):
  """Diagnostics of one optimizer step (scalars); `metrics` is None for a loss without any.

  `relative_change` and `lost_fraction` are the step's `precision.UpdateStats` on the stored
  parameters; both 0 for a skipped step.
  """

  loss: jax.Array
  grad_norm: jax.Array
  skipped: jax.Array
  metrics: PolicyMetrics | None
  relative_change: jax.Array
  lost_fraction: jax.Array


def make_update_fn(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    micro_loss: MicroLoss,
    *,
    donate: bool = True,
    param_shardings: Any = None,
    opt_shardings: Any = None,
    trainable: Any = None,
):
  """Builds `update(params, opt_state, batch) -> (params, opt_state, UpdateOutput)`, jitted.

  Args:
    graphdef: the model's `nnx.split` graph definition (static).
    optimizer: any optax transformation (clipping and schedules included), whose state was
      made by `init_opt_state` (float32 moments).
    micro_loss: loss on one micro-batch given the minibatch `Counts`; the sum over
      micro-batches is the minibatch loss.
    donate: donate params and optimizer state (the caller must not reuse the inputs).
    param_shardings / opt_shardings: the shardings the parameters and the optimizer state
      keep, in and out (`sharding.state_shardings`, `init_opt_state`); None lets the
      inputs' placement decide. With `NamedSharding`s on a mesh whose `data` axis has
      more than one device and no `tensor` axis, the step runs under `jax.shard_map` over
      `data` (`fsdp` left to the partitioner) so that the gradient is reduced over `data`
      once per step, not once per micro-batch; a batch must then be placed by
      `place_batch`.
    trainable: an `nnx` filter of the parameters the update trains (the LoRA adapters,
      `gmpo_jax.models.lora.LoRAParam`); None: all of them. With a filter, the optimizer state
      covers (and was made by `init_opt_state` from) the trained part only, the gradient is
      taken with respect to it alone, and the rest is a frozen input that is neither donated
      nor returned: the update's output holds the caller's own frozen arrays, never a copy.

  Returns:
    The jitted update. A non-finite loss or gradient norm leaves params and optimizer state
    unchanged and reports `skipped = 1`. The guard is a `jnp.where` over both trees, not
    `optax.apply_if_finite`: measured, the library's `lax.cond` splits the fused AdamW update
    and changes the last bit of 18% of the tiny model's parameters after three steps (so
    recorded runs would no longer reproduce), and it looks only at the gradient, not the loss.
  """
  frozen_shardings = None
  if trainable is not None and param_shardings is not None:
    param_shardings, frozen_shardings = nnx.split_state(param_shardings, trainable, ...)
  extra_specs = () if trainable is None else (P(),)
  mesh = _mesh_of(param_shardings)
  if mesh is not None and reduces_once_over_data(mesh):
    # Parameters, optimizer state and outputs are replicated over `data`; the rows of every
    # micro-batch (axis 1) are split over it, as `place_batch` splits them. Every output is
    # computed from values summed over `data`, so the replicas agree; the replication check
    # is off because the model's loops start from constants that it would have to mark as
    # varying over `data` (`jax.lax.pcast`), for no change in the program.
    step = jax.shard_map(
        update_step(graphdef, optimizer, micro_loss, axis_name=DATA_AXIS),
        mesh=mesh,
        in_specs=(P(), P(), P(None, DATA_AXIS)) + extra_specs,
        out_specs=P(),
        axis_names=frozenset({DATA_AXIS}),
        check_vma=False,
    )
  else:
    step = update_step(graphdef, optimizer, micro_loss)
  shardings = (param_shardings, opt_shardings, None)
  in_shardings = shardings + (() if trainable is None else (frozen_shardings,))
  jitted = jax.jit(
      step,
      donate_argnums=(0, 1) if donate else (),
      in_shardings=in_shardings,
      out_shardings=shardings,
      compiler_options=compilation.learner_compiler_options(),
  )
  if trainable is None:
    return jitted

  def update(params, opt_state, batch):
    trained, frozen = nnx.split_state(params, trainable, ...)
    trained, opt_state, out = jitted(trained, opt_state, batch, frozen)
    return nnx.merge_state(trained, frozen), opt_state, out

  # What callers ask of a jitted function: its compile count (the runner logs it), and the
  # program itself, `jitted(trained, opt_state, batch, frozen)`, to `.lower` ahead of time.
  update._cache_size = jitted._cache_size  # pylint: disable=protected-access
  update.jitted = jitted
  return update


def reduces_once_over_data(mesh: jax.sharding.Mesh) -> bool:
  """Whether `make_update_fn` on `mesh` sums the gradient over `data` once per step (inside
  `jax.shard_map` over `data`) rather than once per micro-batch: a `data` axis of more than one
  device and no `tensor` axis.

  Not with a tensor axis: XLA's SPMD partitioner aborts on the embedding gather of a
  tensor-sharded vocabulary inside a shard_map that leaves `tensor` automatic (jax 0.10.2,
  "Check failed" in ExpandDeviceGroupsWithIota, 2x2x2 mesh); such a mesh keeps the
  per-micro-batch reduction.
  """
  return mesh.shape.get(DATA_AXIS, 1) > 1 and mesh.shape.get("tensor", 1) == 1


def _mesh_of(shardings: Any) -> jax.sharding.Mesh | None:
  """The mesh of a tree of `NamedSharding`s, or None (no shardings, or other kinds)."""
  leaves = jax.tree.leaves(shardings)
  if leaves and isinstance(leaves[0], jax.sharding.NamedSharding):
    return leaves[0].mesh
  return None


def update_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    micro_loss: MicroLoss,
    *,
    axis_name: str | None = None,
):
  """The traceable step that `make_update_fn` compiles (see there): `update(params, opt_state,
  batch, frozen=None)`, where `frozen`, when given, is the untrained rest of the model's state
  and `params` the trained part.

  With `axis_name` (inside `jax.pmap` / `shard_map` over that axis), each device holds a
  shard of every micro-batch: the counts are summed over the axis before the scan, the loss
  and the accumulated gradients once after it, so every device applies the full-minibatch
  update, and each micro-batch's diagnostics are pooled over the devices
  (`PolicyMetrics.pool`) before they are combined over micro-batches as `make_update_fn`
  combines them: the same values as the unsharded step.
  """

  def update(params, opt_state, batch: Batch, frozen=None):
    chex.assert_rank(batch.tokens, 3)
    counts = minibatch_counts(batch.loss_mask)
    if axis_name is not None:
      counts = jax.lax.psum(counts, axis_name)

    def loss_of_params(p, micro):
      states = (p,) if frozen is None else (p, frozen)
      return micro_loss(nnx.merge(graphdef, *states), micro, counts)

    loss, grads, micro_metrics = accumulate_gradients(
        jax.value_and_grad(loss_of_params, has_aux=True), params, batch
    )
    if axis_name is not None:
      loss, grads = jax.lax.psum((loss, grads), axis_name)
      if micro_metrics is not None:
        micro_metrics = micro_metrics.pool(jax.vmap(minibatch_counts)(batch.loss_mask), axis_name)
    params, opt_state, out = apply_gradients(optimizer, params, opt_state, loss, grads)
    metrics = None if micro_metrics is None else micro_metrics.combine()
    return params, opt_state, out._replace(metrics=metrics)

  return update


def apply_gradients(
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    loss: jax.Array,
    grads: Any,
) -> tuple[Any, Any, UpdateOutput]:
  """The optimizer step of `update_step` on the minibatch's summed loss and gradient.

  The optimizer sees float32 values whatever stores the parameters; the result is cast back,
  exactly for float32 masters and for stochastically rounded bfloat16 (`precision`). A
  non-finite loss or gradient norm keeps `params` and `opt_state`.

  Returns:
    (params, opt_state, the step's `UpdateOutput` with `metrics` None).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  masters = precision.float32_view(params)
  updates, new_opt_state = optimizer.update(grads, opt_state, masters)
  new_params = jax.tree.map(
      lambda new, old: new.astype(old.dtype), optax.apply_updates(masters, updates), params
  )
  stats = precision.update_statistics(params, new_params, updates, grads)
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, new_params, params)
  opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  stats = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), stats)
  return (
      params,
      opt_state,
      UpdateOutput(
          loss=loss,
          grad_norm=grad_norm,
          skipped=(~finite).astype(jnp.int32),
          metrics=None,
          relative_change=stats.relative_change,
          lost_fraction=stats.lost_fraction,
      ),
  )


def accumulate_gradients(
    grad_fn: Callable, params: Any, batch: Batch
) -> tuple[jax.Array, Any, PolicyMetrics | None]:
  """Σ_m L_m and Σ_m ∇L_m over the M micro-batches of `batch`, summed in float32.

  The scan's carry is float32 whatever the parameters' (and so the gradients') dtype: a
  bfloat16 sum keeps 8 significant bits, so adding M micro-batch gradients of similar size
  would lose about log2(M) of them, and a small one next to a large sum entirely.

  Args:
    grad_fn: `jax.value_and_grad(loss, has_aux=True)` of `loss(params, micro) ->
      (scalar, diagnostics)`.
    params: the parameters (any float dtype).
    batch: [M, b, ...] micro-batches.

  Returns:
    (the summed loss, float32 scalar; the summed gradient, float32, the tree of `params`;
    the diagnostics stacked over micro-batches, [M] each).
  """

  def accumulate(carry, micro):
    loss_sum, grad_sum = carry
    (loss, metrics), grads = grad_fn(params, micro)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
    return (loss_sum + loss.astype(jnp.float32), grad_sum), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss, grads), metrics = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), batch)
  return loss, grads, metrics


def init_opt_state(
    optimizer: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh
) -> Any:
  """`optimizer.init` of the float32 view of `params`, placed like the parameters it mirrors,
  its scalars replicated.

  The moments are float32 whatever stores the parameters (the update runs the optimizer on
  the same view). Every leaf gets a `NamedSharding` on `mesh`
  (`sharding.opt_state_shardings`), so the update step's explicit input and output
  shardings agree from the first call on (no recompile at step 2). `params` must already
  be placed on `mesh`.
  """
  shardings = sharding.opt_state_shardings(
      optimizer, params, jax.tree.map(lambda x: x.sharding, params), mesh
  )
  return jax.jit(lambda p: optimizer.init(precision.float32_view(p)), out_shardings=shardings)(
      params
  )


def to_microbatches(x: np.ndarray | jax.Array, num: int) -> jax.Array:
  """[N, ...] -> [num, N // num, ...]."""
  if x.shape[0] % num:
    raise ValueError(f"{x.shape[0]} sequences do not split into {num} micro-batches")
  return jnp.reshape(x, (num, x.shape[0] // num) + x.shape[1:])


def place_batch(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
  """Micro-batched arrays [M, b, ...] on `mesh`: b is split over its data axes."""
  return jax.tree.map(
      lambda x: jax.device_put(x, sharding.batch_sharding(mesh, ndim=x.ndim, batch_axis=1)), batch
  )


def make_logprob_fn(
    graphdef: nnx.GraphDef,
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    temperature: float,
    chunk_size: int,
):
  """`logprobs(params, tokens, key_mask) -> [B, T]` of rollout rows, jitted and data-parallel.

  The rows are split over data x fsdp like the learner's batches, and the program is the
  learner's own (same chunking, dtype and temperature as the update), so π_old rescored with
  it matches the update's log-probs at unchanged parameters.
  """
  rows = sharding.batch_sharding(mesh, ndim=2)
  compiled = logprob_program(
      graphdef, param_shardings, mesh, temperature=temperature, chunk_size=chunk_size
  )
  # The sampler's outputs come in the layout XLA chose for it; move them to the rows layout.
  return lambda params, tokens, key_mask: compiled(
      params, jax.device_put(tokens, rows), jax.device_put(key_mask, rows)
  )


def logprob_program(
    graphdef: nnx.GraphDef,
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    temperature: float,
    chunk_size: int,
):
  """The jitted program of `make_logprob_fn`, whose inputs must already be in the rows layout
  (P(('data', 'fsdp')) on B); `.lower` it to compile it ahead of time."""
  rows = sharding.batch_sharding(mesh, ndim=2)
  logprobs = functools.partial(
      split_model_logprobs, graphdef, chunk_size=chunk_size, temperature=temperature
  )
  # The update's compiler options too, so that both programs round alike.
  return jax.jit(
      logprobs,
      in_shardings=(param_shardings, rows, rows),
      out_shardings=rows,
      compiler_options=compilation.learner_compiler_options(),
  )
