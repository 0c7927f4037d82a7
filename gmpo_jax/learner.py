"""The compiled learner: one optimizer step over a minibatch, split into micro-batches.

`make_update_fn` turns a per-micro-batch loss into a jitted, buffer-donating step that
accumulates gradients over micro-batches with `lax.scan`, clips and applies them with optax,
and refuses a non-finite update: when the loss or the gradient norm is not finite, the
parameters and optimizer state come back unchanged and `skipped` is 1.

Micro-batching never changes the result: the loss functions receive the number of sequences
and tokens of the whole minibatch (`gmpo_jax.losses.aggregate_loss`), so micro-batch losses
and gradients add up to the full-minibatch ones, whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gmpo_jax import losses as losses_lib
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.logprobs import sequence_logprobs


class Batch(NamedTuple):
  """Sequences for the learner, stacked as [M, b, ...]: M micro-batches of b sequences.

  Attributes:
    tokens: [M, b, T] int32 prompt then completion (`gmpo_jax.rollout.Rollout` layout).
    positions: [M, b, T] int32 RoPE positions.
    key_mask: [M, b, T] bool, real tokens.
    loss_mask: [M, b, T] bool, the tokens whose log-prob is trained (completion tokens; for
      supervised warm start, the answer tokens).
    old_logp: [M, b, T] float32 log-probs under the rollout policy (zeros for supervised).
    ref_logp: [M, b, T] float32 log-probs under the reference policy (zeros when unused).
    advantages: [M, b] float32, one per sequence (zeros for supervised).
  """
  tokens: jax.Array
  positions: jax.Array
  key_mask: jax.Array
  loss_mask: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  advantages: jax.Array


class Counts(NamedTuple):
  """Global normalizers of a minibatch (see `gmpo_jax.losses.aggregate_loss`)."""
  num_sequences: jax.Array
  num_tokens: jax.Array


# loss(model, micro-batch, counts) -> (scalar loss, dict of scalar metrics to average)
MicroLoss = Callable[[nnx.Module, Batch, Counts], tuple[jax.Array, dict[str, jax.Array]]]


def policy_loss(algo: AlgorithmConfig, *, temperature: float, chunk_size: int,
                max_length: int) -> MicroLoss:
  """The RL objective of `algo` on one micro-batch, plus its diagnostics.

  Args:
    algo: the validated algorithm configuration (objective, clip, aggregation, KL).
    temperature: the sampler's logit temperature, so the learner's log-probs describe the
      policy that generated the rollout.
    chunk_size: sequence chunk of the memory-lean log-prob computation.
    max_length: the generation budget: Dr.GRPO's constant for 'seq-mean-token-sum-norm'.
  """
  loss_fn = algo.loss_fn()
  norm = {"max_length": max_length} if algo.agg_mode == "seq-mean-token-sum-norm" else {}

  def micro_loss(model, batch: Batch, counts: Counts):
    out = sequence_logprobs(model, batch.tokens, batch.positions, batch.key_mask,
                            chunk_size=chunk_size, temperature=temperature, with_entropy=True)
    loss, extras = loss_fn(
        out.logp, batch.old_logp, batch.advantages, batch.loss_mask,
        ref_logp=batch.ref_logp if algo.beta > 0 else None, beta=algo.beta,
        kl_estimator=algo.kl_estimator, num_sequences=counts.num_sequences,
        num_tokens=counts.num_tokens, **norm)
    metrics = dict(extras._asdict())
    metrics["entropy"] = losses_lib.aggregate_loss(
        jax.lax.stop_gradient(out.entropy), batch.loss_mask, mode="token-mean")
    return loss, metrics

  return micro_loss


def supervised_loss(*, chunk_size: int) -> MicroLoss:
  """Token-mean negative log-likelihood of the `loss_mask` tokens (the warm start)."""

  def micro_loss(model, batch: Batch, counts: Counts):
    logp = sequence_logprobs(model, batch.tokens, batch.positions, batch.key_mask,
                             chunk_size=chunk_size)
    loss = losses_lib.aggregate_loss(-logp, batch.loss_mask, mode="token-mean",
                                     num_tokens=counts.num_tokens)
    return loss, {}

  return micro_loss


def minibatch_counts(loss_mask: jax.Array) -> Counts:
  """Sequences with at least one trained token, and trained tokens, over all micro-batches."""
  valid = loss_mask.astype(bool)
  return Counts(num_sequences=jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32),
                num_tokens=jnp.sum(valid).astype(jnp.float32))


class UpdateOutput(NamedTuple):
  """Diagnostics of one optimizer step (scalars)."""
  loss: jax.Array
  grad_norm: jax.Array
  skipped: jax.Array
  metrics: dict[str, jax.Array]


def make_update_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                   micro_loss: MicroLoss, *, donate: bool = True,
                   in_shardings: Any = None, out_shardings: Any = None):
  """Builds `update(params, opt_state, batch) -> (params, opt_state, UpdateOutput)`, jitted.

  Args:
    graphdef: the model's `nnx.split` graph definition (static).
    optimizer: any optax transformation (clipping and schedules included).
    micro_loss: loss on one micro-batch given the minibatch `Counts`; the sum over
      micro-batches is the minibatch loss.
    donate: donate params and optimizer state (the caller must not reuse the inputs).
    in_shardings / out_shardings: explicit shardings of (params, opt_state, batch) and of
      the outputs, as for `jax.jit`; None lets the inputs' placement decide.

  Returns:
    The jitted update. A non-finite loss or gradient norm leaves params and optimizer state
    unchanged and reports `skipped = 1`.
  """
  return jax.jit(update_step(graphdef, optimizer, micro_loss),
                 donate_argnums=(0, 1) if donate else (),
                 in_shardings=in_shardings, out_shardings=out_shardings)


def update_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                micro_loss: MicroLoss, *, axis_name: str | None = None):
  """The traceable step that `make_update_fn` compiles (see there).

  With `axis_name` (inside `jax.pmap` / `shard_map` over that axis), each device holds a
  shard of the minibatch: the counts, loss and gradients are summed over the axis, so every
  device applies the full-minibatch update, and the diagnostics are combined over all
  (device, micro-batch) shards as `make_update_fn` combines micro-batches.
  """

  def update(params, opt_state, batch: Batch):
    chex.assert_rank(batch.tokens, 3)
    counts = minibatch_counts(batch.loss_mask)
    if axis_name is not None:
      counts = jax.lax.psum(counts, axis_name)

    def loss_of_params(p, micro):
      return micro_loss(nnx.merge(graphdef, p), micro, counts)

    grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

    def accumulate(carry, micro):
      loss_sum, grad_sum = carry
      (loss, metrics), grads = grad_fn(params, micro)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (loss_sum + loss, grad_sum), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), micro_metrics = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                                batch)
    if axis_name is not None:
      loss, grads = jax.lax.psum((loss, grads), axis_name)
      micro_metrics = jax.lax.all_gather(micro_metrics, axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = {name: reduce_metric(name, values) for name, values in micro_metrics.items()}
    return params, opt_state, UpdateOutput(loss=loss, grad_norm=grad_norm,
                                           skipped=(~finite).astype(jnp.int32), metrics=metrics)

  return update


def reduce_metric(name: str, values: Any) -> jax.Array:
  """Combines diagnostics of several micro-batches or updates: extremes stay extremes, the
  rest are averaged."""
  if name.endswith("_min"):
    return jnp.min(values)
  if name.endswith("_max"):
    return jnp.max(values)
  return jnp.mean(values)
