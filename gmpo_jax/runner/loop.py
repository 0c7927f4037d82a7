"""The experiment runner: config -> rollouts -> rewards -> advantages -> policy update.

`train_and_evaluate(config, workdir)` runs one experiment (flax-examples style; the command
line is `gmpo_jax.main`). Per step:

1. B prompts from the task's train split, in a seeded order that the checkpoint records
   (the data position), each repeated G times;
2. completions from the rollout backend (`gmpo_jax.rollout.backends`: the in-process KV-cache sampler);
3. rewards on the host, validated before they enter jit (a non-finite or, for the log-reward
   baseline, non-positive reward is an error naming the prompt);
4. group advantages by the configured estimator, old (and reference) log-probs;
5. mu epochs of minibatch updates with the configured objective (`gmpo_jax.learner.update`).

Everything random derives from (seed, step), the data order from (seed, epoch), and the
checkpoint holds parameters, optimizer state, step, key and data position, so a run killed at
any step and resumed reproduces the uninterrupted run's metrics exactly. It also holds the
metrics logged up to its step, which a resume checks metrics.jsonl against and restores it from
(`gmpo_jax.infra.metrics`). A full disk ends the run with one line (`disk_full.DiskFullError`:
the step being saved, where, and the last complete step).
"""

from __future__ import annotations

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
import orbax.checkpoint as ocp
from flax import nnx

from gmpo_jax.infra import checkpointing, compilation, disk_full, preemption, sharding, workdir_lock
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.infra.preemption import Preempted
from gmpo_jax.infra.sharding import tree_shardings
from gmpo_jax.learner import update as learner
from gmpo_jax.rollout import backends as rollout_lib
from gmpo_jax.rollout import producer as async_rollout
from gmpo_jax.rollout.backends import Rollout
from gmpo_jax.runner import profiling
from gmpo_jax.runner.build import Run, attach_lora, build_run, make_optimizer
from gmpo_jax.runner.data import PromptStream
from gmpo_jax.runner.evaluate import evaluate
from gmpo_jax.runner.rl_step import RLState, RLStep, ScoredRollout
from gmpo_jax.runner.state import (
    METRICS_HISTORY_KEY,
    InFlightRollout,
    RunState,
    check_lora_base,
    in_flight_name,
)
from gmpo_jax.runner.steps import run_steps
from gmpo_jax.runner.warm_start import fingerprint, warm_start

logger = logging.getLogger(__name__)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    metric_writers: Sequence[metrics_lib.MetricWriter] = (),
) -> dict[str, Any]:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns the summary.

  `metric_writers`: backends of the caller's (W&B, a dashboard) that get every record of the RL
  loop after metrics.jsonl and TensorBoard (`MetricsWriter(extra_writers=)`), on every process.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # One run per workdir: a second one is refused before it writes anything.
  with workdir_lock.hold(workdir):
    run = build_run(config, workdir)
    # Every jitted function traces under the run's mesh, so the model can pin its activations to
    # the batch axes (`sharding.constrain_to_batch_axes`); the mesh changes no value.
    # One SIGTERM/SIGINT handler for every phase: the warm start, the first evaluation and the RL
    # loop each save what is in flight and stop; a second signal forces the exit.
    # Freed compiler memory goes back to the OS after every compile (`HeapTrimmer`: peak RSS).
    with (
        jax.set_mesh(run.mesh),
        preemption.install_preemption_handler() as handler,
        compilation.CompileTimer() as compile_timer,
        compilation.HeapTrimmer(),
    ):
      try:
        return _train(run, handler, compile_timer, metric_writers)
      except Preempted as stopped:
        logger.warning("preempted during the %s; rerun the same command to resume", stopped)
        return {"preempted": str(stopped)}


WARM_START_SUMMARY = "warm_start.json"


def warm_start_only(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
  """Runs (or resumes, or reuses) only the warm start of `config` in `workdir`, for other runs
  to start from (`warm_start.init_from`); returns and writes `workdir/warm_start.json`: its
  result and the fingerprint an `init_from` run checks."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir):
    run = build_run(config, workdir)
    if run.config.warm_start.steps == 0 or run.config.warm_start.init_from is not None:
      raise ValueError("a warm-start-only run needs warm_start.steps > 0 and no init_from")
    with jax.set_mesh(run.mesh), preemption.install_preemption_handler() as handler:
      try:
        _, result = warm_start(run, handler)
      except Preempted as stopped:
        logger.warning("preempted during the %s; rerun the same command to resume", stopped)
        return {"preempted": str(stopped)}
    summary = {
        "result": result,
        "fingerprint": fingerprint(
            json.loads(run.config_dict.task.to_json()), json.loads(run.config_dict.model.to_json())
        ),
    }
    (workdir / WARM_START_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _has_warm_start(config) -> bool:
  return config.warm_start.steps > 0 or config.warm_start.init_from is not None


def _producer_sample(rl_step: RLStep, stream: PromptStream, prompts_per_step: int):
  """The producer thread's work for one step: the backend gets the version's parameters, then
  samples the stream's next prompts (the producer runs in step order, so the order is the
  synchronous loop's)."""

  def sample(step: int, version: int, params: Any) -> ScoredRollout:
    rl_step.backend.update_params(params)
    return rl_step.sample(step, stream.take(prompts_per_step), version=version)

  return sample


def _learn_from(
    producer: async_rollout.RolloutProducer, rl_step: RLStep, state: RLState
) -> tuple[RLState, dict[str, Any]]:
  """The asynchronous step: wait for the step's rollout, update, publish the new version."""
  t0, wall_start = time.perf_counter(), time.time()
  scored = producer.take(state.step)
  waited = time.perf_counter() - t0
  state, record = rl_step.learn(state, scored)
  producer.publish(state.step, state.params)
  return state, rl_step.timings(record, start=t0, wall_start=wall_start, waited=waited)


def _train(
    run: Run,
    preemption: preemption.PreemptionHandler,
    compile_timer: compilation.CompileTimer,
    metric_writers: Sequence[metrics_lib.MetricWriter],
) -> dict[str, Any]:
  config = run.config
  # Closed on every path out: a save that failed in the background (a full disk) is reported by
  # `close` at the latest, once its files are removed.
  with checkpointing.Checkpointer(
      run.workdir / "checkpoints",
      max_to_keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric,
      best_mode="max",
      # Every `checkpoint.every` steps, and at each evaluation (its metrics rank the best step).
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
          [
              ocp.checkpoint_managers.FixedIntervalPolicy(config.checkpoint.every),
              ocp.checkpoint_managers.FixedIntervalPolicy(config.eval_every),
          ]
      ),
  ) as ckpt:
    warm_start_result = None
    if _has_warm_start(config):
      # With an RL checkpoint to resume from, the warm start's policy is needed only as the KL
      # reference or a LoRA run's frozen base; otherwise a damaged warm-start cache is skipped,
      # not recomputed.
      params, warm_start_result = warm_start(
          run,
          preemption,
          needed=(ckpt.latest_step is None or run.algo.beta > 0 or config.model.lora is not None),
      )
      if params is not None:
        run.params = params
    if config.model.lora is not None:
      attach_lora(run, base_path=_base_path(run, warm_start_result))
    return _resume_and_train(
        run, ckpt, warm_start_result, preemption, compile_timer, metric_writers
    )


def _base_path(run: Run, warm_start_result: dict[str, Any] | None) -> str:
  """Where a LoRA run's frozen base comes from, in words (its fingerprint is what is checked)."""
  model = run.config.model
  start = (
      model.hf_path
      if model.hf_path is not None
      else (f"{model.name} at random init (seed {run.config.seed})")
  )
  if run.config.warm_start.steps > 0:
    steps = (warm_start_result or {}).get("warm_start/steps")
    start += f", then the warm start in {run.workdir / 'warm_start'} ({steps} steps)"
  return start


def _resume_and_train(
    run: Run,
    ckpt: checkpointing.Checkpointer,
    warm_start_result: dict[str, Any] | None,
    preemption: preemption.PreemptionHandler,
    compile_timer: compilation.CompileTimer,
    metric_writers: Sequence[metrics_lib.MetricWriter],
) -> dict[str, Any]:
  config, workdir, algo = run.config, run.workdir, run.algo
  # The update donates (and so invalidates) only the trained parameters: a LoRA run's
  # reference shares the frozen base and copies the adapters.
  ref_params = (
      run.with_trained(jax.tree.map(jnp.copy, run.trained_params(run.params)), run.params)
      if algo.beta > 0
      else None
  )
  optimizer = make_optimizer(
      config.optim,
      config.num_steps * algo.num_epochs * algo.num_minibatches,
      param_dtype=config.model.trained_dtype,
      seed=config.seed,
  )
  opt_state = learner.init_opt_state(optimizer, run.trained_params(run.params), run.mesh)
  base_key, eval_key = jax.random.split(sharding.prng_key(config.seed, run.mesh))

  # A LoRA run's checkpoints hold its adapters; the base is named in the run state.
  target = checkpointing.CheckpointState(
      step=0, model=run.trained_params(run.params), opt_state=opt_state, key=base_key, metadata={}
  )
  # A workdir resumes only the experiment that wrote it (the fields in
  # `checkpointing.RESUMABLE_FIELDS` may differ); `resume_with_changes` accepts any change,
  # and the changes are logged and kept in every later checkpoint.
  resolved = json.loads(run.config_dict.to_json())
  restored = ckpt.restore_latest(
      target, config=resolved, allow_config_changes=config.resume_with_changes
  )
  config_record = checkpointing.config_record(resolved)
  if restored is not None and config.resume_with_changes:
    stored = restored.metadata.get(checkpointing.CONFIG_METADATA_KEY)
    changes = checkpointing.config_changes(stored, resolved) if stored else []
    if changes:
      logger.warning("resuming with config changes: %s", changes)
      config_record["resumed_with_changes"] = [
          [c.field, repr(c.stored), repr(c.current)] for c in changes
      ]
  state, position, initial_eval = RLState(step=0, params=run.params, opt_state=opt_state), 0, None
  in_flight_entries, history = (), None
  if restored is not None:
    stored = RunState.from_metadata(restored.metadata)
    check_lora_base(stored.lora_base, run.lora_base)
    state = RLState(
        step=restored.step,
        params=run.with_trained(restored.model, run.params),
        opt_state=restored.opt_state,
        skipped_updates=stored.skipped_updates,
    )
    position, initial_eval, in_flight_entries = (
        stored.data_position,
        stored.initial_eval,
        stored.in_flight,
    )
    if warm_start_result is None:  # not run (not needed): what the checkpoint recorded of it
      warm_start_result = stored.warm_start
    if restored.arrays is not None and METRICS_HISTORY_KEY in restored.arrays:
      history = restored.arrays[METRICS_HISTORY_KEY].tobytes()
    logger.info("resuming from step %d (data position %d)", state.step, position)
  start_step, start_position = state.step, position
  stream = PromptStream(run.train_examples, seed=config.seed, position=position)
  sampler_params = run.sampler_params(state.params)
  backend = rollout_lib.make_backend(
      config.rollout.backend,
      nnx.merge(run.graphdef, sampler_params),
      config=run.sampling,
      chunk_size=config.chunk_size,
  )
  rl_step = RLStep(
      run,
      backend=backend,
      optimizer=optimizer,
      opt_shardings=tree_shardings(opt_state),
      key=base_key,
      ref_params=ref_params,
      compile_timer=compile_timer,
  )
  staleness = config.rollout.max_staleness
  # The rollouts of the next steps that older parameters sampled before the checkpoint: their
  # tokens come back from it, their rewards are recomputed from the same prompts.
  in_flight = []
  if in_flight_entries and staleness == 0:
    logger.warning(
        "resuming with max_staleness 0: the %d rollout(s) in flight in the checkpoint "
        "are sampled again from its parameters",
        len(in_flight_entries),
    )
  elif in_flight_entries:
    for entry in in_flight_entries:
      rollout = Rollout(**restored.arrays[in_flight_name(entry.step)])
      in_flight.append(
          rl_step.score(
              entry.step, stream.take(config.prompts_per_step), rollout, version=entry.version
          )
      )

  try:
    writer = metrics_lib.MetricsWriter(
        workdir,
        total_steps=config.num_steps,
        start_step=state.step if restored else None,
        history=history,
        progress=config.progress,
        progress_keys=("reward/mean", "eval/pass@1", "loss"),
        best_modes={"eval/pass@1": "max", "eval/reward": "max", "reward/mean": "max"},
        extra_writers=metric_writers,
    )
    if initial_eval is None:
      initial_eval = evaluate(run, state.params, eval_key, step=0)
      logger.info("before RL: %s", initial_eval)
      writer.write(0, initial_eval)
    writer.add_to_summary("initial_eval", initial_eval)
    if _has_warm_start(config):
      writer.add_to_summary("warm_start", warm_start_result)
    if rl_step.peak is not None:
      writer.add_to_summary("perf", rl_step.peak._asdict())

    def checkpoint(
        state: RLState, in_flight: Sequence[ScoredRollout] = ()
    ) -> checkpointing.CheckpointState:
      arrays = {
          in_flight_name(s.step): jax.tree.map(np.asarray, s.rollout._asdict()) for s in in_flight
      }
      # The run's history up to this step travels with it (`MetricsWriter(history=...)`).
      arrays[METRICS_HISTORY_KEY] = np.frombuffer(writer.history, np.uint8)
      return checkpointing.CheckpointState(
          step=state.step,
          model=run.trained_params(state.params),
          opt_state=state.opt_state,
          key=base_key,
          metadata=RunState(
              data_position=start_position + config.prompts_per_step * (state.step - start_step),
              skipped_updates=state.skipped_updates,
              initial_eval=initial_eval,
              config_record=config_record,
              in_flight=tuple(InFlightRollout(step=s.step, version=s.version) for s in in_flight),
              warm_start=warm_start_result,
              lora_base=run.lora_base,
          ).to_metadata(),
          arrays=arrays,
      )

    with writer:
      if restored is None and preemption.requested_on_any_process():
        ckpt.save(checkpoint(state))  # the evaluation before RL is kept; the next run starts at 1
        raise Preempted("first evaluation, saved as step 0")
      producer = None
      if staleness > 0:
        producer = async_rollout.RolloutProducer(
            _producer_sample(rl_step, stream, config.prompts_per_step),
            steps=range(state.step + len(in_flight), config.num_steps),
            max_staleness=staleness,
            first_version=state.step,
            params=sampler_params,
            place=run.sampler_params,
            ready={s.step: s for s in in_flight},
        )
      eval_due = lambda done: done % config.eval_every == 0 or done == config.num_steps
      record: dict[str, Any] = {}

      trace = profiling.StepTrace(config.perf.profile_steps, workdir / "profile")

      def take_step(step: int) -> tuple[int, bool]:
        nonlocal state, record
        del step  # state.step
        trace.before(state.step + 1)
        if producer is None:
          state, record = rl_step(state, stream.take(config.prompts_per_step))
        else:
          state, record = _learn_from(producer, rl_step, state)
        if eval_due(state.step):
          record.update(evaluate(run, state.params, eval_key, step=state.step))
        writer.write(state.step, record)
        trace.after(state.step)
        return state.step, False

      def save(done: int, last: bool) -> None:
        pending = (
            ()
            if producer is None
            else producer.peek(range(done, min(done + staleness, config.num_steps)))
        )
        ckpt.save(
            checkpoint(state, pending),
            metrics={config.checkpoint.best_metric: record[config.checkpoint.best_metric]}
            if config.checkpoint.best_metric in record
            else None,
        )

      try:
        done, preempted = run_steps(
            state.step,
            config.num_steps,
            take_step=take_step,
            save=save,
            decisions=ckpt,
            preemption=preemption,
        )
        if preempted:
          logger.warning("preemption requested: checkpoint saved at step %d, exiting", done)
      finally:
        trace.close()
        if producer is not None:
          producer.close()
      # What RL added to its starting policy: the last evaluation minus the one before RL.
      final = writer.summary()["final"]
      writer.add_to_summary(
          "eval_gain",
          {
              name: final[name] - value
              for name, value in initial_eval.items()
              if "/ci_" not in name and final.get(name) is not None
          },
      )
      summary = writer.summary()
    # The last save is on disk before the run says it is done.
    ckpt.wait_until_finished()
    n = config.eval.num_samples
    metrics_lib.plot_learning_curves(
        workdir,
        keys=[
            ["reward/mean", "reward/geometric_mean"],
            ["eval/pass@1", f"eval/mean@{n}"] + [f"eval/maj@{k}" for k in config.eval.k if k > 1],
            "entropy",
            ["clip_fraction_low", "clip_fraction_high"],
            "approx_kl",
        ],
        title=(
            f"{config.task.name} | advantage {algo.advantage} | objective {algo.objective} | "
            f"seed {config.seed}"
        ),
    )
    return summary
  except OSError as error:
    # A full disk met outside a checkpoint save (metrics, TensorBoard, summary, plot): the same
    # one line as for a save.
    if not disk_full.is_disk_full(error):
      raise
    raise disk_full.DiskFullError(
        step=state.step, path=error.filename or workdir, last_complete=ckpt.latest_step
    ) from error
