"""The experiment runner: config -> rollouts -> rewards -> advantages -> policy update.

`train_and_evaluate(config, workdir)` runs one experiment (flax-examples style; the command
line is `gmpo_jax.main`). Per step:

1. B prompts from the task's train split, in a seeded order that the checkpoint records
   (the data position), each repeated G times;
2. completions from the rollout backend (`gmpo_jax.rollout`: the in-process KV-cache sampler);
3. rewards on the host, validated before they enter jit (a non-finite or, for the log-reward
   baseline, non-positive reward is an error naming the prompt);
4. group advantages by the configured estimator, old (and reference) log-probs;
5. mu epochs of minibatch updates with the configured objective (`gmpo_jax.learner`).

Everything random derives from (seed, step), the data order from (seed, epoch), and the
checkpoint holds parameters, optimizer state, step, key and data position, so a run killed at
any step and resumed reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gmpo_jax import advantages as advantages_lib
from gmpo_jax import async_rollout
from gmpo_jax import checkpointing
from gmpo_jax import compilation
from gmpo_jax import distributed
from gmpo_jax import evaluation
from gmpo_jax import learner
from gmpo_jax import metrics as metrics_lib
from gmpo_jax import perf
from gmpo_jax import pmap_step
from gmpo_jax import reward_shape
from gmpo_jax import rollout as rollout_lib
from gmpo_jax import sharding
from gmpo_jax import tasks as tasks_lib
from gmpo_jax import tokenization
from gmpo_jax.config import AlgorithmConfig, ConfigError, ExperimentConfig, ModelConfig, OptimConfig
from gmpo_jax.logprobs import positions_from_mask
from gmpo_jax.models import hf_import
from gmpo_jax.models.transformer import Transformer, TransformerConfig, default_cache_dtype
from gmpo_jax.rollout import JaxRollout, Rollout, RolloutBackend
from gmpo_jax.sampling import SamplingConfig

logger = logging.getLogger(__name__)

EVAL_RESULTS_DIR = "eval_results"

# Timing metrics differ between otherwise identical runs; everything else must not. The perf/...
# rates divide by the same times (`gmpo_jax.perf`).
TIMING_METRICS = ("time/step", "time/rollout", "time/reward", "time/update", "time/compile",
                  "time/wait_rollout", "tokens_per_sec", "perf/train_tflops", "perf/mfu",
                  "perf/decode_gb_per_s")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def build_tokenizer(model: ModelConfig) -> tokenization.Tokenizer:
  """`model.tokenizer` ('char' or a path); None: the tokenizer.json of `model.hf_path`."""
  return tokenization.load_tokenizer(model.hf_path if model.tokenizer is None else model.tokenizer)


def build_model(model: ModelConfig, tokenizer: tokenization.Tokenizer, *, seed: int
                ) -> Transformer:
  """The policy: a Hugging Face checkpoint from a local path, or a named config at random init."""
  if model.hf_path is not None:
    policy, _ = hf_import.load_hf_checkpoint(model.hf_path, param_dtype=model.param_dtype,
                                             dtype=model.dtype, overrides=dict(model.overrides))
    return policy
  overrides = dict(model.overrides, vocab_size=tokenizer.vocab_size)
  for name in ("param_dtype", "dtype"):
    if getattr(model, name) is not None:
      overrides[name] = getattr(model, name)
  config = dataclasses.replace(TransformerConfig.from_name(model.name), **overrides)
  # One compiled program for every parameter: built eagerly, each initializer and each shape
  # compiled a program of its own (about 20, some 0.5 s, each kept resident).
  return nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(seed)))()


def make_optimizer(optim: OptimConfig, total_updates: int
                   ) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate,
      warmup_steps=min(optim.warmup_steps, max(total_updates - 1, 0)),
      decay_steps=max(total_updates, 1), end_value=optim.learning_rate * optim.end_lr_fraction)
  return optax.chain(
      optax.clip_by_global_norm(optim.max_grad_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))


class PromptStream:
  """Train examples in a seeded order, one permutation per pass; `position` counts prompts."""

  def __init__(self, examples: Sequence[Mapping[str, Any]], *, seed: int, position: int = 0):
    if not len(examples):
      raise ValueError("the train split is empty")
    self._examples = examples
    self._seed = seed
    self.position = position

  def take(self, n: int) -> list[Mapping[str, Any]]:
    out = []
    size = len(self._examples)
    for _ in range(n):
      epoch, index = divmod(self.position, size)
      order = np.random.default_rng([self._seed, epoch]).permutation(size)
      out.append(self._examples[int(order[index])])
      self.position += 1
    return out


def encode_batch(texts: Sequence[str], tokenizer: tokenization.Tokenizer, *,
                 add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [N, P] token ids and mask (the sampler aligns and buckets them)."""
  ids = [([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else [])
         + list(tokenizer.encode(t)) for t in texts]
  width = max(1, max(len(x) for x in ids))
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask


def decode_completions(rollout: Rollout, tokenizer: tokenization.Tokenizer,
                       stop_ids: Sequence[int]) -> list[str]:
  """The completion text of every row, stop tokens removed."""
  tokens = np.asarray(rollout.tokens)
  mask = np.asarray(rollout.completion_mask)
  stops = set(stop_ids)
  return [tokenizer.decode([int(t) for t in row[m] if int(t) not in stops])
          for row, m in zip(tokens, mask)]


def overlong_penalty(lengths: np.ndarray, *, max_new_tokens: int, buffer: int,
                     penalty: float) -> np.ndarray:
  """DAPO's soft overlong punishment: 0 up to N - buffer, then down to -penalty at N."""
  if buffer <= 0:
    return np.zeros(lengths.shape, np.float32)
  excess = np.clip(lengths - (max_new_tokens - buffer), 0, buffer)
  return (-penalty * excess / buffer).astype(np.float32)


def group_statistics(rewards: np.ndarray, floor: float = 1e-8) -> dict[str, float]:
  """Reward statistics of a [B, G] batch: arithmetic and geometric means, zero-std groups."""
  return {
      "reward/mean": float(rewards.mean()),
      "reward/std": float(rewards.std()),
      "reward/geometric_mean": float(np.exp(np.mean(np.log(np.maximum(rewards, floor))))),
      "reward/max": float(rewards.max()),
      "reward/min": float(rewards.min()),
      "groups/zero_std_fraction": float(np.mean(np.ptp(rewards, axis=1) == 0)),
  }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


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

  @property
  def algo(self) -> AlgorithmConfig:
    return self.config.algorithm

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.sampling.all_stop_ids

  def sampler_params(self, params: Any) -> Any:
    """The RL sampler's parameters made from the learner's `params`.

    The learner's arrays themselves when the two share devices and take turns
    (`max_staleness` 0: the synchronous loop, no copy); otherwise a copy on the sampler's
    shardings, device to device (`jax.device_put`), since the learner's next update donates
    its buffers (`learner.make_update_fn`) while the sampler may still be using them.
    """
    if self.sampler_mesh is self.mesh and self.config.rollout.max_staleness == 0:
      return params
    return jax.device_put(params, self.sampler_shardings, may_alias=False)


def _build_run(config_dict: ml_collections.ConfigDict, workdir: pathlib.Path) -> Run:
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
    raise ConfigError(f"config: parallelism='pmap' maps over one process's devices; this run "
                      f"has {jax.process_count()} processes: use parallelism='mesh'")
  multiple = sharding.batch_size_multiple(mesh) * algo.num_minibatches * algo.num_microbatches
  if num_sequences % multiple:
    raise ConfigError(
        f"config: prompts_per_step x algorithm.num_generations = {num_sequences} must be a "
        f"multiple of mesh data x fsdp x algorithm.num_minibatches x num_microbatches = {multiple}")
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
      lambda: tuple(task.load(split, data_dir=data_dir)
                    for split in (config.task.train_split, config.task.eval_split)),
      name="task_data")
  tokenizer = build_tokenizer(config.model)
  model = build_model(config.model, tokenizer, seed=config.seed)
  graphdef, params = nnx.split(model)
  param_shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  sampler_mesh = mesh if sampler_mesh is None else sampler_mesh
  sampler_shardings = (param_shardings if sampler_mesh is mesh
                       else sharding.state_shardings(params, sampler_mesh))
  sampling_config = dataclasses.replace(config.sampling, eos_id=tokenizer.eos_id,
                                        pad_id=tokenizer.pad_id)
  return Run(config=config, config_dict=config_dict, workdir=workdir, task=task,
             tokenizer=tokenizer, mesh=mesh, sampler_mesh=sampler_mesh, graphdef=graphdef,
             params=params, param_shardings=param_shardings,
             sampler_shardings=sampler_shardings, sampling=sampling_config,
             train_examples=train_examples, eval_examples=eval_examples)


def _split_devices(config: ExperimentConfig, num_sequences: int
                   ) -> tuple[jax.sharding.Mesh | None, list[jax.Device]]:
  """(the sampler's own mesh or None when it shares the learner's, the learner's devices).

  With `config.rollout.devices` = n the sampler gets a data-parallel mesh on the first n
  devices (parameters replicated, the B·G rows split) and the learner the rest.
  """
  rollout, devices = config.rollout, jax.devices()
  if rollout.max_staleness > 0 and jax.process_count() > 1:
    raise ConfigError(f"config.rollout: max_staleness={rollout.max_staleness} runs the sampler "
                      "in a thread of one process; multi-process runs need 0")
  if rollout.devices is None:
    return None, devices
  if jax.process_count() > 1:
    raise ConfigError(f"config.rollout: devices={rollout.devices} splits one process's devices; "
                      "multi-process runs share them (None)")
  if rollout.devices >= len(devices):
    raise ConfigError(f"config.rollout: devices={rollout.devices} must leave at least one of the "
                      f"{len(devices)} devices to the learner")
  if num_sequences % rollout.devices:
    raise ConfigError(f"config: prompts_per_step x algorithm.num_generations = {num_sequences} "
                      f"must be a multiple of rollout.devices = {rollout.devices}")
  return sharding.make_mesh(devices=devices[:rollout.devices]), devices[rollout.devices:]


# --- Supervised warm start -------------------------------------------------------------------


def warm_start(run: Run, preemption: checkpointing.PreemptionHandler
               ) -> tuple[Any, dict[str, float]]:
  """A short supervised pass on the train split's demonstrations, cached in the workdir.

  A randomly initialised policy earns a constant reward on these tasks (zero advantages
  everywhere), so RL needs a starting policy that sometimes succeeds. With
  `warm_start.target_train_pass_rate` set, the pass stops at the first probe (every
  `warm_start.probe_every` steps) whose greedy pass rate on the first `warm_start.probe_size`
  train prompts reaches it, or after `warm_start.steps`. A fixed number of steps gives no
  fixed starting point: on 2-digit addition the step at which the model learns carrying varies
  by seed from under 1,200 to over 1,800 steps, so the same 900 steps left seeds at held-out
  0.10-0.53. Only train prompts are probed; the held-out split stays unseen until the
  evaluation before RL.

  The result is saved under `workdir/warm_start` and reused by later runs in the same
  workdir. A SIGTERM during it saves its progress and raises `Preempted`; the next run
  continues from that step with the same data order, so the result does not depend on the
  interruption.

  Returns:
    The parameters and `{"warm_start/steps": steps taken, "warm_start/train_pass_rate": the
    last probe's rate (None without a target)}`.
  """
  cfg = run.config.warm_start
  directory = run.workdir / "warm_start"
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  opt_state = learner.init_opt_state(optimizer, run.params, run.mesh)
  key = sharding.prng_key(run.config.seed, run.mesh)
  signature = _warm_start_signature(run.config_dict)
  target = checkpointing.CheckpointState(step=0, model=run.params, opt_state=opt_state,
                                         key=key, metadata={})
  target_rate = cfg.target_train_pass_rate
  with checkpointing.Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    restored = ckpt.restore_latest(target)
    params, first, rate = jax.tree.map(jnp.copy, run.params), 0, None
    if restored is not None and restored.metadata.get("signature") == signature:
      info = restored.metadata.get("result")
      if info is not None:
        logger.info("warm start: reusing %s (step %d)", directory, restored.step)
        return restored.model, info
      params, opt_state, first = restored.model, restored.opt_state, restored.step
      logger.info("warm start: resuming at step %d of %d", first, cfg.steps)
    update = learner.make_update_fn(
        run.graphdef, optimizer, learner.supervised_loss(chunk_size=run.config.chunk_size),
        param_shardings=run.param_shardings, opt_shardings=_shardings(opt_state))
    probe = _train_pass_rate_probe(run, cfg.probe_size) if target_rate is not None else None
    stream = PromptStream(run.train_examples, seed=run.config.seed + 1,
                          position=first * cfg.batch_size)
    start = time.perf_counter()
    save = lambda step, result=None: ckpt.save(checkpointing.CheckpointState(
        step=step, model=params, opt_state=opt_state, key=key,
        metadata={"signature": signature, "result": result}))
    step = first
    while step < cfg.steps:
      if preemption.requested_on_any_process():
        save(step)
        raise Preempted(f"warm start, step {step} of {cfg.steps} saved")
      examples = stream.take(cfg.batch_size)
      prompts = [run.task.prompt(e) for e in examples]
      solutions = [run.task.demonstration(e) for e in examples]
      batch = _supervised_batch(run, prompts, solutions)
      params, opt_state, out = update(params, opt_state, learner.place_batch(batch, run.mesh))
      step += 1
      if step % max(cfg.steps // 5, 1) == 1 or step == cfg.steps:
        logger.info("warm start step %d/%d: nll %.4f", step, cfg.steps, float(out.loss))
      if probe is not None and step % cfg.probe_every == 0:
        rate = probe(params)
        logger.info("warm start step %d: train pass rate %.3f (target %.3f)", step, rate,
                    target_rate)
        if rate >= target_rate:
          break
    logger.info("warm start: %d steps in %.1fs", step - first, time.perf_counter() - start)
    result = {"warm_start/steps": step, "warm_start/train_pass_rate": rate}
    save(step, result)
  return params, result


def _train_pass_rate_probe(run: Run, size: int):
  """Greedy pass rate of `params` on the first `size` train prompts (deterministic)."""
  examples = run.train_examples[:size]

  def pass_rate(params) -> float:
    _, _, passed = _complete(run, params, examples, temperature=0.0, n=1, key=jax.random.key(0))
    return float(passed.mean())

  return pass_rate


class Preempted(Exception):
  """A SIGTERM/SIGINT stopped the run outside the RL loop; what was in flight is saved."""


def _warm_start_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the cached warm start depends on (its own settings, the task, the model, the seed);
  a change to any of them retrains it."""
  return {"warm_start": json.loads(config.warm_start.to_json()),
          "task": json.loads(config.task.to_json()), "model": json.loads(config.model.to_json()),
          "seed": config.seed, "chunk_size": config.chunk_size}


def _supervised_batch(run: Run, prompts: Sequence[str], solutions: Sequence[str]) -> learner.Batch:
  prompt_tokens, prompt_mask = encode_batch(prompts, run.tokenizer)
  full_tokens, full_mask = encode_batch(
      [p + s for p, s in zip(prompts, solutions)], run.tokenizer)
  eos = np.full((len(prompts), 1), run.tokenizer.eos_id, np.int32)
  lengths = full_mask.sum(1)
  tokens = np.concatenate([full_tokens, eos], axis=1)
  key_mask = np.concatenate([full_mask, np.zeros((len(prompts), 1), bool)], axis=1)
  rows = np.arange(len(prompts))
  tokens[rows, lengths] = run.tokenizer.eos_id
  key_mask[rows, lengths] = True
  # Train on the solution and EOS; the prompt is context only.
  loss_mask = key_mask & (np.arange(tokens.shape[1])[None, :] >= prompt_mask.sum(1)[:, None])
  zeros = np.zeros(tokens.shape, np.float32)
  batch = learner.Batch(
      tokens=tokens, positions=positions_from_mask(jnp.asarray(key_mask)), key_mask=key_mask,
      loss_mask=loss_mask, old_logp=zeros, ref_logp=zeros,
      advantages=np.zeros(len(prompts), np.float32))
  return jax.tree.map(lambda x: learner.to_microbatches(x, 1), batch)


# --- Evaluation ------------------------------------------------------------------------------


def _complete(run: Run, params, examples: Sequence[Mapping[str, Any]], *, temperature: float,
              n: int, key: jax.Array) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
  """`n` completions of each example's prompt at `temperature` (0: greedy), by the in-process
  sampler.

  Returns:
    (texts: E lists of n strings, rewards [E, n], passed [E, n] bool: the reward reaches the
    task's maximum, `Task.reward_range`).
  """
  config = dataclasses.replace(run.sampling, temperature=temperature)
  backend = JaxRollout(nnx.merge(run.graphdef, params), config=config,
                       chunk_size=run.config.chunk_size)
  tokens, mask = encode_batch([run.task.prompt(e) for e in examples for _ in range(n)],
                              run.tokenizer)
  texts = decode_completions(backend.generate(tokens, mask, key), run.tokenizer, run.stop_ids)
  rewards = np.array([run.task.reward(t, examples[i // n]) for i, t in enumerate(texts)])
  rewards = rewards.reshape(len(examples), n)
  return ([texts[i * n:(i + 1) * n] for i in range(len(examples))], rewards,
          rewards >= run.task.reward_range[1] - 1e-6)


def evaluate(run: Run, params, key: jax.Array, *, step: int) -> dict[str, float]:
  """Held-out metrics with 95% intervals (`gmpo_jax.evaluation`), and the per-prompt results.

  Each of the first `eval.num_examples` prompts gets one greedy completion and
  `eval.num_samples` sampled at `eval.temperature`; a completion passes when its reward reaches
  the task's maximum (`Task.reward_range`). Metrics: greedy pass@1 and mean reward, mean@n,
  and pass@k (unbiased) and maj@k for each k >= 2 in `eval.k`. The per-prompt results go to
  `workdir/eval_results/step_<step>.jsonl`, from which `evaluation.summarize` recomputes them.
  """
  cfg = run.config.eval
  examples = [run.eval_examples[i] for i in range(min(cfg.num_examples, len(run.eval_examples)))]
  prompts = [run.task.prompt(e) for e in examples]
  _, greedy_rewards, greedy_passed = _complete(run, params, examples, temperature=0.0, n=1,
                                               key=key)
  sampled_texts, _, sampled_passed = _complete(run, params, examples,
                                               temperature=cfg.temperature,
                                               n=cfg.num_samples, key=key)
  results = [
      evaluation.PromptResult(
          prompt_id=i, prompt=prompts[i], greedy_passed=bool(greedy_passed[i, 0]),
          greedy_reward=float(greedy_rewards[i, 0]),
          answers=tuple(run.task.extract_answer(t) for t in sampled_texts[i]),
          passed=tuple(bool(p) for p in sampled_passed[i]))
      for i in range(len(examples))]
  if jax.process_index() == 0:
    evaluation.write_results(run.workdir / EVAL_RESULTS_DIR / f"step_{step:06d}.jsonl", results)
  return evaluation.summarize(results, cfg.k)


# --- RL --------------------------------------------------------------------------------------


def _rewards_for(run: Run, rollout: Rollout, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
  g = run.algo.num_generations
  texts = decode_completions(rollout, run.tokenizer, run.stop_ids)
  rewards = np.array([run.task.reward(t, examples[i // g]) for i, t in enumerate(texts)],
                     np.float32)
  rewards += overlong_penalty(np.asarray(rollout.lengths), max_new_tokens=run.sampling.max_new_tokens,
                              buffer=run.algo.overlong_buffer, penalty=run.algo.overlong_penalty)
  return rewards.reshape(len(examples), g)


class RLState(NamedTuple):
  """What an RL step changes: RL steps done, the policy's parameters and optimizer state, and
  the number of updates skipped so far (non-finite loss or gradient)."""
  step: int
  params: Any
  opt_state: Any
  skipped_updates: int = 0


@jax.jit
def rollout_batch(rollout: Rollout, *, advantages: jax.Array, group_mask: jax.Array,
                  old_logp: jax.Array | None, ref_logp: jax.Array | None,
                  behav_logp: jax.Array | None = None) -> learner.Batch:
  """The learner's [N, ...] view of a rollout of N = B·G sequences (group-major), one program.

  Args:
    rollout: the sequences (`tokens`, `positions`, `key_mask`, `completion_mask` are used).
    advantages: [B, G] float32, one per sequence.
    group_mask: [B, G] bool; a masked completion (dynamic sampling masks whole groups) keeps
      its advantage but none of its tokens is trained or counted.
    old_logp, ref_logp: [N, T] float32 log-probs under the rollout and reference policies;
      old_logp is None for an on-policy update (`learner.policy_loss(on_policy=True)`),
      ref_logp None without a reference (the batch then holds zeros).
    behav_logp: [N, T] float32 log-probs under the behaviour policy (the sampler's own,
      `rollout.policy_logprobs`) for the importance correction; None without one.
  """
  valid = group_mask.reshape(-1)
  if ref_logp is None:
    ref_logp = jnp.zeros(rollout.tokens.shape, jnp.float32)
  return learner.Batch(
      tokens=rollout.tokens, positions=rollout.positions, key_mask=rollout.key_mask,
      loss_mask=rollout.completion_mask & valid[:, None], old_logp=old_logp, ref_logp=ref_logp,
      advantages=advantages.reshape(-1), behav_logp=behav_logp)


def minibatches(sequences: learner.Batch, key: jax.Array, algo: AlgorithmConfig):
  """Yields the micro-batched input of every optimizer step over one rollout: mu epochs, each a
  fresh permutation (from `fold_in(key, 1 + epoch)`) cut into `num_minibatches` parts.

  With one minibatch every epoch trains on the whole rollout, whose loss and gradient are sums
  over its sequences (`learner.Counts`): their order changes nothing but float rounding, so the
  rollout is used as it is, without the permutation's gather.
  """
  for epoch in range(algo.num_epochs):
    for index in range(algo.num_minibatches):
      yield _minibatch(sequences, key, epoch, index, num_minibatches=algo.num_minibatches,
                       num_microbatches=algo.num_microbatches)


@functools.partial(jax.jit, static_argnames=("num_minibatches", "num_microbatches"))
def _minibatch(sequences: learner.Batch, key: jax.Array, epoch: int, index: int, *,
               num_minibatches: int, num_microbatches: int) -> learner.Batch:
  """Minibatch `index` of `epoch` (see `minibatches`) as [M, b, ...], one program."""
  if num_minibatches > 1:
    num_sequences = sequences.tokens.shape[0]
    size = num_sequences // num_minibatches
    order = jax.random.permutation(jax.random.fold_in(key, 1 + epoch), num_sequences)
    rows = jax.lax.dynamic_slice_in_dim(order, index * size, size)
    sequences = jax.tree.map(lambda x: x[rows], sequences)
  return jax.tree.map(lambda x: learner.to_microbatches(x, num_microbatches), sequences)


class ScoredRollout(NamedTuple):
  """One RL step's rollout, scored on the host: what its update needs besides the parameters.

  Attributes:
    step: the RL step (from 0) it is for.
    version: the parameter version (updates done) that sampled it.
    rollout: the B·G sequences, group-major.
    rewards: [B, G] float32, validated for the advantage estimator.
    shape_record: the `reward_shape/...` statistics of its groups.
    seconds: `time/rollout` and `time/reward` of producing it (0 for one restored from a
      checkpoint).
  """
  step: int
  version: int
  rollout: Rollout
  rewards: np.ndarray
  shape_record: dict[str, Any]
  seconds: dict[str, float]


class RLStep:
  """One RL step on B prompts, in two halves a sampler can run ahead of the learner with.

  `sample(step, examples, version=)` draws G completions per prompt from the backend with the
  key of `step` and scores them on the host (decode, task rewards, the checks before jit);
  `learn(state, scored)` computes group advantages over the whole batch, rescores π_old (and
  π_ref) with the learner's own program (not π_old when the update is on-policy: one epoch of
  one minibatch, whose loss takes π_old from its own forward pass,
  `learner.policy_loss(on_policy=True)`), and runs mu epochs of minibatch updates (on the mesh,
  or through `gmpo_jax.pmap_step` with `config.parallelism='pmap'`; both take the same
  batches). With a stale rollout π_old is still the current parameters (the proximal policy of
  decoupled PPO) and `Rollout.policy_logprobs` the behaviour policy. Calling the object does
  both halves in lock step and pushes the new parameters to the backend: the synchronous loop
  (`config.rollout.max_staleness` = 0). Everything random derives from (`key`, step).

  Args:
    run: the run's task, tokenizer, meshes, model graph and shardings, and algorithm.
    backend: any `RolloutBackend` (the one `config.rollout.backend` names, or a test's).
    optimizer: the RL optimizer (`make_optimizer`).
    opt_shardings: the shardings of its state (`learner.init_opt_state`'s placement).
    key: the run's base key.
    ref_params: the frozen reference policy, needed when `algo.beta > 0`.
    compile_timer: an active `compilation.CompileTimer`; the step's record then holds
      `time/compile`, the seconds of the step's wall time in which programs were traced and
      compiled (or read from the persistent cache), by either thread.

  The record of a step holds the reward, reward-shape, advantage, loss and update statistics
  (with an importance correction, `is/weight_mean`, `is/weight_max` and `is/masked_fraction`),
  `rollout/staleness`, response lengths, compile count and timings (`TIMING_METRICS`), and the
  hardware rates of `gmpo_jax.perf`: `perf/train_tflops` (model FLOPs of the update, π_old and
  π_ref rescoring included, per second of `time/update`), `perf/mfu` (that over `self.peak`, the
  learner mesh's peak; absent on an accelerator `perf.CHIP_PEAK_TFLOPS` does not know, without
  `config.perf.peak_tflops`) and `perf/decode_gb_per_s` (the bytes the decode steps must read
  per second of `time/rollout`: a lower bound on the decode bandwidth, counted for the policy's
  model and the in-process sampler's cache dtype whatever the backend).
  """

  def __init__(self, run: Run, *, backend: RolloutBackend, optimizer: optax.GradientTransformation,
               opt_shardings: Any, key: jax.Array, ref_params: Any = None,
               compile_timer: compilation.CompileTimer | None = None):
    self.run, self.backend, self.key, self.ref_params = run, backend, key, ref_params
    self.compile_timer = compile_timer
    algo = run.algo
    temperature, chunk_size = run.sampling.logit_temperature, run.config.chunk_size
    # One optimizer step per rollout: π_old = π_θ, the parameters of the update.
    self.on_policy = algo.num_epochs == 1 and algo.num_minibatches == 1
    micro_loss = learner.policy_loss(algo, temperature=temperature, chunk_size=chunk_size,
                                     max_length=run.sampling.max_new_tokens,
                                     on_policy=self.on_policy)
    if run.config.parallelism == "pmap":
      self.update = pmap_step.make_pmap_update_fn(
          run.graphdef, optimizer, micro_loss, devices=list(run.mesh.devices.flat),
          param_shardings=run.param_shardings, opt_shardings=opt_shardings)
    else:
      self.update = learner.make_update_fn(run.graphdef, optimizer, micro_loss,
                                           param_shardings=run.param_shardings,
                                           opt_shardings=opt_shardings)
    self.policy_logprobs = learner.make_logprob_fn(run.graphdef, run.param_shardings, run.mesh,
                                                   temperature=temperature, chunk_size=chunk_size)
    self.advantage_fn = jax.jit(algo.advantage_fn())
    # Replicated, so every process can read the scalar of row-sharded inputs.
    self.mismatch_kl = jax.jit(learner.sampler_learner_kl,
                               out_shardings=sharding.replicated(run.mesh))
    self.model_config = nnx.merge(run.graphdef, run.params).config
    cache_dtype = run.sampling.cache_dtype or default_cache_dtype(
        self.model_config, backend=run.sampler_mesh.devices.flat[0].platform)
    self.decode_param_bytes = perf.decode_param_bytes(self.model_config)
    self.kv_bytes_per_position = perf.kv_bytes_per_position(self.model_config, cache_dtype)
    self.peak = perf.mesh_peak(list(run.mesh.devices.flat), override=run.config.perf.peak_tflops)
    if self.peak is None:
      logger.warning("perf: no peak known for %r; set config.perf.peak_tflops for perf/mfu",
                     run.mesh.devices.flat[0].device_kind)
    else:
      logger.info("perf: peak %.3g TFLOP/s (%.3g per device; %s)", self.peak.tflops,
                  self.peak.per_device, self.peak.source)

  def _perf_record(self, rollout: Rollout, completion: np.ndarray, *, update_seconds: float,
                   rollout_seconds: float) -> dict[str, float]:
    """The step's `perf/...` metrics (`perf.step_record`) for the update on `rollout`, whose
    completion lengths (`rollout.lengths`, on the host) are `completion`."""
    rows, length = rollout.tokens.shape
    flops = perf.update_flops(self.model_config, rows=rows, length=length,
                              num_epochs=self.run.algo.num_epochs,
                              rescore_old=not self.on_policy,
                              rescore_ref=self.ref_params is not None)
    decoded = perf.decode_bytes(
        param_bytes=self.decode_param_bytes, kv_bytes_per_position=self.kv_bytes_per_position,
        prompt_lengths=np.asarray(rollout.key_mask).sum(axis=1) - completion,
        completion_lengths=completion)
    return perf.step_record(flops=flops, update_seconds=update_seconds, peak=self.peak,
                            decoded_bytes=decoded, rollout_seconds=rollout_seconds)

  def _step_key(self, step: int) -> jax.Array:
    return jax.random.fold_in(self.key, step)

  def sample(self, step: int, examples: Sequence[Mapping[str, Any]], *, version: int
             ) -> ScoredRollout:
    """G completions of each example's prompt from the backend's parameters (`version`)."""
    run = self.run
    t0 = time.perf_counter()
    prompt_tokens, prompt_mask = encode_batch(
        [run.task.prompt(e) for e in examples for _ in range(run.algo.num_generations)],
        run.tokenizer)
    # The key lives on the learner's mesh; the sampler may have devices of its own.
    key = jax.device_put(jax.random.fold_in(self._step_key(step), 0),
                         sharding.replicated(run.sampler_mesh))
    with jax.set_mesh(run.sampler_mesh):
      rollout = self.backend.generate(prompt_tokens, prompt_mask, key)
    jax.block_until_ready(rollout.tokens)
    return self.score(step, examples, rollout, version=version,
                      rollout_seconds=time.perf_counter() - t0)

  def score(self, step: int, examples: Sequence[Mapping[str, Any]], rollout: Rollout, *,
            version: int, rollout_seconds: float = 0.0) -> ScoredRollout:
    """The host half of `sample` on a given rollout: decode, reward, validate."""
    run, algo = self.run, self.run.algo
    t1 = time.perf_counter()
    rewards = _rewards_for(run, rollout, examples)
    rewards = advantages_lib.validate_rewards(
        rewards, require_positive=algo.require_positive_rewards,
        require_non_negative=algo.reward_domain == "non_negative", offset=algo.offset,
        group_names=[repr(run.task.prompt(e)) for e in examples])
    # The advisor's `reward_shape/...` statistics of every group (before dynamic sampling);
    # NaN where not measurable, written as null.
    shape_record = reward_shape.reward_diagnostics(rewards)
    if step == 0:
      name, reason = reward_shape.recommend_advantage(shape_record)
      logger.info("reward shape at step 1: recommended advantage %r (%s)%s", name, reason,
                  "" if name == algo.advantage else
                  f"; differs from the configured advantage {algo.advantage!r}")
    return ScoredRollout(step=step, version=version, rollout=rollout, rewards=rewards,
                         shape_record=shape_record,
                         seconds={"time/rollout": rollout_seconds,
                                  "time/reward": time.perf_counter() - t1})

  def learn(self, state: RLState, scored: ScoredRollout) -> tuple[RLState, dict[str, Any]]:
    """The update of step `state.step` on its scored rollout; the record of the step."""
    if scored.step != state.step:
      raise ValueError(f"the rollout of step {scored.step} reached the update of step {state.step}")
    run, algo, on_policy = self.run, self.run.algo, self.on_policy
    t2 = time.perf_counter()
    params, opt_state, rewards = state.params, state.opt_state, scored.rewards
    # The learner's layout of the rollout, wherever it was sampled (the sampler's devices, a
    # checkpoint): replicated on the learner's mesh, as the shared-device sampler returns it.
    rollout = jax.device_put(scored.rollout, sharding.replicated(run.mesh))
    group_mask = np.ones(rewards.shape, bool)
    if algo.dynamic_sampling:
      group_mask &= (np.ptp(rewards, axis=1) > 0)[:, None]
    advantages = self.advantage_fn(rewards, group_mask)

    # pi_old is rescored by the learner's own program (same sharding, chunking and dtype as
    # the update) rather than taken from the sampler: the GMPO ratio exponentiates a sum of
    # per-token differences, so any sampler/learner numerical drift would accumulate.
    old_logp = (None if on_policy else
                self.policy_logprobs(params, rollout.tokens, rollout.key_mask))
    ref_logp = (None if self.ref_params is None else
                self.policy_logprobs(self.ref_params, rollout.tokens, rollout.key_mask))
    sequences = rollout_batch(
        rollout, advantages=advantages, group_mask=group_mask, old_logp=old_logp,
        ref_logp=ref_logp,
        behav_logp=(rollout.policy_logprobs if on_policy or algo.is_correction != "none"
                    else None))
    outputs = []
    for batch in minibatches(sequences, self._step_key(state.step), algo):
      params, opt_state, out = self.update(params, opt_state, learner.place_batch(batch, run.mesh))
      outputs.append(out)
    jax.block_until_ready(params)
    t3 = time.perf_counter()

    outputs = jax.device_get(outputs)
    skipped = sum(int(o.skipped) for o in outputs)
    lengths = np.asarray(rollout.lengths)
    adv = np.asarray(advantages)
    metrics = jax.tree.map(lambda *values: np.stack(values), *[o.metrics for o in outputs])
    record = {
        **group_statistics(rewards), **scored.shape_record,
        "rollout/staleness": state.step - scored.version,
        # On-policy, the update measured it from its own forward pass (in the record below).
        **({} if on_policy else {"mismatch/kl": float(self.mismatch_kl(
            old_logp, rollout.policy_logprobs, rollout.completion_mask))}),
        "advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()),
        "advantage/min": float(adv.min()), "advantage/max": float(adv.max()),
        "loss": float(np.mean([o.loss for o in outputs])),
        "grad_norm": float(np.mean([o.grad_norm for o in outputs])),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/truncated_fraction": float(1.0 - np.mean(np.asarray(rollout.finished))),
        "updates/skipped": skipped, "updates/skipped_total": state.skipped_updates + skipped,
        "compiles/update": self.update._cache_size(),  # pylint: disable=protected-access
        **scored.seconds, "time/update": t3 - t2,
        "tokens_per_sec": float(lengths.sum()) / max(scored.seconds["time/rollout"], 1e-9),
        **self._perf_record(rollout, lengths, update_seconds=t3 - t2,
                            rollout_seconds=scored.seconds["time/rollout"]),
        **metrics.combine().as_record(),
    }
    if skipped:
      logger.warning("step %d: %d update(s) skipped (non-finite loss or gradient)",
                     state.step + 1, skipped)
    return RLState(step=state.step + 1, params=params, opt_state=opt_state,
                   skipped_updates=state.skipped_updates + skipped), record

  def timings(self, record: dict[str, Any], *, start: float, wall_start: float,
              waited: float) -> dict[str, Any]:
    """`record` with the step's `time/wait_rollout`, `time/step` (from `start`, perf_counter)
    and `time/compile` (from `wall_start`, time.time)."""
    record["time/wait_rollout"] = waited
    record["time/step"] = time.perf_counter() - start
    if self.compile_timer is not None:
      record["time/compile"] = self.compile_timer.seconds(wall_start)
    return record

  def __call__(self, state: RLState, examples: Sequence[Mapping[str, Any]]
               ) -> tuple[RLState, dict[str, Any]]:
    """The synchronous step: sample with the current parameters, update, push them back."""
    t0, wall_start = time.perf_counter(), time.time()
    scored = self.sample(state.step, examples, version=state.step)
    waited = time.perf_counter() - t0
    state, record = self.learn(state, scored)
    self.backend.update_params(self.run.sampler_params(state.params))
    return state, self.timings(record, start=t0, wall_start=wall_start, waited=waited)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns the summary."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = _build_run(config, workdir)
  # Every jitted function traces under the run's mesh, so the model can pin its activations to
  # the batch axes (`sharding.constrain_to_batch_axes`); the mesh changes no value.
  # One SIGTERM/SIGINT handler for every phase: the warm start, the first evaluation and the RL
  # loop each save what is in flight and stop; a second signal forces the exit.
  # Freed compiler memory goes back to the OS after every compile (`HeapTrimmer`: peak RSS).
  with (jax.set_mesh(run.mesh), checkpointing.install_preemption_handler() as preemption,
        compilation.CompileTimer() as compile_timer, compilation.HeapTrimmer()):
    try:
      return _train(run, preemption, compile_timer)
    except Preempted as stopped:
      logger.warning("preempted during the %s; rerun the same command to resume", stopped)
      return {"preempted": str(stopped)}


def _shardings(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


# Checkpoint metadata: [{"step", "version"}] of the rollouts sampled ahead of the checkpoint's
# step (max_staleness >= 1); their arrays are `CheckpointState.arrays[_in_flight_name(step)]`.
IN_FLIGHT_METADATA_KEY = "in_flight_rollouts"


def _in_flight_name(step: int) -> str:
  return f"rollout_of_step_{step}"


def _producer_sample(rl_step: RLStep, stream: PromptStream, prompts_per_step: int):
  """The producer thread's work for one step: the backend gets the version's parameters, then
  samples the stream's next prompts (the producer runs in step order, so the order is the
  synchronous loop's)."""

  def sample(step: int, version: int, params: Any) -> ScoredRollout:
    rl_step.backend.update_params(params)
    return rl_step.sample(step, stream.take(prompts_per_step), version=version)

  return sample


def _learn_from(producer: async_rollout.RolloutProducer, rl_step: RLStep, state: RLState
                ) -> tuple[RLState, dict[str, Any]]:
  """The asynchronous step: wait for the step's rollout, update, publish the new version."""
  t0, wall_start = time.perf_counter(), time.time()
  scored = producer.take(state.step)
  waited = time.perf_counter() - t0
  state, record = rl_step.learn(state, scored)
  producer.publish(state.step, state.params)
  return state, rl_step.timings(record, start=t0, wall_start=wall_start, waited=waited)


def _train(run: Run, preemption: checkpointing.PreemptionHandler,
           compile_timer: compilation.CompileTimer) -> dict[str, Any]:
  config, workdir, algo = run.config, run.workdir, run.algo
  if config.warm_start.steps > 0:
    run.params, warm_start_result = warm_start(run, preemption)
  ref_params = jax.tree.map(jnp.copy, run.params) if algo.beta > 0 else None
  optimizer = make_optimizer(config.optim,
                             config.num_steps * algo.num_epochs * algo.num_minibatches)
  opt_state = learner.init_opt_state(optimizer, run.params, run.mesh)
  base_key, eval_key = jax.random.split(sharding.prng_key(config.seed, run.mesh))

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.keep,
                                    best_metric=config.checkpoint.best_metric, best_mode="max")
  target = checkpointing.CheckpointState(step=0, model=run.params, opt_state=opt_state,
                                         key=base_key, metadata={})
  # A workdir resumes only the experiment that wrote it (the fields in
  # `checkpointing.RESUMABLE_FIELDS` may differ); `resume_with_changes` accepts any change,
  # and the changes are logged and kept in every later checkpoint.
  resolved = json.loads(run.config_dict.to_json())
  restored = ckpt.restore_latest(target, config=resolved,
                                 allow_config_changes=config.resume_with_changes)
  config_record = checkpointing.config_record(resolved)
  if restored is not None and config.resume_with_changes:
    stored = restored.metadata.get(checkpointing.CONFIG_METADATA_KEY)
    changes = checkpointing.config_changes(stored, resolved) if stored else []
    if changes:
      logger.warning("resuming with config changes: %s", changes)
      config_record["resumed_with_changes"] = [
          [c.field, repr(c.stored), repr(c.current)] for c in changes]
  state, position, initial_eval = RLState(step=0, params=run.params, opt_state=opt_state), 0, None
  in_flight_entries = []
  if restored is not None:
    state = RLState(step=restored.step, params=restored.model, opt_state=restored.opt_state,
                    skipped_updates=int(restored.metadata["skipped_updates"]))
    position = int(restored.metadata["data_position"])
    initial_eval = restored.metadata.get("initial_eval")
    in_flight_entries = restored.metadata.get(IN_FLIGHT_METADATA_KEY, [])
    logger.info("resuming from step %d (data position %d)", state.step, position)
  start_step, start_position = state.step, position
  stream = PromptStream(run.train_examples, seed=config.seed, position=position)
  sampler_params = run.sampler_params(state.params)
  backend = rollout_lib.make_backend(config.rollout.backend, nnx.merge(run.graphdef, sampler_params),
                                     config=run.sampling, chunk_size=config.chunk_size)
  rl_step = RLStep(run, backend=backend, optimizer=optimizer, opt_shardings=_shardings(opt_state),
                   key=base_key, ref_params=ref_params, compile_timer=compile_timer)
  staleness = config.rollout.max_staleness
  # The rollouts of the next steps that older parameters sampled before the checkpoint: their
  # tokens come back from it, their rewards are recomputed from the same prompts.
  in_flight = []
  if in_flight_entries and staleness == 0:
    logger.warning("resuming with max_staleness 0: the %d rollout(s) in flight in the checkpoint "
                   "are sampled again from its parameters", len(in_flight_entries))
  elif in_flight_entries:
    for entry in in_flight_entries:
      rollout = Rollout(**restored.arrays[_in_flight_name(entry["step"])])
      in_flight.append(rl_step.score(entry["step"], stream.take(config.prompts_per_step), rollout,
                                     version=entry["version"]))

  writer = metrics_lib.MetricsWriter(
      workdir, total_steps=config.num_steps, start_step=state.step if restored else None,
      progress=config.progress,
      progress_keys=("reward/mean", "eval/pass@1", "loss"),
      best_modes={"eval/pass@1": "max", "eval/reward": "max", "reward/mean": "max"})
  if initial_eval is None:
    initial_eval = evaluate(run, state.params, eval_key, step=0)
    logger.info("before RL: %s", initial_eval)
    writer.write(0, initial_eval)
  writer.add_to_summary("initial_eval", initial_eval)
  if config.warm_start.steps > 0:
    writer.add_to_summary("warm_start", warm_start_result)
  if rl_step.peak is not None:
    writer.add_to_summary("perf", rl_step.peak._asdict())

  def checkpoint(state: RLState, in_flight: Sequence[ScoredRollout] = ()
                 ) -> checkpointing.CheckpointState:
    return checkpointing.CheckpointState(
        step=state.step, model=state.params, opt_state=state.opt_state, key=base_key,
        metadata={checkpointing.CONFIG_METADATA_KEY: config_record,
                  "data_position": start_position + config.prompts_per_step * (state.step - start_step),
                  "skipped_updates": state.skipped_updates, "initial_eval": initial_eval,
                  IN_FLIGHT_METADATA_KEY: [{"step": s.step, "version": s.version}
                                           for s in in_flight]},
        arrays={_in_flight_name(s.step): jax.tree.map(np.asarray, s.rollout._asdict())
                for s in in_flight})

  with writer, ckpt:
    if restored is None and preemption.requested_on_any_process():
      ckpt.save(checkpoint(state))  # the evaluation before RL is kept; the next run starts at step 1
      raise Preempted("first evaluation, saved as step 0")
    producer = None
    if staleness > 0:
      producer = async_rollout.RolloutProducer(
          _producer_sample(rl_step, stream, config.prompts_per_step),
          steps=range(state.step + len(in_flight), config.num_steps), max_staleness=staleness,
          first_version=state.step, params=sampler_params, place=run.sampler_params,
          ready={s.step: s for s in in_flight})
    try:
      while state.step < config.num_steps:
        if producer is None:
          state, record = rl_step(state, stream.take(config.prompts_per_step))
        else:
          state, record = _learn_from(producer, rl_step, state)
        done = state.step
        eval_due = done % config.eval_every == 0 or done == config.num_steps
        if eval_due:
          record.update(evaluate(run, state.params, eval_key, step=done))
        writer.write(done, record)
        # Every process must stop at the same step (the save below is collective).
        stop = preemption.requested_on_any_process()
        if eval_due or done % config.checkpoint.every == 0 or stop or done == config.num_steps:
          pending = (() if producer is None else
                     producer.peek(range(done, min(done + staleness, config.num_steps))))
          ckpt.save(
              checkpoint(state, pending),
              metrics={config.checkpoint.best_metric: record[config.checkpoint.best_metric]}
              if config.checkpoint.best_metric in record else None)
        if stop:
          logger.warning("preemption requested: checkpoint saved at step %d, exiting", done)
          break
    finally:
      if producer is not None:
        producer.close()
    # What RL added to its starting policy: the last evaluation minus the one before RL.
    final = writer.summary()["final"]
    writer.add_to_summary("eval_gain", {name: final[name] - value
                                        for name, value in initial_eval.items()
                                        if "/ci_" not in name and final.get(name) is not None})
    summary = writer.summary()
  n = config.eval.num_samples
  metrics_lib.plot_learning_curves(
      workdir,
      keys=[["reward/mean", "reward/geometric_mean"],
            ["eval/pass@1", f"eval/mean@{n}"] + [f"eval/maj@{k}" for k in config.eval.k if k > 1],
            "entropy", ["clip_fraction_low", "clip_fraction_high"], "approx_kl"],
      title=(f"{config.task.name} | advantage {algo.advantage} | objective {algo.objective} | "
             f"seed {config.seed}"))
  return summary
