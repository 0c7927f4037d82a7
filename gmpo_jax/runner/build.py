"""Building a run from its config: tokenizer, policy, optimizer, meshes, task data, and the
functions the config's algorithm names (advantage estimator, policy loss).

`build_run` validates everything it can before the first dataset or program is built and
returns the `Run` that the warm start, the RL step and the evaluation share.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from gmpo_jax import tasks as tasks_lib
from gmpo_jax.algo import advantages as advantages_lib
from gmpo_jax.algo import losses as losses_lib
from gmpo_jax.config import AlgorithmConfig, ConfigError, ExperimentConfig, ModelConfig, OptimConfig
from gmpo_jax.infra import distributed, hbm, sharding
from gmpo_jax.learner import precision
from gmpo_jax.learner import update as learner
from gmpo_jax.models import hf_import, lora, tokenization
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout.sampling import SamplingConfig

logger = logging.getLogger(__name__)


def build_tokenizer(model: ModelConfig) -> tokenization.Tokenizer:
  """`model.tokenizer` ('char' or a path); None: the tokenizer.json of `model.hf_path`."""
  return tokenization.load_tokenizer(model.hf_path if model.tokenizer is None else model.tokenizer)


def model_dtypes(model: ModelConfig, default_dtype: Any) -> dict[str, Any]:
  """The policy's `param_dtype` (trained: float32 masters unless the config says bfloat16)
  and compute `dtype` (the config's, else `default_dtype`: the checkpoint's, or float32), as
  `TransformerConfig` fields. A bfloat16 checkpoint thus trains float32 masters with bfloat16
  compute; its values are exactly the checkpoint's at the start."""
  return {
      "param_dtype": model.trained_dtype,
      "dtype": default_dtype if model.dtype is None else model.dtype,
  }


def build_model(model: ModelConfig, tokenizer: tokenization.Tokenizer, *, seed: int) -> Transformer:
  """The policy: a Hugging Face checkpoint from a local path, or a named config at random init,
  with the dtypes of `model_dtypes`."""
  if model.hf_path is not None:
    dtypes = model_dtypes(model, hf_import.read_config(model.hf_path).dtype)
    policy, _ = hf_import.load_hf_checkpoint(
        model.hf_path, **dtypes, overrides=dict(model.overrides)
    )
    return policy
  config = dataclasses.replace(
      TransformerConfig.from_name(model.name),
      vocab_size=tokenizer.vocab_size,
      **dict(model.overrides),
  )
  config = dataclasses.replace(config, **model_dtypes(model, config.dtype))
  # One compiled program for every parameter: built eagerly, each initializer and each shape
  # compiled a program of its own (about 20, some 0.5 s, each kept resident).
  return nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(seed)))()


def advantage_fn(algo: AlgorithmConfig) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(rewards [B, G], mask [B, G]) -> advantages [B, G]`: the estimator `algo.advantage` names,
  with its hyperparameters bound (`gmpo_jax.algo.advantages.get_advantage_fn`)."""
  return advantages_lib.get_advantage_fn(algo.advantage, **dict(algo.advantage_kwargs))


def policy_loss(
    algo: AlgorithmConfig,
    *,
    temperature: float,
    chunk_size: int,
    max_length: int,
    on_policy: bool = False,
) -> learner.MicroLoss:
  """`learner.policy_loss` of `algo`: the objective `algo.objective` names, with its
  hyperparameters, aggregation and KL bound (`gmpo_jax.algo.losses.get_policy_loss`), and the
  importance correction.

  Args:
    algo: the validated algorithm configuration.
    temperature, chunk_size, on_policy: as `learner.policy_loss`.
    max_length: the generation budget: Dr.GRPO's constant for 'seq-mean-token-sum-norm'.
  """
  norm = {"max_length": max_length} if algo.agg_mode == "seq-mean-token-sum-norm" else {}
  objective = losses_lib.get_policy_loss(
      algo.objective,
      **algo.objective_options,
      beta=algo.beta,
      kl_estimator=algo.kl_estimator,
      **norm,
  )
  return learner.policy_loss(
      objective,
      with_reference=algo.beta > 0,
      is_correction=algo.is_correction,
      is_cap=algo.is_cap,
      temperature=temperature,
      chunk_size=chunk_size,
      on_policy=on_policy,
  )


def make_optimizer(
    optim: OptimConfig, total_updates: int, *, param_dtype: Any = "float32", seed: int = 0
) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay, after global-norm clipping; for bfloat16
  parameters, the step then rounded stochastically into bfloat16.

  Args:
    optim: the optimizer's section of the config.
    total_updates: the schedule's length.
    param_dtype: the dtype that stores the trained parameters (`ModelConfig.trained_dtype`).
    seed: the stochastic rounding's keys derive from it (bfloat16 parameters only).

  Raises:
    ConfigError: bfloat16 parameters without `optim.stochastic_rounding`, whose steps at a
      small learning rate would round away (`ExperimentConfig` refuses such a config first).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=min(optim.warmup_steps, max(total_updates - 1, 0)),
      decay_steps=max(total_updates, 1),
      end_value=optim.learning_rate * optim.end_lr_fraction,
  )
  transforms = [
      optax.clip_by_global_norm(optim.max_grad_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
  ]
  if jnp.dtype(param_dtype) == jnp.bfloat16:
    if not optim.stochastic_rounding:
      raise ConfigError(
          "bfloat16 parameters round away small updates: set "
          "optim.stochastic_rounding=True, or train float32 parameters"
      )
    transforms.append(precision.bfloat16_stochastic_rounding(seed))
  elif jnp.dtype(param_dtype) != jnp.float32:
    raise ConfigError(
        f"parameters of dtype {jnp.dtype(param_dtype).name} cannot be trained: "
        "use float32, or bfloat16 with optim.stochastic_rounding=True"
    )
  return optax.chain(*transforms)


@dataclasses.dataclass
class Run:
  """Everything `train_and_evaluate` builds once, shared by warm start, training and eval.

  `config` is the typed configuration; `config_dict` the ConfigDict it came from, whose JSON
  is the experiment's fingerprint (checkpoints, the warm-start cache). `mesh` is the learner's
  (and evaluation's); `sampler_mesh` the RL sampler's, `mesh` itself unless
  `config.rollout.devices` gives the sampler devices of its own.
  """

  config: ExperimentConfig
  config_dict: ml_collections.ConfigDict
  workdir: pathlib.Path
  task: tasks_lib.Task
  tokenizer: tokenization.Tokenizer
  mesh: jax.sharding.Mesh
  sampler_mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  params: Any
  param_shardings: Any
  sampler_shardings: Any
  sampling: SamplingConfig
  train_examples: Sequence[Mapping[str, Any]]
  eval_examples: Sequence[Mapping[str, Any]]
  lora_base: Mapping[str, str] | None = None
  # The frozen base's copy on the sampler's mesh, when the sampler has devices of its own.
  _base_on_sampler: Any = dataclasses.field(default=None, repr=False)

  @property
  def trainable(self) -> Any:
    """The filter of the trained parameters: the adapters once `attach_lora` has run, else
    None (all of them)."""
    return None if self.lora_base is None else lora.LoRAParam

  def trained_params(self, params: Any) -> Any:
    """What the optimizer and the checkpoints hold: the adapters of a LoRA policy, else
    `params` itself."""
    return params if self.lora_base is None else lora.split_adapters(params)[0]

  def with_trained(self, trained: Any, params: Any) -> Any:
    """`params` with its trained part replaced by `trained` (`trained_params`' inverse)."""
    if self.lora_base is None:
      return trained
    return nnx.merge_state(trained, lora.split_adapters(params)[1])

  @property
  def algo(self) -> AlgorithmConfig:
    return self.config.algorithm

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.sampling.all_stop_ids

  @functools.cached_property
  def compute_dtype(self) -> jnp.dtype:
    """The policy's compute dtype (`TransformerConfig.dtype`), that of the sampler's copy."""
    return nnx.merge(self.graphdef, self.params).config.dtype

  @functools.cached_property
  def _to_compute_dtype(self):
    same_devices = self.sampler_mesh is self.mesh
    return jax.jit(
        functools.partial(precision.cast_floating, dtype=self.compute_dtype),
        out_shardings=self.sampler_shardings if same_devices else self.param_shardings,
    )

  @functools.cached_property
  def _adapters_to_compute_dtype(self):
    return jax.jit(
        functools.partial(precision.cast_floating, dtype=self.compute_dtype),
        out_shardings=lora.split_adapters(self.param_shardings)[0],
    )

  def sampler_params(self, params: Any) -> Any:
    """The RL sampler's parameters made from the learner's `params`, once per update.

    In the compute dtype (`ModelConfig.dtype`): float32 masters are cast to a bfloat16 copy,
    which decode reads at half the bytes, and which gives the values the learner's forward
    pass computes with (it casts every weight alike). On the learner's devices the copy is
    made on the sampler's shardings (replicated over fsdp when it fits,
    `sharding.sampler_copy_shardings`: decode then gathers no weight), else on the learner's and then
    moved to the sampler's devices. Parameters already in the compute dtype are the
    learner's arrays themselves when the two share devices and shardings and take turns
    (`max_staleness` 0: the synchronous loop, no copy); otherwise a copy on the sampler's
    shardings, device to device (`jax.device_put`), since the
    learner's next update donates its buffers (`learner.make_update_fn`) while the sampler
    may still be using them.
    """
    if self.lora_base is None:
      return self._copy_for_sampler(params, self._to_compute_dtype, self.sampler_shardings)
    # The frozen base is never donated (`learner.make_update_fn` with a filter), so the sampler
    # reads the learner's own base arrays; only the adapters are copied.
    adapters, base = lora.split_adapters(params)
    sampler_adapter_shardings, sampler_base_shardings = lora.split_adapters(self.sampler_shardings)
    adapters = self._copy_for_sampler(
        adapters, self._adapters_to_compute_dtype, sampler_adapter_shardings
    )
    if self.sampler_mesh is not self.mesh:  # copied once: the base never changes
      if self._base_on_sampler is None:
        self._base_on_sampler = jax.device_put(base, sampler_base_shardings)
      base = self._base_on_sampler
    return nnx.merge_state(adapters, base)

  def _copy_for_sampler(self, params: Any, cast: Any, sampler_shardings: Any) -> Any:
    if any(x.dtype != self.compute_dtype for x in jax.tree.leaves(params)):
      params = cast(params)
      if self.sampler_mesh is self.mesh:
        return params
    elif self.sampler_shardings is self.param_shardings and self.config.rollout.max_staleness == 0:
      return params
    return jax.device_put(params, sampler_shardings, may_alias=False)


def build_run(config_dict: ml_collections.ConfigDict, workdir: pathlib.Path) -> Run:
  """Validates everything it can before the first dataset or program is built."""
  config = ExperimentConfig.from_config(config_dict)
  algo = config.algorithm
  num_sequences = config.prompts_per_step * algo.num_generations
  sampler_mesh, learner_devices = _split_devices(config, num_sequences)
  try:
    mesh = sharding.make_mesh(**dataclasses.asdict(config.mesh), devices=learner_devices)
  except ValueError as error:
    raise ConfigError(f"config.mesh: {error}") from error
  if config.parallelism == "pmap" and jax.process_count() > 1:
    raise ConfigError(
        f"config: parallelism='pmap' maps over one process's devices; this run "
        f"has {jax.process_count()} processes: use parallelism='mesh'"
    )
  multiple = sharding.batch_size_multiple(mesh) * algo.num_minibatches * algo.num_microbatches
  if num_sequences % multiple:
    raise ConfigError(
        f"config: prompts_per_step x algorithm.num_generations = {num_sequences} must be a "
        f"multiple of mesh data x fsdp x algorithm.num_minibatches x num_microbatches = {multiple}"
    )
  try:
    task = tasks_lib.get_task(config.task.name, **dict(config.task.kwargs))
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.task: {error}") from error
  try:
    algo.check_reward_range(task.reward_range)
  except ValueError as error:
    raise ConfigError(f"config.algorithm: {error}") from error
  data_dir = str(workdir / "data") if config.task.data_dir is None else config.task.data_dir
  train_examples, eval_examples = distributed.primary_first(
      lambda: tuple(
          task.load(split, data_dir=data_dir)
          for split in (config.task.train_split, config.task.eval_split)
      ),
      name="task_data",
  )
  tokenizer = build_tokenizer(config.model)
  model = build_model(config.model, tokenizer, seed=config.seed)
  graphdef, params = nnx.split(model)
  mesh = _fitted_mesh(config, mesh, params)
  param_shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  if sampler_mesh is None:
    sampler_mesh = mesh
    copy_bytes = hbm.tree_bytes(
        jax.eval_shape(functools.partial(precision.cast_floating, dtype=model.config.dtype), params)
    )
    sampler_shardings = sharding.sampler_copy_shardings(
        param_shardings,
        mesh,
        copy_bytes=copy_bytes,
        hbm_bytes=hbm.device_hbm_bytes(mesh.devices.flat[0]),
    )
  else:
    sampler_shardings = sharding.state_shardings(params, sampler_mesh)
  sampling_config = dataclasses.replace(
      config.sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id
  )
  return Run(
      config=config,
      config_dict=config_dict,
      workdir=workdir,
      task=task,
      tokenizer=tokenizer,
      mesh=mesh,
      sampler_mesh=sampler_mesh,
      graphdef=graphdef,
      params=params,
      param_shardings=param_shardings,
      sampler_shardings=sampler_shardings,
      sampling=sampling_config,
      train_examples=train_examples,
      eval_examples=eval_examples,
  )


def _fitted_mesh(
    config: ExperimentConfig, mesh: jax.sharding.Mesh, params: Any
) -> jax.sharding.Mesh:
  """The learner's mesh, with FSDP over its data devices when a replicated copy of the
  parameters and Adam state would not fit a device (`hbm.auto_fsdp`; docs/tpu.md)."""
  algo = config.algorithm
  optimizer = make_optimizer(
      config.optim,
      config.num_steps * algo.num_epochs * algo.num_minibatches,
      param_dtype=config.model.trained_dtype,
      seed=config.seed,
  )
  state_bytes = hbm.tree_bytes(params) + hbm.tree_bytes(
      jax.eval_shape(lambda p: optimizer.init(precision.float32_view(p)), params)
  )
  devices = list(mesh.devices.flat)
  choice = hbm.auto_fsdp(
      data=mesh.shape["data"],
      fsdp=mesh.shape["fsdp"],
      tensor=mesh.shape["tensor"],
      num_devices=len(devices),
      state_bytes=state_bytes,
      hbm_bytes=hbm.device_hbm_bytes(devices[0]),
  )
  if not choice.sharded:
    return mesh
  logger.info("mesh: %s", choice.reason)
  return sharding.make_mesh(
      data=choice.data, fsdp=choice.fsdp, tensor=choice.tensor, devices=devices
  )


def attach_lora(run: Run, *, base_path: str) -> None:
  """Turns `run`'s policy into the frozen base of a LoRA policy (`config.model.lora`), in place.

  The base (the checkpoint, or the warm start's policy) is fingerprinted as it is, then stored
  as `lora.base_dtype` (cast or quantized) with zero-initialised adapters attached; the run's
  graph, parameters and shardings become the adapted model's, and `run.lora_base` names the
  base ({'path', 'fingerprint'}) for the checkpoints, which a resume compares.

  Args:
    run: a run whose `params` are the base, on its mesh.
    base_path: where the base comes from, for people (the fingerprint decides).
  """
  config = run.config.model.lora
  fingerprint = lora.fingerprint(run.params)
  model = lora.apply_lora(nnx.merge(run.graphdef, run.params), config, seed=run.config.seed)
  run.graphdef, params = nnx.split(model)
  run.param_shardings = sharding.state_shardings(params, run.mesh)
  run.params = jax.device_put(params, run.param_shardings)
  run.sampler_shardings = (
      run.param_shardings
      if run.sampler_mesh is run.mesh
      else sharding.state_shardings(params, run.sampler_mesh)
  )
  run.lora_base = {"path": base_path, "fingerprint": fingerprint}


def _split_devices(
    config: ExperimentConfig, num_sequences: int
) -> tuple[jax.sharding.Mesh | None, list[jax.Device]]:
  """(the sampler's own mesh or None when it shares the learner's, the learner's devices).

  With `config.rollout.devices` = n the sampler gets a data-parallel mesh on the first n
  devices (parameters replicated, the B·G rows split) and the learner the rest.
  """
  rollout, devices = config.rollout, jax.devices()
  if rollout.max_staleness > 0 and jax.process_count() > 1:
    raise ConfigError(
        f"config.rollout: max_staleness={rollout.max_staleness} runs the sampler "
        "in a thread of one process; multi-process runs need 0"
    )
  if rollout.devices is None:
    return None, devices
  if jax.process_count() > 1:
    raise ConfigError(
        f"config.rollout: devices={rollout.devices} splits one process's devices; "
        "multi-process runs share them (None)"
    )
  if rollout.devices >= len(devices):
    raise ConfigError(
        f"config.rollout: devices={rollout.devices} must leave at least one of the "
        f"{len(devices)} devices to the learner"
    )
  if num_sequences % rollout.devices:
    raise ConfigError(
        f"config: prompts_per_step x algorithm.num_generations = {num_sequences} "
        f"must be a multiple of rollout.devices = {rollout.devices}"
    )
  return sharding.make_mesh(devices=devices[: rollout.devices]), devices[rollout.devices :]
