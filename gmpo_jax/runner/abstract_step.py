"""The programs of one RL step on abstract shapes: compiled for a mesh, never run.

One concept: each program of the step built on abstract, sharded inputs, hence its length.

`gmpo_jax.runner.tpu_plan` compiles these for a TPU topology from a CPU host. Every argument is
a `jax.ShapeDtypeStruct` carrying the `NamedSharding` the runner gives it, so neither weights,
tokenizer nor data are needed. The four programs of a step (`PROGRAMS`):

  * `update`: one optimizer step over a minibatch of M micro-batches, the learner's own
    `gmpo_jax.learner.update.make_update_fn`, with its shardings and donation;
  * `logprob`: π_old (or π_ref) rescoring of every rollout row,
    `gmpo_jax.learner.update.logprob_program`;
  * `prefill` and `decode`: the two halves of `gmpo_jax.rollout.sampling.generate`'s program,
    compiled apart so each can be measured: the prompt pass that fills the KV cache and picks
    the first token, and one decode step (the body of its loop), with the cache at full
    capacity P + N. Both read the sampler's copy of the parameters, in the compute dtype
    (`gmpo_jax.runner.build.Run.sampler_params`). Top-k / top-p truncation (a sort under a
    `lax.cond`, off by default) is left out.

With `config.model.lora` the policy is the adapted model the runner trains
(`gmpo_jax.runner.build.attach_lora`): the base stored as `lora.base_dtype` (cast or quantized)
and frozen, float32 adapters; the optimizer state, the gradients and the update's donated
arguments and outputs cover the adapters alone, the base entering the update as an input it
neither donates nor returns; the sampler and the log-prob rescoring run the adapted model, on
the learner's own base arrays.

Two more exist to cost the update per micro-batch: `gradient_program`, the body of its
micro-batch loop, and `optimizer_program`, what follows the loop. The sampler shares the
learner's mesh and parameter shardings (`config.rollout.devices` None).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmpo_jax.config import ExperimentConfig, ModelConfig
from gmpo_jax.infra import hbm, sharding
from gmpo_jax.learner import precision
from gmpo_jax.learner import update as learner
from gmpo_jax.models import hf_import, tokenization
from gmpo_jax.models import lora as lora_lib
from gmpo_jax.models.logprobs import positions_from_mask, project_logits
from gmpo_jax.models.transformer import (
    Transformer,
    TransformerConfig,
    default_cache_dtype,
    init_cache,
)
from gmpo_jax.rollout.sampling import prompt_bucket
from gmpo_jax.runner import build
from gmpo_jax.runner.build import make_optimizer, model_dtypes

PROGRAMS = ("prefill", "decode", "logprob", "update")


def model_config(model: ModelConfig, *, vocab_size: int | None = None) -> TransformerConfig:
  """The policy's architecture as `gmpo_jax.runner.build.build_model` builds it, from config only.

  With `hf_path`, the checkpoint's config.json (`hf_import.read_config`; the weights are not
  read) and the overrides allowed on it; otherwise the named config with `overrides` and the
  tokenizer's vocabulary (`'char'` needs no file) or `vocab_size`. The dtypes are the runner's
  (`build.model_dtypes`: float32 masters, the config's compute dtype).

  Raises:
    FileNotFoundError: `hf_path` has no config.json.
  """
  if model.hf_path is not None:
    config = dataclasses.replace(hf_import.read_config(model.hf_path), **dict(model.overrides))
  else:
    if vocab_size is None:
      vocab_size = tokenization.load_tokenizer(model.tokenizer).vocab_size
    config = dataclasses.replace(
        TransformerConfig.from_name(model.name), vocab_size=vocab_size, **dict(model.overrides)
    )
  return dataclasses.replace(config, **model_dtypes(model, config.dtype))


class StepShape(NamedTuple):
  """The sizes of one RL step that pick the programs' shapes.

  Attributes:
    rows: B·G sequences per step.
    prompt_length: P, prompt tokens per row (the sampler pads it to a power of two).
    completion_length: N, `sampling.max_new_tokens`.
    minibatches: optimizer steps per epoch.
    microbatches: M, micro-batches per optimizer step.
    epochs: passes over the rollout (mu).
    on_policy: one epoch of one minibatch: the update takes π_old from its own forward pass.
    rescore_ref: the learner scores π_ref (beta > 0).
  """

  rows: int
  prompt_length: int
  completion_length: int
  minibatches: int
  microbatches: int
  epochs: int
  on_policy: bool
  rescore_ref: bool

  @property
  def length(self) -> int:
    """T = P + N, the learner's sequence width."""
    return self.prompt_length + self.completion_length

  @property
  def minibatch_rows(self) -> int:
    return self.rows // self.minibatches

  @property
  def micro_rows(self) -> int:
    return self.minibatch_rows // self.microbatches

  @property
  def updates(self) -> int:
    """Optimizer steps per RL step."""
    return self.minibatches * self.epochs

  @property
  def rescorings(self) -> int:
    """`logprob` calls per RL step: π_old unless on-policy, π_ref when beta > 0."""
    return int(not self.on_policy) + int(self.rescore_ref)


def step_shape(
    config: ExperimentConfig, *, prompt_length: int, microbatches: int | None = None
) -> StepShape:
  """The `StepShape` of `config` with prompts of `prompt_length` tokens (M overridable)."""
  algo = config.algorithm
  return StepShape(
      rows=config.prompts_per_step * algo.num_generations,
      prompt_length=prompt_length,
      completion_length=config.sampling.max_new_tokens,
      minibatches=algo.num_minibatches,
      microbatches=microbatches or algo.num_microbatches,
      epochs=algo.num_epochs,
      on_policy=algo.num_epochs == 1 and algo.num_minibatches == 1,
      rescore_ref=algo.beta > 0,
  )


class Program(NamedTuple):
  """A jitted function and the abstract arguments it is lowered with."""

  name: str
  jitted: Any
  args: tuple[Any, ...]

  def lower(self, mesh: jax.sharding.Mesh) -> Any:
    """`jitted.lower(*args)` traced under `mesh`, as the runner traces (activations pinned to
    the batch axes, `gmpo_jax.infra.sharding.constrain_to_batch_axes`)."""
    with jax.set_mesh(mesh):
      return self.jitted.lower(*self.args)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _key(mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  """A typed PRNG key, replicated (`sharding.prng_key`)."""
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))


def _rows(
    mesh: jax.sharding.Mesh, shape: tuple[int, ...], dtype: Any, *, batch_axis: int = 0
) -> jax.ShapeDtypeStruct:
  """An abstract array split over data x fsdp along `batch_axis`, as `place_batch` puts it."""
  spec = sharding.batch_sharding(mesh, ndim=len(shape), batch_axis=batch_axis)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)


class AbstractPolicy(NamedTuple):
  """The policy's graph, abstract parameters and their shardings on one mesh, the shardings of
  the sampler's copy (`Run.sampler_shardings`), and its adapters' config (None: every parameter
  is trained)."""

  graphdef: nnx.GraphDef
  params: Any
  shardings: Any
  sampler_shardings: Any
  lora: lora_lib.LoRAConfig | None = None

  @property
  def config(self) -> TransformerConfig:
    return nnx.merge(self.graphdef, self.params).config

  @property
  def trainable(self) -> Any:
    """The filter of the trained parameters, as `Run.trainable`: the adapters, or None (all)."""
    return None if self.lora is None else lora_lib.LoRAParam

  def split(self, tree: Any) -> tuple[Any, Any]:
    """(the trained part, the frozen rest or None) of `params`, `shardings` or a tree like
    them: the split `learner.make_update_fn` makes with `trainable`."""
    if self.lora is None:
      return tree, None
    return nnx.split_state(tree, self.trainable, ...)

  @property
  def trained(self) -> Any:
    """The parameters the optimizer holds (`Run.trained_params`)."""
    return self.split(self.params)[0]

  @property
  def trained_shardings(self) -> Any:
    """The shardings of `trained`."""
    return self.split(self.shardings)[0]


def abstract_policy(
    config: TransformerConfig,
    mesh: jax.sharding.Mesh,
    *,
    lora: lora_lib.LoRAConfig | None = None,
    seed: int = 0,
    hbm_bytes: float | None = None,
) -> AbstractPolicy:
  """`nnx.eval_shape` of the policy as the runner builds it: parameters as shapes, placed by the
  sharding rules.

  Without `lora`, the model of `build.build_model`, and the sampler's copy replicated over fsdp
  when it fits `hbm_bytes` (as `build_run` decides). With `lora`, that model adapted by
  `lora.apply_lora` (adapters drawn from `seed`), as `build.attach_lora` adapts it, and the
  sampler on the learner's shardings, as `attach_lora` places it: it reads the learner's frozen
  base, of which no copy is made.
  """

  def build() -> Transformer:
    model = Transformer(config, rngs=nnx.Rngs(0))
    return model if lora is None else lora_lib.apply_lora(model, lora, seed=seed)

  graphdef, params = nnx.split(nnx.eval_shape(build))
  shardings = sharding.state_shardings(params, mesh)
  if lora is None:
    sampler_shardings = sharding.sampler_copy_shardings(
        shardings,
        mesh,
        copy_bytes=hbm.tree_bytes(_recast(params, config.dtype)),
        hbm_bytes=hbm_bytes,
    )
  else:
    sampler_shardings = shardings
  return AbstractPolicy(graphdef, _abstract(params, shardings), shardings, sampler_shardings, lora)


def _recast(tree: Any, dtype: Any) -> Any:
  """Abstract floating leaves as `dtype`, shapes and shardings kept."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding
      ),
      tree,
  )


def sampler_params(policy: AbstractPolicy) -> Any:
  """The sampler's parameters on the sampler's shardings, as `Run.sampler_params` makes them:
  the trained parameters in the compute dtype (`precision.cast_floating`), and a LoRA policy's
  frozen base as the learner stores it."""
  trained, frozen = policy.split(policy.params)
  cast = _recast(trained, policy.config.dtype)
  params = cast if frozen is None else nnx.merge_state(cast, frozen)
  return _abstract(params, policy.sampler_shardings)


def sampler_copy(policy: AbstractPolicy) -> Any:
  """What the sampler holds beside the learner's arrays: its compute-dtype copy of the trained
  parameters, or None when they are stored in the compute dtype and the sampler reads the
  learner's own (`Run.sampler_params`)."""
  compute = policy.config.dtype
  if all(x.dtype == compute for x in jax.tree.leaves(policy.trained)):
    return None
  return policy.split(sampler_params(policy))[0]


def float32_gradients(policy: AbstractPolicy) -> Any:
  """The gradient accumulators of the update: float32, placed like the trained parameters."""
  return _recast(policy.trained, jnp.float32)


def optimizer_for(
    config: ExperimentConfig, model: TransformerConfig
) -> optax.GradientTransformation:
  """The RL optimizer of `config` (its schedule spans every optimizer step of the run)."""
  algo = config.algorithm
  return make_optimizer(
      config.optim,
      config.num_steps * algo.num_minibatches * algo.num_epochs,
      param_dtype=model.param_dtype,
      seed=config.seed,
  )


def abstract_opt_state(
    optimizer: optax.GradientTransformation, policy: AbstractPolicy, mesh: jax.sharding.Mesh
) -> Any:
  """`learner.init_opt_state` of the trained parameters (`Run.trained_params`) as shapes: float32
  moments placed like them."""
  trained = policy.trained
  shardings = sharding.opt_state_shardings(optimizer, trained, policy.trained_shardings, mesh)
  state = jax.eval_shape(lambda p: optimizer.init(precision.float32_view(p)), trained)
  return _abstract(state, shardings)


def _micro_loss(config: ExperimentConfig, shape: StepShape, chunk_size: int) -> Any:
  return build.policy_loss(
      config.algorithm,
      temperature=config.sampling.logit_temperature,
      chunk_size=chunk_size,
      max_length=config.sampling.max_new_tokens,
      on_policy=shape.on_policy,
  )


def _batch(
    config: ExperimentConfig, mesh: jax.sharding.Mesh, shape: StepShape, rows: tuple[int, ...]
) -> learner.Batch:
  """An abstract `learner.Batch` of [*rows, T] arrays, the last row axis over data x fsdp."""
  dims, axis = rows + (shape.length,), len(rows) - 1

  def per_token(dtype):
    return _rows(mesh, dims, dtype, batch_axis=axis)

  return learner.Batch(
      tokens=per_token(jnp.int32),
      positions=per_token(jnp.int32),
      key_mask=per_token(bool),
      loss_mask=per_token(bool),
      old_logp=None if shape.on_policy else per_token(jnp.float32),
      ref_logp=per_token(jnp.float32),
      advantages=_rows(mesh, rows, jnp.float32, batch_axis=axis),
      behav_logp=(
          per_token(jnp.float32)
          if shape.on_policy or config.algorithm.is_correction != "none"
          else None
      ),
  )


def update_program(
    config: ExperimentConfig,
    policy: AbstractPolicy,
    mesh: jax.sharding.Mesh,
    shape: StepShape,
    *,
    chunk_size: int,
) -> Program:
  """`make_update_fn`'s step over one minibatch [M, b, T], placed as `place_batch` places it.

  Of a LoRA policy, the step `make_update_fn` compiles with its `trainable` filter
  (`update.jitted(adapters, opt_state, batch, base)`): adapters and optimizer state donated and
  returned, the base an input it neither donates nor returns.
  """
  optimizer = optimizer_for(config, policy.config)
  opt_state = abstract_opt_state(optimizer, policy, mesh)
  update = learner.make_update_fn(
      policy.graphdef,
      optimizer,
      _micro_loss(config, shape, chunk_size),
      param_shardings=policy.shardings,
      opt_shardings=jax.tree.map(lambda x: x.sharding, opt_state),
      trainable=policy.trainable,
  )
  batch = _batch(config, mesh, shape, (shape.microbatches, shape.micro_rows))
  trained, frozen = policy.split(policy.params)
  if frozen is None:
    return Program("update", update, (trained, opt_state, batch))
  return Program("update", update.jitted, (trained, opt_state, batch, frozen))


def gradient_program(
    config: ExperimentConfig,
    policy: AbstractPolicy,
    mesh: jax.sharding.Mesh,
    shape: StepShape,
    *,
    chunk_size: int,
) -> Program:
  """One micro-batch's loss and float32 gradient [b, T]: the body of the update's loop.

  As in `make_update_fn`: on a mesh where the update sums the gradient over `data` once per
  step (`learner.reduces_once_over_data`), each `data` replica keeps the gradient of its own
  rows (stacked on a leading `data` axis here, summed by `optimizer_program`); otherwise the
  partitioner reduces it, per micro-batch.
  """
  micro_loss = _micro_loss(config, shape, chunk_size)
  graphdef = policy.graphdef
  trained, frozen = policy.split(policy.params)
  # The frozen base of a LoRA policy is an input whose gradient is not taken (`update_step`).
  extra_args, extra_specs = ((), ()) if frozen is None else ((frozen,), (P(),))

  def gradient(params, micro, counts, frozen=None):
    def loss_of_params(p):
      states = (p,) if frozen is None else (p, frozen)
      return micro_loss(nnx.merge(graphdef, *states), micro, counts)

    (loss, _), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params)
    return loss.astype(jnp.float32), precision.float32_view(grads)

  micro = _batch(config, mesh, shape, (shape.micro_rows,))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  counts = learner.Counts(num_sequences=scalar, num_tokens=scalar)
  if learner.reduces_once_over_data(mesh):
    axis = learner.DATA_AXIS

    def per_replica(*args):
      return jax.tree.map(lambda x: x[None], gradient(*args))

    jitted = jax.jit(
        jax.shard_map(
            per_replica,
            mesh=mesh,
            in_specs=(P(), P(axis), P()) + extra_specs,
            out_specs=P(axis),
            axis_names=frozenset({axis}),
            check_vma=False,
        )
    )
  else:
    jitted = jax.jit(gradient, out_shardings=(sharding.replicated(mesh), policy.trained_shardings))
  return Program("gradient", jitted, (trained, micro, counts) + extra_args)


def optimizer_program(
    config: ExperimentConfig, policy: AbstractPolicy, mesh: jax.sharding.Mesh
) -> Program:
  """What the update does after its micro-batch loop: the gradient summed over `data` where
  `gradient_program` left it per replica, then `learner.apply_gradients` to the trained
  parameters."""
  optimizer = optimizer_for(config, policy.config)
  opt_state = abstract_opt_state(optimizer, policy, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  grads = float32_gradients(policy)
  loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  replicas = learner.reduces_once_over_data(mesh)
  if replicas:
    axis, size = learner.DATA_AXIS, mesh.shape[learner.DATA_AXIS]
    grads = jax.tree.map(
        lambda g: jax.ShapeDtypeStruct(
            (size,) + g.shape, g.dtype, sharding=NamedSharding(mesh, P(axis, *g.sharding.spec))
        ),
        grads,
    )
    loss = jax.ShapeDtypeStruct((size,), jnp.float32, sharding=NamedSharding(mesh, P(axis)))

  def apply(params, opt_state, grads, loss):
    if replicas:
      grads, loss = jax.tree.map(lambda x: x.sum(0), (grads, loss))
    return learner.apply_gradients(optimizer, params, opt_state, loss, grads)

  shardings = (policy.trained_shardings, opt_shardings)
  jitted = jax.jit(apply, donate_argnums=(0, 1), out_shardings=shardings + (None,))
  return Program("optimizer", jitted, (policy.trained, opt_state, grads, loss))


def logprob_program(
    config: ExperimentConfig,
    policy: AbstractPolicy,
    mesh: jax.sharding.Mesh,
    shape: StepShape,
    *,
    chunk_size: int,
) -> Program:
  """Log-probs of every rollout row [B·G, T], rows over data x fsdp (`learner.logprob_program`)."""
  jitted = learner.logprob_program(
      policy.graphdef,
      policy.shardings,
      mesh,
      temperature=config.sampling.logit_temperature,
      chunk_size=chunk_size,
  )
  dims = (shape.rows, shape.length)
  return Program(
      "logprob", jitted, (policy.params, _rows(mesh, dims, jnp.int32), _rows(mesh, dims, bool))
  )


def sampler_batch(config: ExperimentConfig, shape: StepShape) -> tuple[int, int]:
  """(rows, prompt width) of the sampler's program: both padded up to its buckets."""
  sampling = config.sampling
  rows = -(-shape.rows // sampling.batch_multiple) * sampling.batch_multiple
  return rows, prompt_bucket(shape.prompt_length, minimum=sampling.min_prompt_bucket)


def cache_dtype(config: ExperimentConfig, model: TransformerConfig, platform: str) -> Any:
  """The sampler's KV-cache dtype on `platform`: the config's, else the model's default there."""
  return config.sampling.cache_dtype or default_cache_dtype(model, backend=platform)


def _choose(model: Transformer, hidden: jax.Array, key: jax.Array, temperature: float):
  """A token per row and its log-prob, as the sampler draws it (no truncation)."""
  logits = project_logits(hidden, model.unembed_matrix()) * (1.0 / temperature)
  token = jax.random.categorical(key, logits).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
  return token, logp


def prefill_program(
    config: ExperimentConfig,
    policy: AbstractPolicy,
    mesh: jax.sharding.Mesh,
    shape: StepShape,
    *,
    kv_dtype: Any,
) -> Program:
  """The prompt pass of `generate`: [rows, P] prompts -> the filled cache and first tokens."""
  graphdef, temperature = policy.graphdef, config.sampling.logit_temperature
  rows, width = sampler_batch(config, shape)
  capacity = width + shape.completion_length

  def prefill(params, tokens, mask, key):
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, rows, capacity, kv_dtype)
    hidden, cache = model(
        tokens, positions_from_mask(mask), key_mask=mask, cache=cache, read_slots=width
    )
    token, logp = _choose(model, hidden[:, -1], key, temperature)
    return token, logp, cache

  # The host's prompts enter replicated, as `generate`'s NumPy arguments do.
  replicated = sharding.replicated(mesh)
  args = (
      sampler_params(policy),
      jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=replicated),
      jax.ShapeDtypeStruct((rows, width), bool, sharding=replicated),
      _key(mesh),
  )
  jitted = jax.jit(
      prefill, in_shardings=(policy.sampler_shardings, replicated, replicated, replicated)
  )
  return Program("prefill", jitted, args)


def abstract_cache(
    policy: AbstractPolicy, mesh: jax.sharding.Mesh, rows: int, capacity: int, kv_dtype: Any
) -> Any:
  """The KV cache [L, rows, K, S, hd] as the sampler holds it: rows over data x fsdp."""
  cache = jax.eval_shape(lambda: init_cache(policy.config, rows, capacity, kv_dtype))
  per_layer = sharding.batch_sharding(mesh, ndim=5, batch_axis=1)
  shardings = type(cache)(
      k=per_layer,
      v=per_layer,
      key_mask=sharding.batch_sharding(mesh, ndim=2),
      index=sharding.replicated(mesh),
  )
  return _abstract(cache, shardings)


def decode_program(
    config: ExperimentConfig,
    policy: AbstractPolicy,
    mesh: jax.sharding.Mesh,
    shape: StepShape,
    *,
    kv_dtype: Any,
    read_slots: int | None = None,
) -> Program:
  """One decode step of `generate`: feed each row's last token, extend the cache, draw the next.

  The cache is full width (P + N slots) and donated, as the loop carries it; the step attends
  to its first `read_slots` slots (a window of `sampling.read_windows`; None: all P + N).
  """
  graphdef, temperature = policy.graphdef, config.sampling.logit_temperature
  rows, width = sampler_batch(config, shape)
  cache = abstract_cache(policy, mesh, rows, width + shape.completion_length, kv_dtype)

  def decode(params, cache, last, position, done, key):
    model = nnx.merge(graphdef, params)
    hidden, cache = model(
        last[:, None],
        position[:, None],
        key_mask=~done[:, None],
        cache=cache,
        read_slots=read_slots,
    )
    token, logp = _choose(model, hidden[:, 0], key, temperature)
    return token, logp, cache

  row = sharding.batch_sharding(mesh, ndim=1)
  replicated = sharding.replicated(mesh)
  args = (
      sampler_params(policy),
      cache,
      jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row),
      jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row),
      jax.ShapeDtypeStruct((rows,), bool, sharding=row),
      _key(mesh),
  )
  # The sampler's cache lives inside its one jitted program (`sampling._generate_bucketed`),
  # where the compiler lays it out; AUTO lets it choose here too, not the row-major layout a
  # program boundary would impose (for 64-wide heads it keeps the cache slot-minor).
  cache_shardings = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), cache)
  jitted = jax.jit(
      decode,
      donate_argnums=(1,),
      in_shardings=(policy.sampler_shardings, cache_shardings, row, row, row, replicated),
      out_shardings=(row, row, cache_shardings),
  )
  return Program("decode", jitted, args)


def num_chunks(length: int, chunk_size: int) -> int:
  """n, the chunks `gmpo_jax.models.logprobs.token_logprobs` cuts T into (its loop's trips)."""
  return max(math.ceil(length / chunk_size), 1)
