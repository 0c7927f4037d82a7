"""One RL step: sample and score a rollout, then advantages, π_old / π_ref log-probs and the
minibatch updates.

One concept: the RL step, from prompts to parameter updates, hence its length.

Per step: B prompts, each repeated G times; completions from the rollout backend; rewards
on the host, validated before they enter jit (a non-finite or, for the log-reward baseline,
non-positive reward is an error naming the prompt); group advantages by the configured
estimator; mu epochs of minibatch updates with the configured objective
(`gmpo_jax.learner.update`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmpo_jax.algo import advantages as advantages_lib
from gmpo_jax.algo import reward_shape
from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.infra import compilation, sharding
from gmpo_jax.learner import pmap_update as pmap_step
from gmpo_jax.learner import precision
from gmpo_jax.learner import update as learner
from gmpo_jax.models.transformer import default_cache_dtype
from gmpo_jax.rollout.backends import Rollout, RolloutBackend
from gmpo_jax.runner import build, perf
from gmpo_jax.runner.build import Run
from gmpo_jax.runner.data import decode_completions, encode_batch

logger = logging.getLogger(__name__)


# Timing metrics differ between otherwise identical runs; everything else must not. The perf/...
# rates divide by the same times (`gmpo_jax.runner.perf`).
TIMING_METRICS = (
    "time/step",
    "time/rollout",
    "time/reward",
    "time/update",
    "time/compile",
    "time/wait_rollout",
    "tokens_per_sec",
    "perf/train_tflops",
    "perf/mfu",
    "perf/decode_gb_per_s",
)


def overlong_penalty(
    lengths: np.ndarray, *, max_new_tokens: int, buffer: int, penalty: float
) -> np.ndarray:
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


def rewards_for(run: Run, rollout: Rollout, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
  g = run.algo.num_generations
  texts = decode_completions(rollout, run.tokenizer, run.stop_ids)
  rewards = np.array(
      [run.task.reward(t, examples[i // g]) for i, t in enumerate(texts)], np.float32
  )
  rewards += overlong_penalty(
      np.asarray(rollout.lengths),
      max_new_tokens=run.sampling.max_new_tokens,
      buffer=run.algo.overlong_buffer,
      penalty=run.algo.overlong_penalty,
  )
  return rewards.reshape(len(examples), g)


class RLState(NamedTuple):
  """What an RL step changes: RL steps done, the policy's parameters and optimizer state, and
  the number of updates skipped so far (non-finite loss or gradient)."""

  step: int
  params: Any
  opt_state: Any
  skipped_updates: int = 0


@jax.jit
def rollout_batch(
    rollout: Rollout,
    *,
    advantages: jax.Array,
    group_mask: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    behav_logp: jax.Array | None = None,
) -> learner.Batch:
  """The learner's [N, ...] view of a rollout of N = B·G sequences (group-major), one program.

  Args:
    rollout: the sequences (`tokens`, `positions`, `key_mask`, `completion_mask` are used).
    advantages: [B, G] float32, one per sequence.
    group_mask: [B, G] bool; a masked completion (dynamic sampling masks whole groups) keeps
      its advantage but none of its tokens is trained or counted.
    old_logp, ref_logp: [N, T] float32 log-probs under the rollout and reference policies;
      old_logp is None for an on-policy update (`build.policy_loss(on_policy=True)`),
      ref_logp None without a reference (the batch then holds zeros).
    behav_logp: [N, T] float32 log-probs under the behaviour policy (the sampler's own,
      `rollout.policy_logprobs`) for the importance correction; None without one.
  """
  valid = group_mask.reshape(-1)
  if ref_logp is None:
    ref_logp = jnp.zeros(rollout.tokens.shape, jnp.float32)
  return learner.Batch(
      tokens=rollout.tokens,
      positions=rollout.positions,
      key_mask=rollout.key_mask,
      loss_mask=rollout.completion_mask & valid[:, None],
      old_logp=old_logp,
      ref_logp=ref_logp,
      advantages=advantages.reshape(-1),
      behav_logp=behav_logp,
  )


def minibatches(sequences: learner.Batch, key: jax.Array, algo: AlgorithmConfig):
  """Yields the micro-batched input of every optimizer step over one rollout: mu epochs, each a
  fresh permutation (from `fold_in(key, 1 + epoch)`) cut into `num_minibatches` parts.

  With one minibatch every epoch trains on the whole rollout, whose loss and gradient are sums
  over its sequences (`learner.Counts`): their order changes nothing but float rounding, so the
  rollout is used as it is, without the permutation's gather.
  """
  for epoch in range(algo.num_epochs):
    for index in range(algo.num_minibatches):
      yield _minibatch(
          sequences,
          key,
          epoch,
          index,
          num_minibatches=algo.num_minibatches,
          num_microbatches=algo.num_microbatches,
      )


@functools.partial(jax.jit, static_argnames=("num_minibatches", "num_microbatches"))
def _minibatch(
    sequences: learner.Batch,
    key: jax.Array,
    epoch: int,
    index: int,
    *,
    num_minibatches: int,
    num_microbatches: int,
) -> learner.Batch:
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
  `build.policy_loss(on_policy=True)`), and runs mu epochs of minibatch updates (on the mesh,
  or through `gmpo_jax.learner.pmap_update` with `config.parallelism='pmap'`; both take the same
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
  (`update/relative_change` and `update/lost_fraction`, `learner.UpdateOutput`, averaged over
  the step's updates, with one warning the first time the latter exceeds 1%; with an
  importance correction, `is/weight_mean`, `is/weight_max` and `is/masked_fraction`),
  `rollout/staleness`, response lengths, compile count and timings (`TIMING_METRICS`), and the
  hardware rates of `gmpo_jax.runner.perf`: `perf/train_tflops` (model FLOPs of the update, π_old and
  π_ref rescoring included, per second of `time/update`), `perf/mfu` (that over `self.peak`, the
  learner mesh's peak; absent on an accelerator `perf.CHIP_PEAK_TFLOPS` does not know, without
  `config.perf.peak_tflops`) and `perf/decode_gb_per_s` (the bytes the decode steps must read
  per second of `time/rollout`: a lower bound on the decode bandwidth, counted for the policy's
  model and the in-process sampler's cache dtype whatever the backend).
  """

  def __init__(
      self,
      run: Run,
      *,
      backend: RolloutBackend,
      optimizer: optax.GradientTransformation,
      opt_shardings: Any,
      key: jax.Array,
      ref_params: Any = None,
      compile_timer: compilation.CompileTimer | None = None,
  ):
    self.run, self.backend, self.key, self.ref_params = run, backend, key, ref_params
    self.compile_timer = compile_timer
    algo = run.algo
    temperature, chunk_size = run.sampling.logit_temperature, run.config.chunk_size
    # One optimizer step per rollout: π_old = π_θ, the parameters of the update.
    self.on_policy = algo.num_epochs == 1 and algo.num_minibatches == 1
    micro_loss = build.policy_loss(
        algo,
        temperature=temperature,
        chunk_size=chunk_size,
        max_length=run.sampling.max_new_tokens,
        on_policy=self.on_policy,
    )
    if run.config.parallelism == "pmap":
      self.update = pmap_step.make_pmap_update_fn(
          run.graphdef,
          optimizer,
          micro_loss,
          devices=list(run.mesh.devices.flat),
          param_shardings=run.param_shardings,
          opt_shardings=opt_shardings,
      )
    else:
      self.update = learner.make_update_fn(
          run.graphdef,
          optimizer,
          micro_loss,
          param_shardings=run.param_shardings,
          opt_shardings=opt_shardings,
          trainable=run.trainable,
      )
    self.policy_logprobs = learner.make_logprob_fn(
        run.graphdef, run.param_shardings, run.mesh, temperature=temperature, chunk_size=chunk_size
    )
    self.advantage_fn = jax.jit(build.advantage_fn(algo))
    self.lost_update_warning = precision.LostUpdateWarning()
    # Replicated, so every process can read the scalar of row-sharded inputs.
    self.mismatch_kl = jax.jit(
        learner.sampler_learner_kl, out_shardings=sharding.replicated(run.mesh)
    )
    self.model_config = nnx.merge(run.graphdef, run.params).config
    cache_dtype = run.sampling.cache_dtype or default_cache_dtype(
        self.model_config, backend=run.sampler_mesh.devices.flat[0].platform
    )
    self.decode_param_bytes = perf.decode_param_bytes(self.model_config)
    self.kv_bytes_per_position = perf.kv_bytes_per_position(self.model_config, cache_dtype)
    self.peak = perf.mesh_peak(list(run.mesh.devices.flat), override=run.config.perf.peak_tflops)
    if self.peak is None:
      logger.warning(
          "perf: no peak known for %r; set config.perf.peak_tflops for perf/mfu",
          run.mesh.devices.flat[0].device_kind,
      )
    else:
      logger.info(
          "perf: peak %.3g TFLOP/s (%.3g per device; %s)",
          self.peak.tflops,
          self.peak.per_device,
          self.peak.source,
      )

  def _perf_record(
      self,
      rollout: Rollout,
      completion: np.ndarray,
      *,
      update_seconds: float,
      rollout_seconds: float,
  ) -> dict[str, float]:
    """The step's `perf/...` metrics (`perf.step_record`) for the update on `rollout`, whose
    completion lengths (`rollout.lengths`, on the host) are `completion`."""
    rows, length = rollout.tokens.shape
    flops = perf.update_flops(
        self.model_config,
        rows=rows,
        length=length,
        num_epochs=self.run.algo.num_epochs,
        rescore_old=not self.on_policy,
        rescore_ref=self.ref_params is not None,
    )
    decoded = perf.decode_bytes(
        param_bytes=self.decode_param_bytes,
        kv_bytes_per_position=self.kv_bytes_per_position,
        prompt_lengths=np.asarray(rollout.key_mask).sum(axis=1) - completion,
        completion_lengths=completion,
    )
    return perf.step_record(
        flops=flops,
        update_seconds=update_seconds,
        peak=self.peak,
        decoded_bytes=decoded,
        rollout_seconds=rollout_seconds,
    )

  def _step_key(self, step: int) -> jax.Array:
    return jax.random.fold_in(self.key, step)

  def sample(
      self, step: int, examples: Sequence[Mapping[str, Any]], *, version: int
  ) -> ScoredRollout:
    """G completions of each example's prompt from the backend's parameters (`version`)."""
    run = self.run
    t0 = time.perf_counter()
    prompt_tokens, prompt_mask = encode_batch(
        [run.task.prompt(e) for e in examples for _ in range(run.algo.num_generations)],
        run.tokenizer,
    )
    # The key lives on the learner's mesh; the sampler may have devices of its own.
    key = jax.device_put(
        jax.random.fold_in(self._step_key(step), 0), sharding.replicated(run.sampler_mesh)
    )
    with jax.set_mesh(run.sampler_mesh):
      rollout = self.backend.generate(prompt_tokens, prompt_mask, key)
    jax.block_until_ready(rollout.tokens)
    return self.score(
        step, examples, rollout, version=version, rollout_seconds=time.perf_counter() - t0
    )

  def score(
      self,
      step: int,
      examples: Sequence[Mapping[str, Any]],
      rollout: Rollout,
      *,
      version: int,
      rollout_seconds: float = 0.0,
  ) -> ScoredRollout:
    """The host half of `sample` on a given rollout: decode, reward, validate."""
    run, algo = self.run, self.run.algo
    t1 = time.perf_counter()
    rewards = rewards_for(run, rollout, examples)
    rewards = advantages_lib.validate_rewards(
        rewards,
        require_positive=algo.require_positive_rewards,
        require_non_negative=algo.reward_domain == "non_negative",
        offset=algo.offset,
        group_names=[repr(run.task.prompt(e)) for e in examples],
    )
    # The advisor's `reward_shape/...` statistics of every group (before dynamic sampling);
    # NaN where not measurable, written as null.
    shape_record = reward_shape.reward_diagnostics(rewards)
    if step == 0:
      name, reason = reward_shape.recommend_advantage(shape_record)
      logger.info(
          "reward shape at step 1: recommended advantage %r (%s)%s",
          name,
          reason,
          ""
          if name == algo.advantage
          else f"; differs from the configured advantage {algo.advantage!r}",
      )
    return ScoredRollout(
        step=step,
        version=version,
        rollout=rollout,
        rewards=rewards,
        shape_record=shape_record,
        seconds={"time/rollout": rollout_seconds, "time/reward": time.perf_counter() - t1},
    )

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
    old_logp = None if on_policy else self.policy_logprobs(params, rollout.tokens, rollout.key_mask)
    ref_logp = (
        None
        if self.ref_params is None
        else self.policy_logprobs(self.ref_params, rollout.tokens, rollout.key_mask)
    )
    sequences = rollout_batch(
        rollout,
        advantages=advantages,
        group_mask=group_mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        behav_logp=(rollout.policy_logprobs if on_policy or algo.is_correction != "none" else None),
    )
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
        **group_statistics(rewards),
        **scored.shape_record,
        "rollout/staleness": state.step - scored.version,
        # On-policy, the update measured it from its own forward pass (in the record below).
        **(
            {}
            if on_policy
            else {
                "mismatch/kl": float(
                    self.mismatch_kl(old_logp, rollout.policy_logprobs, rollout.completion_mask)
                )
            }
        ),
        "advantage/mean": float(adv.mean()),
        "advantage/std": float(adv.std()),
        "advantage/min": float(adv.min()),
        "advantage/max": float(adv.max()),
        "loss": float(np.mean([o.loss for o in outputs])),
        "grad_norm": float(np.mean([o.grad_norm for o in outputs])),
        # What reached the stored parameters, averaged over the step's updates.
        "update/relative_change": float(np.mean([o.relative_change for o in outputs])),
        "update/lost_fraction": float(np.mean([o.lost_fraction for o in outputs])),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/truncated_fraction": float(1.0 - np.mean(np.asarray(rollout.finished))),
        "updates/skipped": skipped,
        "updates/skipped_total": state.skipped_updates + skipped,
        "compiles/update": self.update._cache_size(),  # pylint: disable=protected-access
        **scored.seconds,
        "time/update": t3 - t2,
        "tokens_per_sec": float(lengths.sum()) / max(scored.seconds["time/rollout"], 1e-9),
        **self._perf_record(
            rollout, lengths, update_seconds=t3 - t2, rollout_seconds=scored.seconds["time/rollout"]
        ),
        **metrics.combine().as_record(),
    }
    if skipped:
      logger.warning(
          "step %d: %d update(s) skipped (non-finite loss or gradient)", state.step + 1, skipped
      )
    self.lost_update_warning(record["update/lost_fraction"], step=state.step + 1, where="RL")
    return (
        RLState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped_updates=state.skipped_updates + skipped,
        ),
        record,
    )

  def timings(
      self, record: dict[str, Any], *, start: float, wall_start: float, waited: float
  ) -> dict[str, Any]:
    """`record` with the step's `time/wait_rollout`, `time/step` (from `start`, perf_counter)
    and `time/compile` (from `wall_start`, time.time)."""
    record["time/wait_rollout"] = waited
    record["time/step"] = time.perf_counter() - start
    if self.compile_timer is not None:
      record["time/compile"] = self.compile_timer.seconds(wall_start)
    return record

  def __call__(
      self, state: RLState, examples: Sequence[Mapping[str, Any]]
  ) -> tuple[RLState, dict[str, Any]]:
    """The synchronous step: sample with the current parameters, update, push them back."""
    t0, wall_start = time.perf_counter(), time.time()
    scored = self.sample(state.step, examples, version=state.step)
    waited = time.perf_counter() - t0
    state, record = self.learn(state, scored)
    self.backend.update_params(self.run.sampler_params(state.params))
    return state, self.timings(record, start=t0, wall_start=wall_start, waited=waited)
