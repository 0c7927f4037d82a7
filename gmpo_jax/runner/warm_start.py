"""The supervised warm start that gives RL a policy which sometimes succeeds."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gmpo_jax.infra import checkpointing, preemption, sharding
from gmpo_jax.infra.preemption import Preempted
from gmpo_jax.infra.sharding import tree_shardings
from gmpo_jax.learner import precision
from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.runner.build import Run, make_optimizer
from gmpo_jax.runner.data import PromptStream, encode_batch
from gmpo_jax.runner.evaluate import train_pass_rate_probe
from gmpo_jax.runner.steps import run_steps

logger = logging.getLogger(__name__)

# Under a workdir: the warm start's cache, which `warm_start.init_from` may also name.
WARM_START_DIR = "warm_start"


class IncompatibleWarmStartError(ValueError):
  """`warm_start.init_from` names no finished warm start, or one of another task or model."""


def fingerprint(task: dict[str, Any], model: dict[str, Any]) -> str:
  """What a shared warm start must match to start another run: 16 hex digits of the SHA-256 of
  the task and model sections (the task's data_dir aside: a location, not the problems)."""
  task = {k: v for k, v in task.items() if k != "data_dir"}
  text = json.dumps({"task": task, "model": model}, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def init_from_directory(path: str | pathlib.Path) -> pathlib.Path:
  """The checkpoint directory `warm_start.init_from` names: PATH/warm_start when PATH is a
  workdir, else PATH itself."""
  path = pathlib.Path(path).expanduser()
  return path / WARM_START_DIR if (path / WARM_START_DIR).is_dir() else path


def warm_start(
    run: Run, preemption: preemption.PreemptionHandler, *, needed: bool = True
) -> tuple[Any | None, dict[str, float] | None]:
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

  The cache is rebuilt, never fatal: steps of it that do not verify (a changed byte, a deleted
  file) are moved to `warm_start/corrupted/` with a warning, and the warm start runs again, or,
  when it is not `needed` (RL resumes from its own checkpoint and has no KL reference to take
  from it), is skipped.

  Returns:
    The parameters and `{"warm_start/steps": steps taken, "warm_start/train_pass_rate": the
    last probe's rate (None without a target)}`; (None, None) when skipped.
  """
  cfg = run.config.warm_start
  if cfg.init_from is not None:
    return _shared_warm_start(run, needed=needed)
  directory = run.workdir / WARM_START_DIR
  # Its own rounding stream (bfloat16 parameters), as its own data order: seed + 1.
  optimizer = make_optimizer(
      cfg.optim, cfg.steps, param_dtype=run.config.model.trained_dtype, seed=run.config.seed + 1
  )
  lost_update_warning = precision.LostUpdateWarning()
  opt_state = learner.init_opt_state(optimizer, run.params, run.mesh)
  key = sharding.prng_key(run.config.seed, run.mesh)
  signature = _warm_start_signature(run.config_dict)
  target = checkpointing.CheckpointState(
      step=0, model=run.params, opt_state=opt_state, key=key, metadata={}
  )
  target_rate = cfg.target_train_pass_rate
  with checkpointing.Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    try:
      restored = ckpt.restore_latest(target)
    except checkpointing.UnrestorableCheckpointsError as error:
      ckpt.move_aside(error.steps)
      logger.warning(
          "warm start: no step of the cache in %s restores (%s); moved step(s) %s to " "%s and %s",
          directory,
          error.problems,
          list(error.steps),
          directory / checkpointing.CORRUPTED_DIR,
          "recomputing it"
          if needed
          else "skipping it: RL resumes from its own checkpoint, which does not need it",
      )
      restored = None
    params, first, rate = jax.tree.map(jnp.copy, run.params), 0, None
    if restored is not None and restored.metadata.get("signature") == signature:
      info = restored.metadata.get("result")
      if info is not None:
        logger.info("warm start: reusing %s (step %d)", directory, restored.step)
        return restored.model, info
      params, opt_state, first = restored.model, restored.opt_state, restored.step
      logger.info("warm start: resuming at step %d of %d", first, cfg.steps)
    if not needed:
      logger.info("warm start: skipped (RL resumes from its own checkpoint)")
      return None, None
    update = learner.make_update_fn(
        run.graphdef,
        optimizer,
        learner.supervised_loss(chunk_size=run.config.chunk_size),
        param_shardings=run.param_shardings,
        opt_shardings=tree_shardings(opt_state),
    )
    probe = train_pass_rate_probe(run, cfg.probe_size) if target_rate is not None else None
    stream = PromptStream(
        run.train_examples, seed=run.config.seed + 1, position=first * cfg.batch_size
    )
    start = time.perf_counter()

    def take_step(step: int) -> tuple[int, bool]:
      nonlocal params, opt_state, rate
      examples = stream.take(cfg.batch_size)
      prompts = [run.task.prompt(e) for e in examples]
      solutions = [run.task.demonstration(e) for e in examples]
      batch = _supervised_batch(run, prompts, solutions)
      params, opt_state, out = update(params, opt_state, learner.place_batch(batch, run.mesh))
      step += 1
      if step % max(cfg.steps // 5, 1) == 1 or step == cfg.steps:
        logger.info("warm start step %d/%d: nll %.4f", step, cfg.steps, float(out.loss))
        lost_update_warning(float(out.lost_fraction), step=step, where="warm start")
      if probe is None or step % cfg.probe_every:
        return step, False
      rate = probe(params)
      logger.info("warm start step %d: train pass rate %.3f (target %.3f)", step, rate, target_rate)
      return step, rate >= target_rate

    def save(step: int, last: bool) -> None:
      # Only the finished pass records its result: a run that finds it reuses it as is.
      ckpt.save(
          checkpointing.CheckpointState(
              step=step,
              model=params,
              opt_state=opt_state,
              key=key,
              metadata={"signature": signature, "result": _result(step, rate) if last else None},
          )
      )

    step, preempted = run_steps(
        first,
        cfg.steps,
        take_step=take_step,
        save=save,
        decisions=ckpt,  # no periodic saves: its policy is None
        preemption=preemption,
    )
    if preempted:
      raise Preempted(f"warm start, step {step} of {cfg.steps} saved")
    logger.info("warm start: %d steps in %.1fs", step - first, time.perf_counter() - start)
  return params, _result(step, rate)


def _result(steps: int, rate: float | None) -> dict[str, Any]:
  """What the warm start reports, and its cache keeps once it is complete."""
  return {"warm_start/steps": steps, "warm_start/train_pass_rate": rate}


def _shared_warm_start(run: Run, *, needed: bool) -> tuple[Any | None, dict[str, Any] | None]:
  """The finished warm start `warm_start.init_from` names, read and never written.

  Raises:
    IncompatibleWarmStartError: no such directory, no finished warm start in it, or one whose
      task or model differs from this run's (the message names the differing fields).
  """
  source = run.config.warm_start.init_from
  directory = init_from_directory(source)
  if not directory.is_dir():
    raise IncompatibleWarmStartError(f"warm_start.init_from={source!r}: no such directory")
  if not needed:
    logger.info("warm start: not loaded from %s (RL resumes from its own checkpoint)", directory)
    return None, None
  signature = _warm_start_signature(run.config_dict)
  with checkpointing.Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    step = ckpt.latest_step
    metadata = ckpt.restore_metadata(step) if step is not None else {}
    stored = metadata.get("signature")
    if stored is None or metadata.get("result") is None:
      raise IncompatibleWarmStartError(
          f"warm_start.init_from={source!r}: {directory} holds no finished warm start "
          f"({'no checkpoint' if step is None else f'step {step} is unfinished'})"
      )
    here = fingerprint(signature["task"], signature["model"])
    there = fingerprint(stored["task"], stored["model"])
    if here != there:
      ours = checkpointing.flatten_config({"task": signature["task"], "model": signature["model"]})
      theirs = checkpointing.flatten_config({"task": stored["task"], "model": stored["model"]})
      differ = [
          f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
          for k in sorted(ours.keys() | theirs.keys())
          if k != "task.data_dir" and ours.get(k) != theirs.get(k)
      ]
      raise IncompatibleWarmStartError(
          f"warm_start.init_from={source!r} is a warm start of another task or model "
          f"(fingerprint {there}, this run's {here}): {'; '.join(differ)}"
      )
    if stored.get("seed") != run.config.seed:
      # Allowed (a deliberate choice), but every point of a paired grid should share its seed's.
      logger.warning(
          "warm start: %s was trained with seed %s, this run has seed %d",
          directory,
          stored.get("seed"),
          run.config.seed,
      )
    optimizer = make_optimizer(
        run.config.warm_start.optim,
        run.config.warm_start.steps,
        param_dtype=run.config.model.trained_dtype,
        seed=run.config.seed + 1,
    )
    target = checkpointing.CheckpointState(
        step=0,
        model=run.params,
        opt_state=learner.init_opt_state(optimizer, run.params, run.mesh),
        key=sharding.prng_key(run.config.seed, run.mesh),
        metadata={},
    )
    restored = ckpt.restore(step, target)
  logger.info("warm start: %s (fingerprint %s, step %d)", directory, there, step)
  return restored.model, {
      **metadata["result"],
      "warm_start/fingerprint": there,
      "warm_start/init_from": str(directory.resolve()),
  }


def _warm_start_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the cached warm start depends on (its own settings, the task, the model, the seed);
  a change to any of them retrains it. Not `init_from`: with it set, no cache is written. Not
  `model.lora`: the warm start trains the full model, which a LoRA run then adapts, so
  full-parameter and LoRA runs of a seed share it."""
  settings = json.loads(config.warm_start.to_json())
  settings.pop("init_from", None)
  model = json.loads(config.model.to_json())
  model.pop("lora", None)
  return {
      "warm_start": settings,
      "task": json.loads(config.task.to_json()),
      "model": model,
      "seed": config.seed,
      "chunk_size": config.chunk_size,
  }


def _supervised_batch(run: Run, prompts: Sequence[str], solutions: Sequence[str]) -> learner.Batch:
  prompt_tokens, prompt_mask = encode_batch(prompts, run.tokenizer)
  full_tokens, full_mask = encode_batch([p + s for p, s in zip(prompts, solutions)], run.tokenizer)
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
      tokens=tokens,
      positions=positions_from_mask(jnp.asarray(key_mask)),
      key_mask=key_mask,
      loss_mask=loss_mask,
      old_logp=zeros,
      ref_logp=zeros,
      advantages=np.zeros(len(prompts), np.float32),
  )
  return jax.tree.map(lambda x: learner.to_microbatches(x, 1), batch)
