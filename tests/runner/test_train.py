"""The runner end to end on `configs/smoke.py`: train, checkpoint, stop, resume, compare."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from experiments import fault_table
from gmpo_jax.algo import pass_at_k as evaluation
from gmpo_jax.config import AlgorithmConfig, ModelConfig
from gmpo_jax.infra import checkpointing, disk_full, preemption, sharding
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.learner import update as learner
from gmpo_jax.models.transformer import Transformer
from gmpo_jax.rollout import backends as rollout_lib
from gmpo_jax.rollout import sampling
from gmpo_jax.runner import build, evaluate, loop, perf, rl_step, warm_start
from gmpo_jax.runner.state import InFlightRollout, RunState


def _records(workdir):
  return [
      {k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS}
      for r in metrics_lib.read_metrics(workdir)
  ]


class _StreamedRecords(metrics_lib.MetricWriter):
  """A backend of the caller's, as `train_and_evaluate(metric_writers=)` takes one."""

  def __init__(self):
    self.records, self.closed = [], False

  def write_scalars(self, step, scalars):
    self.records.append({"step": step, **scalars})

  def close(self):
    self.closed = True


_STREAMED = _StreamedRecords()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  summary = loop.train_and_evaluate(smoke.get_config(), workdir, metric_writers=[_STREAMED])
  return workdir, summary


def test_a_callers_writer_gets_every_record_of_metrics_jsonl(uninterrupted):
  workdir, _ = uninterrupted
  # The same records, NaN and inf as the floats they are where the file has null.
  want = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in _STREAMED.records] == [r["step"] for r in want]
  for got, record in zip(_STREAMED.records, want):
    assert got.keys() == record.keys()
    for key, value in record.items():
      assert got[key] == value or (value is None and not math.isfinite(got[key])), key
  assert _STREAMED.closed


def test_run_writes_metrics_checkpoints_and_plot(uninterrupted):
  workdir, summary = uninterrupted
  config = smoke.get_config()
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(config.num_steps + 1))
  assert "eval/pass@1" in records[0]  # the evaluation before any RL update
  for key in (
      "reward/mean",
      "reward/geometric_mean",
      "advantage/std",
      "loss",
      "grad_norm",
      "clip_fraction_low",
      "ratio_max",
      "entropy",
      "groups/zero_std_fraction",
      "response_length/mean",
      "mismatch/kl",
      "update/relative_change",
      "update/lost_fraction",
  ):
    assert key in records[1], key
  # float32 parameters: the updates reach them, none is rounded away (a step whose groups all
  # tie has zero advantages and no update).
  assert any(r["update/relative_change"] > 0 for r in records[1:])
  assert all(r["update/lost_fraction"] < 0.01 for r in records[1:])
  # The sampler and the learner score the same tokens with the same parameters in float32.
  assert all(0 <= r["mismatch/kl"] < 1e-5 for r in records[1:])
  # Without an importance correction (the default) no weight is computed or logged.
  assert not any(key.startswith("is/") for key in records[1])
  # The reward-shape advisor's statistics, every RL step (null where not measurable).
  assert records[1]["reward_shape/groups"] == config.prompts_per_step
  assert 0 <= records[1]["reward_shape/zero_std_group_fraction"] <= 1
  assert all("reward_shape/tail_index" in r for r in records[1:])
  # The update step compiles once, on the first step, and never again.
  assert all(r["compiles/update"] == 1 for r in records[1:])
  # The first RL step makes the rollout and update programs; time/compile is part of the step.
  timed = metrics_lib.read_metrics(workdir)[1:]
  assert timed[0]["time/compile"] > 0
  assert all(0 <= r["time/compile"] <= r["time/step"] + 0.01 for r in timed)
  assert (workdir / metrics_lib.PLOT_FILE).exists()
  assert list((workdir / "tensorboard").iterdir())
  assert summary["initial_eval"]["eval/pass@1"] == records[0]["eval/pass@1"]
  assert (workdir / "warm_start").exists()
  # The smoke config's target (0) is met at the first probe, after probe_every = 3 steps.
  assert summary["warm_start"]["warm_start/steps"] == 3
  assert 0 <= summary["warm_start"]["warm_start/train_pass_rate"] <= 1
  # summary.json keeps the evaluation before RL and what RL added to it.
  saved = json.loads((workdir / metrics_lib.SUMMARY_FILE).read_text())
  assert saved["initial_eval"] == summary["initial_eval"]
  last_eval = [r for r in records if "eval/pass@1" in r][-1]
  assert saved["eval_gain"]["eval/pass@1"] == pytest.approx(
      last_eval["eval/pass@1"] - records[0]["eval/pass@1"]
  )
  # Every evaluation: intervals beside each number, and the per-prompt results on disk.
  n = config.eval.num_samples
  for name in ("pass@1", f"mean@{n}", f"pass@{n}", f"maj@{n}"):
    assert (
        records[0][f"eval/{name}/ci_low"]
        <= records[0][f"eval/{name}"]
        <= records[0][f"eval/{name}/ci_high"]
    ), name
  for record in records:
    if "eval/pass@1" in record:
      path = workdir / evaluate.EVAL_RESULTS_DIR / f"step_{record['step']:06d}.jsonl"
      recomputed = evaluation.summarize(evaluation.read_results(path), config.eval.k)
      assert recomputed == pytest.approx({k: record[k] for k in recomputed}), path


def test_every_rl_step_logs_its_hardware_rates(uninterrupted):
  workdir, summary = uninterrupted
  # On the CPU the peak is the measured matmul probe, and the summary says so.
  assert summary["perf"]["source"] == perf.SOURCE_CPU_PROBE
  assert summary["perf"]["tflops"] == perf.cpu_matmul_tflops()  # the same process's probe
  for record in metrics_lib.read_metrics(workdir)[1:]:
    for key in ("perf/train_tflops", "perf/mfu", "perf/decode_gb_per_s"):
      assert key in rl_step.TIMING_METRICS  # rates of timings: not compared across runs
      assert math.isfinite(record[key]) and record[key] > 0, (record["step"], key)
    assert record["perf/mfu"] == pytest.approx(
        record["perf/train_tflops"] / summary["perf"]["tflops"]
    )


@pytest.mark.parametrize("stop", ["sigterm", "sync_point"])
def test_a_stop_then_resume_reproduces_the_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch, stop
):
  reference = _records(uninterrupted[0])
  workdir = tmp_path / "resumed"
  with monkeypatch.context() as patch:
    if stop == "sigterm":  # the real handler: save, then leave the loop
      write = metrics_lib.MetricsWriter.write

      def write_then_preempt(self, step, record):
        write(self, step, record)
        if step == 2:
          os.kill(os.getpid(), signal.SIGTERM)

      patch.setattr(metrics_lib.MetricsWriter, "write", write_then_preempt)
    else:  # a multi-host run: the coordination service's preemption step, in the RL loop
      rl_checkpoints = workdir / "checkpoints"
      patch.setattr(
          checkpointing.Checkpointer,
          "reached_preemption",
          lambda self, step: self.directory == rl_checkpoints and step == 2,
      )
    loop.train_and_evaluate(smoke.get_config(), workdir)
  assert [r["step"] for r in _records(workdir)] == [0, 1, 2]

  loop.train_and_evaluate(smoke.get_config(), workdir)
  resumed = _records(workdir)
  assert [r["step"] for r in resumed] == [r["step"] for r in reference]
  for got, want in zip(resumed, reference):
    assert got.keys() == want.keys()
    for key in want:
      if want[key] is None:  # a non-finite metric (e.g. reward_shape/tail_index), as null
        assert got[key] is None, (want["step"], key)
        continue
      np.testing.assert_allclose(
          got[key], want[key], rtol=1e-6, err_msg=f"step {want['step']} {key}"
      )


@pytest.mark.parametrize("phase", ["warm_start", "first_evaluation"])
def test_sigterm_outside_the_rl_loop_saves_and_resumes_exactly(
    uninterrupted, tmp_path, monkeypatch, phase
):
  reference = _records(uninterrupted[0])
  workdir = tmp_path / phase
  target = "_supervised_batch" if phase == "warm_start" else "evaluate"
  module = warm_start if phase == "warm_start" else loop
  original = getattr(module, target)
  calls = []

  def call_then_preempt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 or target == "evaluate":
      os.kill(os.getpid(), signal.SIGTERM)  # the real handler, mid-phase
    return original(*args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(module, target, call_then_preempt)
    summary = loop.train_and_evaluate(smoke.get_config(), workdir)
  assert "preempted" in summary
  # No RL step is saved during the warm start (the directory exists: it is opened first).
  assert not list((workdir / "checkpoints").glob("[0-9]*")) or phase == "first_evaluation"
  loop.train_and_evaluate(smoke.get_config(), workdir)
  resumed = _records(workdir)
  assert [r["step"] for r in resumed] == [r["step"] for r in reference]
  for got, want in zip(resumed, reference):
    for key in want:
      if want[key] is None:
        assert got[key] is None, (want["step"], key)
        continue
      np.testing.assert_allclose(
          got[key], want[key], rtol=1e-6, err_msg=f"step {want['step']} {key}"
      )


def test_warm_start_stops_at_the_first_probe_that_reaches_the_target(tmp_path, monkeypatch):
  config = smoke.get_config()
  config.warm_start.steps, config.warm_start.target_train_pass_rate = 9, 0.3
  config.warm_start.probe_every = 2
  rates = iter([0.1, 0.29, 0.31, 0.9])
  monkeypatch.setattr(
      warm_start, "train_pass_rate_probe", lambda run, size: lambda params: next(rates)
  )
  run = build.build_run(config, tmp_path)
  with preemption.install_preemption_handler() as handler:
    params, result = warm_start.warm_start(run, handler)
    assert result == {"warm_start/steps": 6, "warm_start/train_pass_rate": 0.31}
    # The finished pass is cached with its result: no more steps, no more probes.
    again, cached = warm_start.warm_start(run, handler)
  assert cached == result
  assert next(rates) == 0.9
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_rerun_of_a_finished_workdir_does_nothing_new(uninterrupted):
  workdir, _ = uninterrupted
  before = (workdir / metrics_lib.METRICS_FILE).read_text()
  loop.train_and_evaluate(smoke.get_config(), workdir)
  assert (workdir / metrics_lib.METRICS_FILE).read_text() == before


def test_a_workdir_of_another_experiment_is_refused_unless_changes_are_allowed(
    uninterrupted, tmp_path
):
  workdir = tmp_path / "copy"
  shutil.copytree(uninterrupted[0], workdir)
  before = (workdir / metrics_lib.METRICS_FILE).read_text()
  config = smoke.get_config()
  config.algorithm.advantage = "grpo"
  config.optim.learning_rate = 3e-4
  with pytest.raises(
      checkpointing.ConfigMismatchError, match=r"algorithm.advantage[\s\S]*optim.learning_rate"
  ):
    loop.train_and_evaluate(config, workdir)
  assert (workdir / metrics_lib.METRICS_FILE).read_text() == before
  config.resume_with_changes = True
  loop.train_and_evaluate(config, workdir)  # accepted: finished, so nothing new to run
  # Fields that do not change the experiment never count.
  config = smoke.get_config()
  config.eval_every = 1
  loop.train_and_evaluate(config, workdir)


def test_sampler_learner_kl_is_k3_over_completion_tokens():
  mask = np.array([[False, True, True], [False, False, True]])
  sampler = np.array([[0.0, -1.0, -2.0], [0.0, 0.0, -0.5]])
  rescored = np.array([[50.0, -1.2, -1.9], [90.0, 0.0, -0.5]])  # masked entries differ freely
  x = np.array([-0.2, 0.1, 0.0])
  assert float(learner.sampler_learner_kl(rescored, sampler, mask)) == pytest.approx(
      np.mean(np.exp(x) - x - 1), rel=1e-5
  )
  assert float(learner.sampler_learner_kl(rescored, sampler, np.zeros((2, 3), bool))) == 0.0


@pytest.mark.parametrize("num_minibatches,num_microbatches", [(1, 2), (2, 2), (4, 1)])
def test_minibatches_are_the_permuted_rows_as_micro_batches_from_one_program(
    num_minibatches, num_microbatches, backend_compiles
):
  n, t = 8, 3
  rng = np.random.default_rng(num_minibatches)
  sequences = learner.Batch(
      tokens=np.arange(n * t, dtype=np.int32).reshape(n, t),
      positions=rng.integers(0, 9, (n, t)),
      key_mask=rng.random((n, t)) > 0.3,
      loss_mask=rng.random((n, t)) > 0.5,
      old_logp=None,
      ref_logp=rng.normal(size=(n, t)).astype(np.float32),
      advantages=rng.normal(size=n).astype(np.float32),
  )
  algo = AlgorithmConfig(
      num_epochs=2, num_minibatches=num_minibatches, num_microbatches=num_microbatches
  )
  key = jax.random.key(7)
  backend_compiles.clear()
  batches = list(rl_step.minibatches(sequences, key, algo))
  assert len(backend_compiles) <= 1  # eagerly: fold_in, permutation, a gather and a reshape each
  assert len(batches) == 2 * num_minibatches
  for epoch in range(2):
    # One minibatch trains on the rollout as it is; more take a fresh permutation per epoch.
    order = (
        np.arange(n)
        if num_minibatches == 1
        else np.asarray(jax.random.permutation(jax.random.fold_in(key, 1 + epoch), n))
    )
    for index, rows in enumerate(np.split(order, num_minibatches)):
      got = batches[epoch * num_minibatches + index]
      assert got.old_logp is None
      for name in ("tokens", "positions", "key_mask", "loss_mask", "ref_logp", "advantages"):
        want = getattr(sequences, name)[rows]
        np.testing.assert_array_equal(
            getattr(got, name), want.reshape((num_microbatches, -1) + want.shape[1:])
        )


def test_a_model_is_built_by_one_program_with_the_eager_initializer_values(backend_compiles):
  model_config = ModelConfig(name="tiny", tokenizer="char", overrides=(("num_layers", 3),))
  tokenizer = build.build_tokenizer(model_config)
  built = build.build_model(model_config, tokenizer, seed=5)
  assert len(backend_compiles) <= 1
  eager = Transformer(built.config, rngs=nnx.Rngs(5))
  # The same keys and initializers; XLA fuses the 0.02 scale into the normal draw, which moves
  # some values by one unit in the last place.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-9),
      nnx.state(built, nnx.Param),
      nnx.state(eager, nnx.Param),
  )


def test_overlong_penalty_is_linear_in_the_buffer():
  lengths = np.array([0, 6, 7, 8, 9, 10])
  got = rl_step.overlong_penalty(lengths, max_new_tokens=10, buffer=4, penalty=2.0)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0, -1.5, -2.0])
  np.testing.assert_array_equal(
      rl_step.overlong_penalty(lengths, max_new_tokens=10, buffer=0, penalty=2.0), 0.0
  )


def test_group_statistics_of_a_batch():
  rewards = np.array([[10.0, 10.0, 10.0, 1000.0], [2.0, 2.0, 2.0, 2.0]])
  stats = rl_step.group_statistics(rewards)
  assert stats["groups/zero_std_fraction"] == 0.5
  np.testing.assert_allclose(stats["reward/mean"], rewards.mean())
  np.testing.assert_allclose(stats["reward/geometric_mean"], np.exp(np.log(rewards).mean()))


def test_reference_model_kl_dynamic_sampling_and_overlong_penalty(tmp_path):
  config = smoke.get_config()
  config.num_steps = 2
  config.algorithm.beta = 0.05
  config.algorithm.dynamic_sampling = True
  config.algorithm.overlong_buffer = 1
  config.algorithm.overlong_penalty = 0.005  # keeps the rewards positive for the log baseline
  loop.train_and_evaluate(config, tmp_path)
  records = _records(tmp_path)[1:]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["kl"]) for r in records)
  # After the first update the policy differs from the frozen reference.
  assert records[-1]["kl"] > 0


def test_rewards_outside_the_estimators_domain_fail_before_any_work(tmp_path):
  config = smoke.get_config()
  config.task.kwargs = dict(config.task.kwargs, min_reward=0.0)  # log(0) for the log baseline
  with pytest.raises(ValueError, match="R \\+ offset > 0"):
    loop.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "data").exists()
  config.eval.k = (0,)
  with pytest.raises(ValueError, match="eval.k"):
    loop.train_and_evaluate(config, tmp_path)


def test_misspelt_or_invalid_algorithm_options_fail_before_training(tmp_path):
  config = smoke.get_config()
  config.algorithm.objective = "geometrik"
  with pytest.raises(ValueError, match="geometric"):
    loop.train_and_evaluate(config, tmp_path)


class ScriptedRollout:
  """A `RolloutBackend` that answers from a script instead of sampling: row i of every batch
  gets `script(i)` (text), then EOS; it records the parameters pushed to it."""

  def __init__(self, tokenizer, script):
    self.tokenizer, self.script, self.updates = tokenizer, script, []

  def generate(self, prompt_tokens, prompt_mask, key):
    del key
    prompt_tokens, prompt_mask = sampling.left_align(
        np.asarray(prompt_tokens), np.asarray(prompt_mask), pad_id=0
    )
    rows = [
        list(self.tokenizer.encode(self.script(i))) + [self.tokenizer.eos_id]
        for i in range(len(prompt_tokens))
    ]
    width = max(len(r) for r in rows)
    completion = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
      completion[i, : len(row)], mask[i, : len(row)] = row, True
    zeros = jnp.zeros(mask.shape, jnp.float32)
    return rollout_lib.rollout_from_samples(
        sampling.SampleOutput(
            tokens=jnp.asarray(np.concatenate([prompt_tokens, completion], axis=1)),
            prompt_mask=jnp.asarray(prompt_mask),
            completion_tokens=jnp.asarray(completion),
            completion_mask=jnp.asarray(mask),
            logprobs=zeros,
            policy_logprobs=zeros,
            lengths=jnp.asarray(mask.sum(1, dtype=np.int32)),
            finished=jnp.ones(len(rows), bool),
        )
    )

  def logprobs(self, tokens, key_mask):
    raise NotImplementedError("the runner rescores pi_old with the learner's program")

  def update_params(self, state):
    self.updates.append(state)


def test_rl_step_scores_scripted_completions_and_updates_the_policy(tmp_path):
  config = smoke.get_config()
  config.warm_start.steps = 0
  # One epoch of one minibatch: on-policy, so the update takes pi_old from its own forward pass.
  config.algorithm.num_minibatches = 1
  config.optim.warmup_steps = 0  # the step's only update must move the parameters
  with jax.set_mesh((run := build.build_run(config, tmp_path)).mesh):
    g = run.algo.num_generations
    examples = list(run.train_examples[: config.prompts_per_step])

    # Prompt 0's completions: the right answer once, a wrong one otherwise; the others: wrong.
    def script(row):
      group, member = divmod(row, g)
      return run.task.demonstration(examples[group]) if (group, member) == (0, 0) else "x"

    backend = ScriptedRollout(run.tokenizer, script)
    optimizer = build.make_optimizer(run.config.optim, total_updates=10)
    opt_state = learner.init_opt_state(optimizer, run.params, run.mesh)
    step_fn = rl_step.RLStep(
        run,
        backend=backend,
        optimizer=optimizer,
        opt_shardings=jax.tree.map(lambda x: x.sharding, opt_state),
        key=sharding.prng_key(0, run.mesh),
    )
    before = jax.device_get(run.params)
    state, record = step_fn(
        rl_step.RLState(step=0, params=run.params, opt_state=opt_state), examples
    )

  rewards = np.array(
      [
          [run.task.reward(script(i * g + j), examples[i]) for j in range(g)]
          for i in range(len(examples))
      ],
      np.float32,
  )
  assert rewards[0, 0] > rewards[0, 1] and np.ptp(rewards[1:]) == 0
  want = np.asarray(
      build.advantage_fn(run.algo)(jnp.asarray(rewards), jnp.ones(rewards.shape, bool))
  )
  assert record["reward/mean"] == pytest.approx(rewards.mean())
  assert record["advantage/max"] == pytest.approx(want.max(), rel=1e-6)
  assert record["advantage/min"] == pytest.approx(want.min(), rel=1e-6)
  assert record["groups/zero_std_fraction"] == (len(examples) - 1) / len(examples)
  assert record["updates/skipped"] == 0 and record["compiles/update"] == 1
  assert np.isfinite(record["loss"]) and record["grad_norm"] > 0
  assert record["ratio_min"] == record["ratio_max"] == 1.0
  # The script reports log-prob 0 for its tokens: the learner's are below 0, so k3 > 0.
  assert 0 < record["mismatch/kl"] < np.inf
  assert state.step == 1 and len(backend.updates) == 1 and backend.updates[0] is state.params
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
  assert max(jax.tree.leaves(moved)) > 0


def test_the_rollout_backend_is_chosen_by_config_and_importance_weights_correct_it(tmp_path):
  config = smoke.get_config()
  config.num_steps = 1
  config.warm_start.steps = 0
  config.rollout.backend = "mock"  # uniform-random tokens: all completions run to the budget
  config.algorithm.is_correction, config.algorithm.is_cap = "token_tis", 1.2
  loop.train_and_evaluate(config, tmp_path)
  record = _records(tmp_path)[1]
  # The mock reports -log V for its tokens; the learner's policy is not uniform, so the
  # weights pi_learner / pi_mock = V pi_learner spread around 1 and the cap binds.
  assert record["mismatch/kl"] > 1e-3
  assert np.isfinite(record["loss"])
  assert record["is/weight_max"] == np.float32(1.2)
  assert 0 < record["is/weight_mean"] < record["is/weight_max"]
  assert record["is/masked_fraction"] == 0


def _async_config():
  config = smoke.get_config()
  config.rollout.max_staleness = 1
  # Updates large enough that a rollout one version old is another policy's.
  config.optim.learning_rate, config.optim.warmup_steps = 3e-2, 0
  return config


@pytest.fixture(scope="module")
def uninterrupted_async(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted_async")
  loop.train_and_evaluate(_async_config(), workdir)
  return workdir


def _producer_threads():
  return [t for t in threading.enumerate() if t.name == "rollout-producer" and t.is_alive()]


def test_staleness_one_samples_every_step_from_the_previous_version(uninterrupted_async):
  records = metrics_lib.read_metrics(uninterrupted_async)[1:]
  assert [r["rollout/staleness"] for r in records] == [0, 1, 1, 1]
  # The sampler's log-probs are those of one update earlier, so the drift the rescoring hides
  # includes an update, not only float noise (< 1e-5 in the synchronous run).
  assert records[0]["mismatch/kl"] < 1e-5 and max(r["mismatch/kl"] for r in records) > 1e-3
  assert all(0 <= r["time/wait_rollout"] <= r["time/step"] for r in records)
  assert not _producer_threads()


def test_sigterm_with_staleness_checkpoints_the_rollout_in_flight_and_resumes_exactly(
    uninterrupted_async, tmp_path, monkeypatch
):
  workdir = tmp_path / "resumed"
  write = metrics_lib.MetricsWriter.write

  def write_then_preempt(self, step, record):
    write(self, step, record)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch:
    patch.setattr(metrics_lib.MetricsWriter, "write", write_then_preempt)
    loop.train_and_evaluate(_async_config(), workdir)
  assert [r["step"] for r in _records(workdir)] == [0, 1, 2] and not _producer_threads()
  # Step 2's rollout was sampled from version 1 before the stop: it is in the checkpoint.
  metadata = json.loads((workdir / "checkpoints" / "2" / "metadata" / "metadata").read_text())
  assert RunState.from_metadata(metadata).in_flight == (InFlightRollout(step=2, version=1),)

  loop.train_and_evaluate(_async_config(), workdir)
  assert _records(workdir) == _records(uninterrupted_async)


def test_an_error_in_the_producer_thread_stops_the_run_with_its_message(tmp_path, monkeypatch):
  config = _async_config()
  config.warm_start.steps = 0
  rewards_for = rl_step.rewards_for
  calls = []

  def nan_at_step_2(*args):
    calls.append(1)
    rewards = rewards_for(*args)
    return rewards * np.nan if len(calls) == 3 else rewards

  monkeypatch.setattr(rl_step, "rewards_for", nan_at_step_2)
  with pytest.raises(ValueError, match="Non-finite rewards"):
    loop.train_and_evaluate(config, tmp_path)
  assert [r["step"] for r in _records(tmp_path)] == [0, 1, 2] and not _producer_threads()


def _copy_of(uninterrupted, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(uninterrupted[0], workdir)
  return workdir


def _files(workdir):
  return {
      p.relative_to(workdir): p.read_bytes()
      for p in workdir.rglob("*")
      if p.is_file()
      and p.parts[len(workdir.parts)] in (metrics_lib.METRICS_FILE, metrics_lib.SUMMARY_FILE)
  }


@pytest.mark.parametrize("damage", ["deleted", "0xff byte in line 2"])
def test_a_damaged_history_is_restored_from_the_checkpoint(uninterrupted, tmp_path, damage):
  workdir = _copy_of(uninterrupted, tmp_path)
  path = workdir / metrics_lib.METRICS_FILE
  original, before = path.read_bytes(), _files(workdir)
  if damage == "deleted":
    path.unlink()
  else:
    lines = original.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [b"\xff" + lines[1][1:]] + lines[2:]))
  # A finished workdir: nothing runs, the rerun restores the history and the same summary.
  loop.train_and_evaluate(smoke.get_config(), workdir)
  assert _files(workdir) == before
  assert (workdir / f"{metrics_lib.METRICS_FILE}.damaged-1").exists() == (damage != "deleted")


@pytest.mark.parametrize(
    "damage", ["byte flip in the data", "deleted metadata", "deleted manifest"]
)
def test_a_damaged_warm_start_cache_is_skipped_when_rl_resumes(
    uninterrupted, tmp_path, caplog, damage
):
  workdir = _copy_of(uninterrupted, tmp_path)
  [step_dir] = [p for p in (workdir / "warm_start").iterdir() if p.name.isdigit()]
  if damage == "byte flip in the data":
    data = max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    fault_table.bit_flip("middle")(data)
  elif damage == "deleted metadata":
    (step_dir / "metadata" / "metadata").unlink()
  else:
    (step_dir / checkpointing.MANIFEST_FILE).unlink()
  before = _files(workdir)
  with caplog.at_level(logging.WARNING):
    summary = loop.train_and_evaluate(smoke.get_config(), workdir)
  assert _files(workdir) == before
  assert summary["warm_start"] == uninterrupted[1]["warm_start"]  # from the RL checkpoint
  assert any(
      "warm start: no step of the cache" in r.getMessage()
      and "skipping it: RL resumes from its own checkpoint" in r.getMessage()
      for r in caplog.records
  )
  assert [
      p.name.split(".")[0] for p in (workdir / "warm_start" / checkpointing.CORRUPTED_DIR).iterdir()
  ] == [step_dir.name]


def test_a_damaged_warm_start_cache_is_recomputed_when_needed(tmp_path, caplog):
  config = smoke.get_config()
  run = build.build_run(config, tmp_path)
  with preemption.install_preemption_handler() as handler:
    params, result = warm_start.warm_start(run, handler)
    [step_dir] = [p for p in (tmp_path / "warm_start").iterdir() if p.name.isdigit()]
    (step_dir / "metadata" / "metadata").write_text("{}")
    with caplog.at_level(logging.WARNING):
      again, recomputed = warm_start.warm_start(run, handler)
  assert recomputed == result
  assert any("recomputing it" in r.getMessage() for r in caplog.records)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_a_full_disk_is_one_error_and_the_rerun_resumes_identically(
    uninterrupted, tmp_path, monkeypatch
):
  workdir = tmp_path / "full"
  build_manifest = checkpointing.integrity.build_manifest

  def full_at_step_3(step_dir, step, *args):
    if step == 3 and step_dir.parent.name == "checkpoints":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return build_manifest(step_dir, step, *args)

  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.integrity, "build_manifest", full_at_step_3)
    with pytest.raises(disk_full.DiskFullError) as raised:
      loop.train_and_evaluate(smoke.get_config(), workdir)
  assert str(raised.value) == (
      f"No space left on device while saving step 3 to "
      f"{workdir / 'checkpoints' / '3'}; the last complete step is 2"
  )
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert not list(workdir.rglob("*.tmp")) and not list(workdir.rglob("*orbax-checkpoint-tmp*"))
  loop.train_and_evaluate(smoke.get_config(), workdir)
  assert _records(workdir) == _records(uninterrupted[0])
