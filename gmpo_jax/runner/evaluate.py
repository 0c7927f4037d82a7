"""Held-out evaluation of a policy: greedy and sampled completions scored by the task.

The numbers themselves (pass@k, mean@n, maj@k, bootstrap intervals) are `gmpo_jax.algo.pass_at_k`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gmpo_jax.algo import pass_at_k as evaluation
from gmpo_jax.rollout.backends import JaxRollout
from gmpo_jax.runner.build import Run
from gmpo_jax.runner.data import decode_completions, encode_batch

EVAL_RESULTS_DIR = "eval_results"


def _complete(
    run: Run,
    params,
    examples: Sequence[Mapping[str, Any]],
    *,
    temperature: float,
    n: int,
    key: jax.Array,
) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
  """`n` completions of each example's prompt at `temperature` (0: greedy), by the in-process
  sampler.

  Returns:
    (texts: E lists of n strings, rewards [E, n], passed [E, n] bool: the reward reaches the
    task's maximum, `Task.reward_range`).
  """
  config = dataclasses.replace(run.sampling, temperature=temperature)
  backend = JaxRollout(
      nnx.merge(run.graphdef, params), config=config, chunk_size=run.config.chunk_size
  )
  tokens, mask = encode_batch(
      [run.task.prompt(e) for e in examples for _ in range(n)], run.tokenizer
  )
  texts = decode_completions(backend.generate(tokens, mask, key), run.tokenizer, run.stop_ids)
  rewards = np.array([run.task.reward(t, examples[i // n]) for i, t in enumerate(texts)])
  rewards = rewards.reshape(len(examples), n)
  return (
      [texts[i * n : (i + 1) * n] for i in range(len(examples))],
      rewards,
      rewards >= run.task.reward_range[1] - 1e-6,
  )


def evaluate(run: Run, params, key: jax.Array, *, step: int) -> dict[str, float]:
  """Held-out metrics with 95% intervals (`gmpo_jax.algo.pass_at_k`), and the per-prompt results.

  Each of the first `eval.num_examples` prompts gets one greedy completion and
  `eval.num_samples` sampled at `eval.temperature`; a completion passes when its reward reaches
  the task's maximum (`Task.reward_range`). Metrics: greedy pass@1 and mean reward, mean@n,
  and pass@k (unbiased) and maj@k for each k >= 2 in `eval.k`. The per-prompt results go to
  `workdir/eval_results/step_<step>.jsonl`, from which `evaluation.summarize` recomputes them.
  """
  cfg = run.config.eval
  examples = [run.eval_examples[i] for i in range(min(cfg.num_examples, len(run.eval_examples)))]
  prompts = [run.task.prompt(e) for e in examples]
  _, greedy_rewards, greedy_passed = _complete(run, params, examples, temperature=0.0, n=1, key=key)
  sampled_texts, _, sampled_passed = _complete(
      run, params, examples, temperature=cfg.temperature, n=cfg.num_samples, key=key
  )
  results = [
      evaluation.PromptResult(
          prompt_id=i,
          prompt=prompts[i],
          greedy_passed=bool(greedy_passed[i, 0]),
          greedy_reward=float(greedy_rewards[i, 0]),
          answers=tuple(run.task.extract_answer(t) for t in sampled_texts[i]),
          passed=tuple(bool(p) for p in sampled_passed[i]),
      )
      for i in range(len(examples))
  ]
  if jax.process_index() == 0:
    evaluation.write_results(run.workdir / EVAL_RESULTS_DIR / f"step_{step:06d}.jsonl", results)
  return evaluation.summarize(results, cfg.k)


def train_pass_rate_probe(run: Run, size: int):
  """Greedy pass rate of `params` on the first `size` train prompts (deterministic)."""
  examples = run.train_examples[:size]

  def pass_rate(params) -> float:
    _, _, passed = _complete(run, params, examples, temperature=0.0, n=1, key=jax.random.key(0))
    return float(passed.mean())

  return pass_rate
