"""The experiment configuration, typed: one frozen, validated dataclass per config section.

One concept: the typed experiment configuration, one dataclass per section, hence its length.

Experiment configs are `ml_collections.ConfigDict`s (see `configs/`). `ExperimentConfig.from_config`
turns one into frozen dataclasses, one per section (`TaskConfig`, `ModelConfig`, the sampler's
`gmpo_jax.rollout.sampling.SamplingConfig`, `AlgorithmConfig`, `OptimConfig`, `WarmStartConfig`,
`EvalConfig`, `CheckpointConfig`, `MeshConfig`, `RolloutConfig`, `PerfConfig`), each checking
its values in `__post_init__`. A bad value or an unknown field raises one `ConfigError` naming it
(`config.<section>: <field>=<value> ...`) before any dataset is built or program compiled.
"Unset" is None (a `FieldReference(None, field_type=...)` in the config file), never "".

`AlgorithmConfig`, the part that decides the math of an update, is hashable and can be a static
argument of `jax.jit`. The config holds names and values only: it checks them against the
registries of `gmpo_jax.algo`, and `gmpo_jax.runner.build` turns the names into functions
(`advantage_fn`, `policy_loss`), so neither the algorithms nor the learner need the config.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gmpo_jax.algo import advantages as advantages_lib
from gmpo_jax.algo import aggregation, importance
from gmpo_jax.algo import kl as kl_lib
from gmpo_jax.algo import losses as losses_lib
from gmpo_jax.algo import pass_at_k as evaluation
from gmpo_jax.models.lora import LoRAConfig
from gmpo_jax.models.transformer import TransformerConfig
from gmpo_jax.rollout import backends as rollout_lib
from gmpo_jax.rollout.sampling import SamplingConfig


class ConfigError(ValueError):
  """A bad experiment config: the message names the field, e.g. `config.optim: b1=1.5 ...`."""


def _require(ok: bool, field: str, value: Any, requirement: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} {requirement}")


def _section(cls, section: Mapping[str, Any] | None, path: str, **converted: Any):
  """`cls(**section)`, with the fields in `converted` replaced; every error a `ConfigError`
  that names `config.<path>` (`config` alone for the top level, path '')."""
  where = f"config.{path}" if path else "config"
  fields = dict(section or {})
  accepted = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(accepted))
  if unknown:
    raise ConfigError(f"{where}: unknown field(s) {unknown}; accepted: {accepted}")
  fields.update(converted)
  try:
    return cls(**fields)
  except ConfigError:
    raise
  except (TypeError, ValueError) as error:
    raise ConfigError(f"{where}: {error}") from error


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(section: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
  """{key: tuple(value)} when the section sets a sequence there (a config file's list), else {}."""
  value = (section or {}).get(key)
  return {key: tuple(value)} if isinstance(value, (list, tuple)) else {}


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
    is_correction: importance weights between the learner's rescoring (the proximal policy)
      and the sampler's own log-probs (the behaviour policy) on every token's loss: 'none',
      or one of `gmpo_jax.algo.importance.IS_CORRECTIONS` ('token_tis', 'sequence_tis',
      'token_mask', 'sequence_mask'); see `gmpo_jax.algo.importance`.
    is_cap: c > 1, the truncation of the TIS weights (min(w, c)) and the masks' range
      [1/c, c]; unused with 'none'.
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
  is_correction: str = "none"
  is_cap: float = 2.0

  def __post_init__(self):
    for key in ("loss_agg_mode", "beta", "kl_estimator"):
      if key in dict(self.objective_kwargs):
        raise ValueError(f"set algorithm.{key}, not algorithm.objective_kwargs.{key}")
    self._check_hyperparameter_values()
    if self.loss_agg_mode is not None and self.loss_agg_mode not in aggregation.AGGREGATION_MODES:
      raise ValueError(
          f"loss_agg_mode={self.loss_agg_mode!r}; expected one of "
          f"{aggregation.AGGREGATION_MODES}"
      )
    if self.num_generations < 2:
      raise ValueError(f"num_generations={self.num_generations}: a group needs >= 2 completions")
    for name in ("num_epochs", "num_minibatches", "num_microbatches"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.beta < 0:
      raise ValueError(f"beta={self.beta} must be >= 0")
    if self.kl_estimator not in kl_lib.KL_ESTIMATORS:
      raise ValueError(
          f"kl_estimator={self.kl_estimator!r}; expected one of {tuple(kl_lib.KL_ESTIMATORS)}"
      )
    if self.overlong_buffer < 0 or self.overlong_penalty < 0:
      raise ValueError("overlong_buffer and overlong_penalty must be >= 0")
    _require(
        self.is_correction in ("none",) + importance.IS_CORRECTIONS,
        "is_correction",
        self.is_correction,
        f"is not one of {('none',) + importance.IS_CORRECTIONS}",
    )
    _require(self.is_cap > 1, "is_cap", self.is_cap, "must be > 1")
    if self.require_positive_rewards is None:
      domain = advantages_lib.reward_domain(self.advantage, **dict(self.advantage_kwargs))
      object.__setattr__(self, "require_positive_rewards", domain == "positive")

  def _check_hyperparameter_values(self) -> None:
    """Looks the estimator and the objective up in their registries (which check names and
    hyperparameter names) and traces each on abstract [1, 2] inputs, which runs their own value
    checks (clip ranges, p, ...): a bad value fails here, not at the first update. The runner
    resolves them for its use in `gmpo_jax.runner.build`."""
    advantage_fn = advantages_lib.get_advantage_fn(self.advantage, **dict(self.advantage_kwargs))
    loss_fn = losses_lib.get_policy_loss(self.objective, **self.objective_options)
    rows, mask = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 2), bool)
    jax.eval_shape(advantage_fn, rows, mask)
    norm = {"max_length": 2} if self.agg_mode == "seq-mean-token-sum-norm" else {}
    jax.eval_shape(
        functools.partial(loss_fn, **norm),
        rows,
        rows,
        jax.ShapeDtypeStruct((1,), jnp.float32),
        mask,
    )

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
          "or set algorithm.advantage_kwargs.offset"
      )
    if self.reward_domain == "non_negative" and low < 0:
      raise ValueError(
          f"advantage={self.advantage!r} needs rewards >= 0, but the task's "
          f"smallest reward is {low}"
      )

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> AlgorithmConfig:
    """Builds it from the `algorithm` section of an experiment ConfigDict."""
    return _section(
        cls,
        config,
        "algorithm",
        **{key: _frozen(config.get(key)) for key in ("advantage_kwargs", "objective_kwargs")},
    )

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

  @property
  def objective_options(self) -> dict[str, Any]:
    """The objective's keyword options: `objective_kwargs`, and `loss_agg_mode` when set."""
    options = dict(self.objective_kwargs)
    if self.loss_agg_mode is not None:
      options["loss_agg_mode"] = self.loss_agg_mode
    return options


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """`config.task`: which task (`gmpo_jax.tasks.TASKS`) and where its data lives.

  Attributes:
    name: the task's registry name.
    kwargs: its constructor options, as sorted (name, value) pairs.
    data_dir: where the TFDS data is built; None: `<workdir>/data`.
    train_split / eval_split: the splits RL trains and evaluates on.
  """

  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"

  def __post_init__(self):
    _require(
        self.data_dir is None or bool(self.data_dir),
        "data_dir",
        self.data_dir,
        "must be a path or None (<workdir>/data)",
    )


# The `TransformerConfig` fields that `model.overrides` may set on a checkpoint (`hf_path`): how
# it runs (kernels, remat), not what it is (shapes and weights come from the
# checkpoint).
CHECKPOINT_OVERRIDES = ("attention_impl", "attention_block_size", "remat", "layer_unroll")


TRAINED_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """`config.model`: the policy, a named architecture at random init or a local checkpoint.

  Attributes:
    name: a `TransformerConfig.from_name` name; None with `hf_path`.
    hf_path: a local Hugging Face checkpoint directory; None with `name`.
    tokenizer: 'char' or a tokenizer path; None: the tokenizer.json of `hf_path`.
    overrides: `TransformerConfig` fields replacing the named config's, as sorted pairs
      (`vocab_size` comes from the tokenizer); with `hf_path` only `CHECKPOINT_OVERRIDES`
      (attention kernel, remat, ...), never the checkpoint's architecture.
    param_dtype: the dtype of the trained parameters (and the checkpoints): None or
      'float32', float32 master weights, whatever the checkpoint stores; 'bfloat16' only with
      `optim.stochastic_rounding` (`gmpo_jax.learner.precision`).
    dtype: the compute dtype, which the model casts each weight to where it is used, and
      the dtype of the sampler's copy of the parameters; None: the checkpoint's (`hf_path`),
      or float32.
    lora: low-rank adapters (`gmpo_jax.models.lora.LoRAConfig`: rank, alpha, dropout, targets,
      base_dtype); RL then trains only them, on the frozen base (the checkpoint of `hf_path`,
      or the warm start's policy). None: every parameter is trained.
  """

  name: str | None = None
  hf_path: str | None = None
  tokenizer: str | None = None
  overrides: tuple[tuple[str, Any], ...] = ()
  param_dtype: str | None = None
  dtype: str | None = None
  lora: LoRAConfig | None = None

  def __post_init__(self):
    _require(
        (self.name is None) != (self.hf_path is None),
        "name",
        self.name,
        f"and hf_path={self.hf_path!r}: set exactly one of them",
    )
    if self.name is not None:
      TransformerConfig.from_name(self.name)  # its error lists the known names
    _require(
        self.tokenizer is not None or self.hf_path is not None,
        "tokenizer",
        self.tokenizer,
        "is needed without an hf_path to read tokenizer.json from",
    )
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size"}
    overrides = dict(self.overrides)
    unknown = sorted(set(overrides) - fields)
    _require(
        not unknown, "overrides", unknown, f"are not TransformerConfig fields {sorted(fields)}"
    )
    dtypes = sorted({"param_dtype", "dtype"} & set(overrides))
    _require(not dtypes, "overrides", dtypes, "are set as model.param_dtype and model.dtype")
    if self.hf_path is not None:
      architecture = sorted(set(overrides) - set(CHECKPOINT_OVERRIDES))
      _require(
          not architecture,
          "overrides",
          architecture,
          f"would change the architecture of the checkpoint of hf_path; on a checkpoint "
          f"only {list(CHECKPOINT_OVERRIDES)} may be overridden",
      )
    for name in ("param_dtype", "dtype"):
      value = getattr(self, name)
      if value is not None:
        try:
          jnp.dtype(value)
        except TypeError as error:
          raise ValueError(f"{name}={value!r} is not a dtype") from error
    _require(
        self.param_dtype is None or jnp.dtype(self.param_dtype).name in TRAINED_DTYPES,
        "param_dtype",
        self.param_dtype,
        f"is not one of {TRAINED_DTYPES}: the trained parameters are float32 masters, or "
        "bfloat16 with optim.stochastic_rounding",
    )
    _require(
        self.lora is None or self.trained_dtype == jnp.float32,
        "param_dtype",
        self.param_dtype,
        "with lora: the adapters are trained as float32 masters, and the "
        "frozen base is stored as lora.base_dtype",
    )

  @property
  def trained_dtype(self) -> jnp.dtype:
    """The dtype the parameters are trained and stored in (None: float32)."""
    return jnp.dtype(self.param_dtype or "float32")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim` (and `config.warm_start.optim`): AdamW, warmup then cosine decay, after
  global-norm clipping (`gmpo_jax.runner.build.make_optimizer`).

  `stochastic_rounding` rounds each step into bfloat16-stored parameters
  (`model.param_dtype='bfloat16'`) stochastically, so that it survives in expectation
  (`gmpo_jax.learner.precision.bfloat16_stochastic_rounding`); it is required there, and
  changes nothing for float32 parameters.
  """

  learning_rate: float
  warmup_steps: int
  end_lr_fraction: float
  max_grad_norm: float
  b1: float
  b2: float
  weight_decay: float
  stochastic_rounding: bool = False

  def __post_init__(self):
    _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
    _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
    _require(
        0 <= self.end_lr_fraction <= 1,
        "end_lr_fraction",
        self.end_lr_fraction,
        "must lie in [0, 1]",
    )
    _require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")
    for name in ("b1", "b2"):
      _require(0 <= getattr(self, name) < 1, name, getattr(self, name), "must lie in [0, 1)")
    _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
    _require(
        isinstance(self.stochastic_rounding, bool),
        "stochastic_rounding",
        self.stochastic_rounding,
        "must be True or False",
    )


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """`config.warm_start`: the supervised pass before RL (`gmpo_jax.runner.warm_start`).

  Attributes:
    steps: at most this many steps (0: no warm start).
    batch_size: demonstrations per step.
    optim: its optimizer.
    target_train_pass_rate: stop at the first probe whose greedy pass rate on train prompts
      reaches it; None: run all `steps`.
    probe_every: steps between probes.
    probe_size: train prompts per probe.
    init_from: a directory holding a finished warm start, or a workdir with one under
      `warm_start/`: its policy is the start of RL and none is trained here; it must be of the
      same task and model (`gmpo_jax.runner.warm_start.fingerprint`). None: train one.
  """

  steps: int
  batch_size: int
  optim: OptimConfig
  target_train_pass_rate: float | None = None
  probe_every: int = 50
  probe_size: int = 256
  init_from: str | None = None

  def __post_init__(self):
    _require(self.steps >= 0, "steps", self.steps, "must be >= 0")
    _require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
    _require(
        self.target_train_pass_rate is None or 0 <= self.target_train_pass_rate <= 1,
        "target_train_pass_rate",
        self.target_train_pass_rate,
        "must lie in [0, 1] or be None",
    )
    _require(self.probe_every >= 1, "probe_every", self.probe_every, "must be >= 1")
    _require(self.probe_size >= 1, "probe_size", self.probe_size, "must be >= 1")
    _require(
        self.init_from is None or bool(self.init_from.strip()),
        "init_from",
        self.init_from,
        "must name a directory or be None",
    )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`config.eval`: held-out evaluation (`gmpo_jax.runner.evaluate`).

  Attributes:
    num_examples: the first this many held-out prompts.
    temperature: of the `num_samples` sampled completions per prompt.
    num_samples: n, sampled completions per prompt (mean@n).
    k: the k of pass@k and maj@k, sorted, each 1 <= k <= n.
  """

  num_examples: int
  temperature: float
  num_samples: int
  k: tuple[int, ...]

  def __post_init__(self):
    _require(self.num_examples >= 1, "num_examples", self.num_examples, "must be >= 1")
    _require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
    object.__setattr__(self, "k", evaluation.check_ks(self.k, self.num_samples))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """`config.checkpoint`: a save every `every` RL steps (and at each evaluation), the `keep`
  latest kept, and the best by `best_metric` (None: no best-step tracking)."""

  every: int
  keep: int
  best_metric: str | None = None

  def __post_init__(self):
    _require(self.every >= 1, "every", self.every, "must be >= 1")
    _require(self.keep >= 1, "keep", self.keep, "must be >= 1")
    _require(
        self.best_metric is None or bool(self.best_metric),
        "best_metric",
        self.best_metric,
        "must be a metric name or None",
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: the (data, fsdp, tensor) device mesh; one size may be -1 (what is left)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    for name, size in sizes.items():
      _require(size == -1 or size >= 1, name, size, "must be >= 1 or -1")
    _require(
        list(sizes.values()).count(-1) <= 1,
        "data",
        self.data,
        f"fsdp={self.fsdp} tensor={self.tensor}: at most one axis may be -1",
    )


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """`config.rollout`: who generates the RL rollouts, from which parameters, on which devices.

  Attributes:
    backend: a name in `gmpo_jax.rollout.backends.ROLLOUT_BACKENDS`.
    max_staleness: k. The rollout of RL step t (from 0) is sampled with the parameters after
      max(t - k, 0) updates; 0 is the on-policy loop. With k >= 1 a producer thread samples the
      next steps while the learner updates (`gmpo_jax.rollout.producer`).
    devices: None: the sampler shares every device with the learner. n: the sampler gets its
      own data-parallel mesh on the first n devices and `config.mesh` is built on the rest.
  """

  backend: str = "jax"
  max_staleness: int = 0
  devices: int | None = None

  def __post_init__(self):
    _require(
        self.backend in rollout_lib.ROLLOUT_BACKENDS,
        "backend",
        self.backend,
        f"is not one of {sorted(rollout_lib.ROLLOUT_BACKENDS)}",
    )
    _require(
        _is_int(self.max_staleness) and self.max_staleness >= 0,
        "max_staleness",
        self.max_staleness,
        "must be an int >= 0",
    )
    _require(
        self.devices is None or (_is_int(self.devices) and self.devices >= 1),
        "devices",
        self.devices,
        "must be an int >= 1 or None (shared with the learner)",
    )


@dataclasses.dataclass(frozen=True)
class PerfConfig:
  """`config.perf`: how the runner's `perf/...` metrics are computed (`gmpo_jax.runner.perf`).

  Attributes:
    peak_tflops: peak TFLOP/s of one learner device, the denominator of `perf/mfu` (times the
      learner's devices); None: the chip's dense bf16 peak from `gmpo_jax.runner.perf.CHIP_PEAK_TFLOPS`,
      or on the CPU a measured float32 matmul probe.
    profile_steps: (first, last): a `jax.profiler` trace of RL steps first..last (both
      included) is written to WORKDIR/profile (TensorBoard's profile plugin, Perfetto); None:
      no trace.
  """

  peak_tflops: float | None = None
  profile_steps: tuple[int, int] | None = None

  def __post_init__(self):
    peak = self.peak_tflops
    _require(
        peak is None or (math.isfinite(peak) and peak > 0),
        "peak_tflops",
        peak,
        "must be a finite number > 0 or None",
    )
    steps = self.profile_steps
    _require(
        steps is None
        or (len(steps) == 2 and all(_is_int(s) for s in steps) and 1 <= steps[0] <= steps[1]),
        "profile_steps",
        steps,
        "must be None or (first, last) RL steps with 1 <= first <= last",
    )


PARALLELISMS = ("mesh", "pmap")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole experiment config, every section typed and validated.

  Attributes:
    seed: everything random derives from it.
    num_steps: RL steps.
    prompts_per_step: B, prompts per RL step (each gets `algorithm.num_generations` completions).
    eval_every: RL steps between evaluations (and after the last).
    chunk_size: sequence chunk of the memory-lean log-prob computation.
    progress: a progress bar (True), a status line every few steps (False), or by whether
      stdout is a terminal (None).
    resume_with_changes: resume a workdir whose checkpoint holds another config.
    parallelism: how the RL update runs over the devices: 'mesh', one SPMD program on the
      (data, fsdp, tensor) mesh (`gmpo_jax.learner.update.make_update_fn`), or 'pmap', data
      parallel with replicated parameters (`gmpo_jax.learner.pmap_update`), which needs fsdp = tensor = 1
      and one process.
    compilation_cache_dir: where `gmpo_jax.main` keeps compiled programs for later runs
      (`gmpo_jax.infra.compilation.enable_persistent_cache`; `~` is expanded); None: no cache.
    task, model, sampling, algorithm, optim, warm_start, eval, checkpoint, mesh, rollout, perf:
      the sections. `sampling` is the sampler's own `SamplingConfig` without the tokenizer's ids
      (`eos_id`, `pad_id`: the runner sets them).
  """

  seed: int
  num_steps: int
  prompts_per_step: int
  eval_every: int
  chunk_size: int
  progress: bool | None
  resume_with_changes: bool
  parallelism: str
  compilation_cache_dir: str | None
  task: TaskConfig
  model: ModelConfig
  sampling: SamplingConfig
  algorithm: AlgorithmConfig
  optim: OptimConfig
  warm_start: WarmStartConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  rollout: RolloutConfig
  perf: PerfConfig

  def __post_init__(self):
    _require(self.num_steps >= 1, "num_steps", self.num_steps, "must be >= 1")
    _require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "must be >= 1")
    _require(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
    _require(self.chunk_size >= 1, "chunk_size", self.chunk_size, "must be >= 1")
    _require(
        self.parallelism in PARALLELISMS,
        "parallelism",
        self.parallelism,
        f"is not one of {PARALLELISMS}",
    )
    _require(
        self.parallelism == "mesh" or self.model.lora is None,
        "parallelism",
        self.parallelism,
        "with model.lora: the pmap update trains every parameter; use " "parallelism='mesh'",
    )
    if self.parallelism == "pmap":
      _require(
          self.mesh.fsdp == 1 and self.mesh.tensor == 1,
          "parallelism",
          self.parallelism,
          f"replicates the parameters: it needs mesh.fsdp = mesh.tensor = 1, got "
          f"fsdp={self.mesh.fsdp} tensor={self.mesh.tensor}",
      )
    if self.model.trained_dtype != jnp.float32:
      optimizers = [("optim", self.optim)] + (
          [("warm_start.optim", self.warm_start.optim)] if self.warm_start.steps > 0 else []
      )
      for name, optim in optimizers:
        # A bfloat16 weight keeps its value under any step below half its ulp, 2^-9 |w|: at
        # lr 1e-6 that is every weight above ~5e-4, so training would change nothing.
        _require(
            optim.stochastic_rounding,
            "model.param_dtype",
            self.model.param_dtype,
            f"stores the trained parameters in bfloat16, which rounds away every step "
            f"below 2^-9 of a weight (at lr 1e-6, nearly every step): train float32 "
            f"masters with model.param_dtype='float32' (and model.dtype='bfloat16' for "
            f"bfloat16 compute), or set {name}.stochastic_rounding=True",
        )

  # Built by `gmpo_jax.main` before any JAX backend starts (`distributed.DistributedConfig`).
  _UNTYPED_SECTIONS = ("distributed",)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> ExperimentConfig:
    """Types and validates an experiment ConfigDict (see `configs/default.py`).

    Raises:
      ConfigError: an unknown field or a bad value, naming it.
    """
    missing = sorted({f.name for f in dataclasses.fields(cls)} - set(config))
    if missing:
      raise ConfigError(f"config: missing field(s) {missing}")
    sections = {
        name: config[name]
        for name in (
            "task",
            "model",
            "sampling",
            "optim",
            "warm_start",
            "eval",
            "checkpoint",
            "mesh",
            "rollout",
            "perf",
        )
    }
    warm_start = sections["warm_start"]
    top = {
        name: value
        for name, value in dict(config).items()
        if name not in sections and name not in cls._UNTYPED_SECTIONS + ("algorithm",)
    }
    return _section(
        cls,
        top,
        "",
        task=_section(
            TaskConfig, sections["task"], "task", kwargs=_frozen(sections["task"].get("kwargs"))
        ),
        model=_section(
            ModelConfig,
            sections["model"],
            "model",
            overrides=_frozen(sections["model"].get("overrides")),
            lora=(
                None
                if sections["model"].get("lora") is None
                else _section(LoRAConfig, sections["model"]["lora"], "model.lora")
            ),
        ),
        sampling=_section(SamplingConfig, sections["sampling"], "sampling"),
        algorithm=AlgorithmConfig.from_config(config["algorithm"]),
        optim=_section(OptimConfig, sections["optim"], "optim"),
        warm_start=_section(
            WarmStartConfig,
            warm_start,
            "warm_start",
            optim=_section(OptimConfig, warm_start.get("optim"), "warm_start.optim"),
        ),
        eval=_section(EvalConfig, sections["eval"], "eval", k=tuple(sections["eval"].get("k", ()))),
        checkpoint=_section(CheckpointConfig, sections["checkpoint"], "checkpoint"),
        mesh=_section(MeshConfig, sections["mesh"], "mesh"),
        rollout=_section(RolloutConfig, sections["rollout"], "rollout"),
        perf=_section(
            PerfConfig,
            sections["perf"],
            "perf",
            **_as_tuple(sections["perf"], "profile_steps"),
        ),
    )
