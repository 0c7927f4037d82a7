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
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gmpo_jax import advantages as advantages_lib
from gmpo_jax import checkpointing
from gmpo_jax import distributed
from gmpo_jax import evaluation
from gmpo_jax import kl as kl_lib
from gmpo_jax import learner
from gmpo_jax import losses as losses_lib
from gmpo_jax import metrics as metrics_lib
from gmpo_jax import reward_shape
from gmpo_jax import sharding
from gmpo_jax import tasks as tasks_lib
from gmpo_jax import tokenization
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.logprobs import positions_from_mask, sequence_logprobs
from gmpo_jax.models import hf_import
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout import JaxRollout, Rollout
from gmpo_jax.sampling import SamplingConfig

logger = logging.getLogger(__name__)

EVAL_RESULTS_DIR = "eval_results"

# Timing metrics differ between otherwise identical runs; everything else must not.
TIMING_METRICS = ("time/step", "time/rollout", "time/reward", "time/update", "tokens_per_sec")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def build_tokenizer(model_config: ml_collections.ConfigDict) -> tokenization.Tokenizer:
  """`model.tokenizer` ('char' or a path); empty: the tokenizer.json of `model.hf_path`."""
  source = model_config.tokenizer or model_config.get("hf_path")
  if not source:
    raise ValueError("config.model.tokenizer is empty and there is no model.hf_path to read it from")
  return tokenization.load_tokenizer(source)


def build_model(model_config: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer,
                *, seed: int) -> Transformer:
  """The policy: a Hugging Face checkpoint from a local path, or a named config at random init."""
  if model_config.get("hf_path"):
    model, _ = hf_import.load_hf_checkpoint(model_config.hf_path,
                                            param_dtype=model_config.get("param_dtype") or None,
                                            dtype=model_config.get("dtype") or None)
    return model
  overrides = dict(model_config.get("overrides", {}))
  config = TransformerConfig.from_name(model_config.name)
  overrides["vocab_size"] = tokenizer.vocab_size
  for name in ("param_dtype", "dtype"):
    if model_config.get(name):
      overrides[name] = model_config[name]
  config = dataclasses.replace(config, **overrides)
  return Transformer(config, rngs=nnx.Rngs(seed))


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int
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


def sampler_learner_kl(learner_logp: jax.Array, sampler_logp: jax.Array,
                       mask: jax.Array) -> jax.Array:
  """Mean k3 estimate of KL(sampler ‖ learner) over the completion tokens ([B, T] each).

  The sampler's own log-probs of its tokens (`Rollout.policy_logprobs`, the untruncated
  temperature-scaled policy) against the learner's rescoring of the same tokens with the same
  parameters: 0 up to numerics. It measures the sampler/learner drift (another dtype, kernel or
  engine) that rescoring π_old hides from the ratio; x = log π_learner − log π_sampler and
  k3 = e^x − x − 1 on tokens drawn from the sampler. No completion token: 0.
  """
  k3 = kl_lib.kl_penalty(sampler_logp, learner_logp, estimator="k3")
  return losses_lib.aggregate_loss(k3, mask, mode="token-mean")


def to_microbatches(x: np.ndarray | jax.Array, num: int) -> jax.Array:
  """[N, ...] -> [num, N // num, ...]."""
  if x.shape[0] % num:
    raise ValueError(f"{x.shape[0]} sequences do not split into {num} micro-batches")
  return jnp.reshape(x, (num, x.shape[0] // num) + x.shape[1:])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything `train_and_evaluate` builds once, shared by warm start, training and eval."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  algo: AlgorithmConfig
  task: tasks_lib.Task
  tokenizer: tokenization.Tokenizer
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  params: Any
  param_shardings: Any
  sampling: SamplingConfig
  train_examples: Sequence[Mapping[str, Any]]
  eval_examples: Sequence[Mapping[str, Any]]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.sampling.all_stop_ids

  def place_batch(self, batch: learner.Batch) -> learner.Batch:
    """Micro-batched arrays [M, b, ...]: b is split over the data axes of the mesh."""
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, ndim=x.ndim,
                                                            batch_axis=1)), batch)


def _logprob_fn(run: Run, temperature: float, chunk_size: int):
  """Log-probs of rollout rows, data-parallel: rows split over data x fsdp like the learner's."""
  rows = sharding.batch_sharding(run.mesh, ndim=2)

  def logprobs(params, tokens, key_mask):
    model = nnx.merge(run.graphdef, params)
    return sequence_logprobs(model, tokens, positions_from_mask(key_mask), key_mask,
                             chunk_size=chunk_size, temperature=temperature)

  compiled = jax.jit(logprobs, in_shardings=(run.param_shardings, rows, rows),
                     out_shardings=rows)
  # The sampler's outputs come in the layout XLA chose for it; move them to the rows layout.
  return lambda params, tokens, key_mask: compiled(
      params, jax.device_put(tokens, rows), jax.device_put(key_mask, rows))


def _build_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Run:
  algo = AlgorithmConfig.from_config(config.algorithm)
  evaluation.check_ks(config.eval.k, config.eval.num_samples)
  task = tasks_lib.get_task(config.task.name, **config.task.get("kwargs", {}))
  algo.check_reward_range(task.reward_range)
  data_dir = str(config.task.get("data_dir") or workdir / "data")
  train_examples, eval_examples = distributed.primary_first(
      lambda: tuple(task.load(split, data_dir=data_dir)
                    for split in (config.task.train_split, config.task.eval_split)),
      name="task_data")
  tokenizer = build_tokenizer(config.model)
  model = build_model(config.model, tokenizer, seed=config.seed)
  mesh = sharding.make_mesh(**config.mesh)
  graphdef, params = nnx.split(model)
  param_shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  sampling_config = SamplingConfig(
      max_new_tokens=config.sampling.max_new_tokens, temperature=config.sampling.temperature,
      top_k=config.sampling.get("top_k"), top_p=config.sampling.top_p,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  return Run(config=config, workdir=workdir, algo=algo, task=task, tokenizer=tokenizer,
             mesh=mesh, graphdef=graphdef, params=params, param_shardings=param_shardings,
             sampling=sampling_config, train_examples=train_examples,
             eval_examples=eval_examples)


def _make_update(run: Run, optimizer, micro_loss, params, opt_state):
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  return learner.make_update_fn(
      run.graphdef, optimizer, micro_loss,
      in_shardings=(run.param_shardings, opt_shardings, None),
      out_shardings=(run.param_shardings, opt_shardings, None))


def _init_opt_state(optimizer, params, mesh):
  """Optimizer state placed like the parameters it mirrors; its scalars replicated on the mesh.

  Every leaf gets a `NamedSharding` on `mesh`, so the update step's explicit input and output
  shardings agree from the first call on (no recompile at step 2).
  """
  shardings = sharding.opt_state_shardings(
      optimizer, params, jax.tree.map(lambda x: x.sharding, params), mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


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
  opt_state = _init_opt_state(optimizer, run.params, run.mesh)
  key = sharding.prng_key(run.config.seed, run.mesh)
  signature = _warm_start_signature(run.config)
  target = checkpointing.CheckpointState(step=0, model=run.params, opt_state=opt_state,
                                         key=key, metadata={})
  target_rate = cfg.get("target_train_pass_rate")
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
    update = _make_update(run, optimizer, learner.supervised_loss(chunk_size=run.config.chunk_size),
                          run.params, opt_state)
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
      params, opt_state, out = update(params, opt_state, run.place_batch(batch))
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
  prompts = [run.task.prompt(e) for e in examples]
  tokens, mask = encode_batch(prompts, run.tokenizer)
  greedy = dataclasses.replace(run.sampling, temperature=0.0)
  best = run.task.reward_range[1]

  def pass_rate(params) -> float:
    backend = JaxRollout(nnx.merge(run.graphdef, params), config=greedy,
                         chunk_size=run.config.chunk_size)
    texts = decode_completions(backend.generate(tokens, mask, jax.random.key(0)),
                               run.tokenizer, run.stop_ids)
    return float(np.mean([run.task.reward(t, e) >= best - 1e-6
                          for t, e in zip(texts, examples)]))

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
  return jax.tree.map(lambda x: to_microbatches(x, 1), batch)


# --- Evaluation ------------------------------------------------------------------------------


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
  best = run.task.reward_range[1]
  completions = {}
  for name, temperature, n in (("greedy", 0.0, 1), ("sampled", cfg.temperature, cfg.num_samples)):
    config = dataclasses.replace(run.sampling, temperature=temperature)
    backend = JaxRollout(nnx.merge(run.graphdef, params), config=config,
                         chunk_size=run.config.chunk_size)
    tokens, mask = encode_batch([p for p in prompts for _ in range(n)], run.tokenizer)
    texts = decode_completions(backend.generate(tokens, mask, key), run.tokenizer, run.stop_ids)
    rewards = np.array([run.task.reward(t, examples[i // n]) for i, t in enumerate(texts)])
    completions[name] = ([texts[i * n:(i + 1) * n] for i in range(len(examples))],
                         (rewards >= best - 1e-6).reshape(len(examples), n),
                         rewards.reshape(len(examples), n))
  _, greedy_passed, greedy_rewards = completions["greedy"]
  sampled_texts, sampled_passed, _ = completions["sampled"]
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
  with jax.set_mesh(run.mesh), checkpointing.install_preemption_handler() as preemption:
    try:
      return _train(run, preemption)
    except Preempted as stopped:
      logger.warning("preempted during the %s; rerun the same command to resume", stopped)
      return {"preempted": str(stopped)}


def _train(run: Run, preemption: checkpointing.PreemptionHandler) -> dict[str, Any]:
  config, workdir, algo = run.config, run.workdir, run.algo
  if config.warm_start.steps > 0:
    run.params, warm_start_result = warm_start(run, preemption)
  ref_params = jax.tree.map(jnp.copy, run.params) if algo.beta > 0 else None

  g = algo.num_generations
  num_sequences = config.prompts_per_step * g
  multiple = sharding.batch_size_multiple(run.mesh) * algo.num_minibatches * algo.num_microbatches
  if num_sequences % multiple:
    raise ValueError(f"prompts_per_step x num_generations = {num_sequences} must be a multiple of "
                     f"data x fsdp x num_minibatches x num_microbatches = {multiple}")
  total_updates = config.num_steps * algo.num_epochs * algo.num_minibatches
  optimizer = make_optimizer(config.optim, total_updates)
  params = run.params
  opt_state = _init_opt_state(optimizer, params, run.mesh)
  base_key, eval_key = jax.random.split(sharding.prng_key(config.seed, run.mesh))
  max_new = run.sampling.max_new_tokens
  update = _make_update(run, optimizer, learner.policy_loss(
      algo, temperature=run.sampling.logit_temperature, chunk_size=config.chunk_size,
      max_length=max_new), params, opt_state)
  policy_logprobs = _logprob_fn(run, run.sampling.logit_temperature, config.chunk_size)
  advantage_fn = jax.jit(algo.advantage_fn())
  # Replicated, so every process can read the scalar of row-sharded inputs.
  mismatch_kl = jax.jit(sampler_learner_kl, out_shardings=sharding.replicated(run.mesh))

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.keep,
                                    best_metric=config.checkpoint.best_metric, best_mode="max")
  target = checkpointing.CheckpointState(step=0, model=params, opt_state=opt_state,
                                         key=base_key, metadata={})
  # A workdir resumes only the experiment that wrote it (the fields in
  # `checkpointing.RESUMABLE_FIELDS` may differ); `resume_with_changes` accepts any change,
  # and the changes are logged and kept in every later checkpoint.
  resolved = json.loads(config.to_json())
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
  start_step, position, skipped_total, initial_eval = 0, 0, 0, None
  if restored is not None:
    start_step, params, opt_state = restored.step, restored.model, restored.opt_state
    position = int(restored.metadata["data_position"])
    skipped_total = int(restored.metadata["skipped_updates"])
    initial_eval = restored.metadata.get("initial_eval")
    logger.info("resuming from step %d (data position %d)", start_step, position)
  stream = PromptStream(run.train_examples, seed=config.seed, position=position)
  backend = JaxRollout(nnx.merge(run.graphdef, params), config=run.sampling,
                       chunk_size=config.chunk_size)

  writer = metrics_lib.MetricsWriter(
      workdir, total_steps=config.num_steps, start_step=start_step if restored else None,
      progress=config.get("progress"),
      progress_keys=("reward/mean", "eval/pass@1", "loss"),
      best_modes={"eval/pass@1": "max", "eval/reward": "max", "reward/mean": "max"})
  if initial_eval is None:
    initial_eval = evaluate(run, params, eval_key, step=0)
    logger.info("before RL: %s", initial_eval)
    writer.write(0, initial_eval)
  writer.add_to_summary("initial_eval", initial_eval)
  if config.warm_start.steps > 0:
    writer.add_to_summary("warm_start", warm_start_result)

  def state(done: int) -> checkpointing.CheckpointState:
    return checkpointing.CheckpointState(
        step=done, model=params, opt_state=opt_state, key=base_key,
        metadata={checkpointing.CONFIG_METADATA_KEY: config_record,
                  "data_position": stream.position, "skipped_updates": skipped_total,
                  "initial_eval": initial_eval})

  with writer, ckpt:
    if restored is None and preemption.requested_on_any_process():
      ckpt.save(state(0))  # the evaluation before RL is kept; the next run starts at step 1
      raise Preempted("first evaluation, saved as step 0")
    for step in range(start_step, config.num_steps):
      t0 = time.perf_counter()
      step_key = jax.random.fold_in(base_key, step)
      examples = stream.take(config.prompts_per_step)
      prompt_tokens, prompt_mask = encode_batch(
          [run.task.prompt(e) for e in examples for _ in range(g)], run.tokenizer)
      rollout = backend.generate(prompt_tokens, prompt_mask, jax.random.fold_in(step_key, 0))
      jax.block_until_ready(rollout.tokens)
      t1 = time.perf_counter()

      rewards = _rewards_for(run, rollout, examples)
      rewards = advantages_lib.validate_rewards(
          rewards, require_positive=algo.require_positive_rewards,
          require_non_negative=algo.reward_domain == "non_negative", offset=algo.offset,
          group_names=[repr(run.task.prompt(e)) for e in examples])
      # The advisor's `reward_shape/...` statistics of every group (before dynamic sampling);
      # NaN where not measurable, written as null.
      shape_record = reward_shape.reward_diagnostics(rewards)
      if restored is None and step == start_step:
        name, reason = reward_shape.recommend_advantage(shape_record)
        logger.info("reward shape at step 1: recommended advantage %r (%s)%s", name, reason,
                    "" if name == algo.advantage else
                    f"; differs from the configured advantage {algo.advantage!r}")
      group_mask = np.ones(rewards.shape, bool)
      if algo.dynamic_sampling:
        group_mask &= (np.ptp(rewards, axis=1) > 0)[:, None]
      advantages = advantage_fn(jnp.asarray(rewards), jnp.asarray(group_mask))
      t2 = time.perf_counter()

      loss_mask = rollout.completion_mask & jnp.repeat(jnp.asarray(group_mask[:, 0]), g)[:, None]
      # pi_old is rescored by the learner's own program (same sharding, chunking and dtype as
      # the update) rather than taken from the sampler: the GMPO ratio exponentiates a sum of
      # per-token differences, so any sampler/learner numerical drift would accumulate.
      old_logp = policy_logprobs(params, rollout.tokens, rollout.key_mask)
      ref_logp = (policy_logprobs(ref_params, rollout.tokens, rollout.key_mask)
                  if ref_params is not None else jnp.zeros_like(old_logp))
      sequences = learner.Batch(
          tokens=rollout.tokens, positions=rollout.positions, key_mask=rollout.key_mask,
          loss_mask=loss_mask, old_logp=old_logp, ref_logp=ref_logp,
          advantages=advantages.reshape(-1))
      outputs = []
      for epoch in range(algo.num_epochs):
        order = jax.random.permutation(jax.random.fold_in(step_key, 1 + epoch), num_sequences)
        for minibatch in np.split(np.asarray(order), algo.num_minibatches):
          batch = jax.tree.map(lambda x: to_microbatches(x[minibatch], algo.num_microbatches),
                               sequences)
          params, opt_state, out = update(params, opt_state, run.place_batch(batch))
          outputs.append(out)
      backend.update_params(params)
      jax.block_until_ready(params)
      t3 = time.perf_counter()

      outputs = jax.device_get(outputs)
      skipped = sum(int(o.skipped) for o in outputs)
      skipped_total += skipped
      lengths = np.asarray(rollout.lengths)
      adv = np.asarray(advantages)
      record = {
          **group_statistics(rewards), **shape_record,
          "mismatch/kl": float(mismatch_kl(old_logp, rollout.policy_logprobs,
                                           rollout.completion_mask)),
          "advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()),
          "advantage/min": float(adv.min()), "advantage/max": float(adv.max()),
          "loss": float(np.mean([o.loss for o in outputs])),
          "grad_norm": float(np.mean([o.grad_norm for o in outputs])),
          "response_length/mean": float(lengths.mean()),
          "response_length/max": float(lengths.max()),
          "response_length/truncated_fraction": float(1.0 - np.mean(np.asarray(rollout.finished))),
          "updates/skipped": skipped, "updates/skipped_total": skipped_total,
          "compiles/update": update._cache_size(),  # pylint: disable=protected-access
          "time/step": t3 - t0, "time/rollout": t1 - t0, "time/reward": t2 - t1,
          "time/update": t3 - t2,
          "tokens_per_sec": float(lengths.sum()) / max(t1 - t0, 1e-9),
      }
      for name in outputs[0].metrics:
        values = [float(o.metrics[name]) for o in outputs]
        record[name] = float(learner.reduce_metric(name, np.asarray(values)))
      if skipped:
        logger.warning("step %d: %d update(s) skipped (non-finite loss or gradient)", step + 1,
                       skipped)

      done = step + 1
      eval_due = done % config.eval_every == 0 or done == config.num_steps
      if eval_due:
        record.update(evaluate(run, params, eval_key, step=done))
      writer.write(done, record)
      # Every process must stop at the same step (the save below is collective).
      stop = preemption.requested_on_any_process()
      if eval_due or done % config.checkpoint.every == 0 or stop or done == config.num_steps:
        ckpt.save(
            state(done),
            metrics={config.checkpoint.best_metric: record[config.checkpoint.best_metric]}
            if config.checkpoint.best_metric in record else None)
      if stop:
        logger.warning("preemption requested: checkpoint saved at step %d, exiting", done)
        break
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
