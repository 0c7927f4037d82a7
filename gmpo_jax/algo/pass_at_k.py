"""Held-out evaluation numbers a paper can quote: pass@k, mean@n, maj@k, with 95% intervals.

Each prompt p gets n sampled completions, c_p of which pass (reach the task's best reward), and
one greedy completion. Per prompt, with A_p the answers the completions state
(`Task.extract_answer`):

    pass@k  = 1 − C(n − c, k) / C(n, k)    the unbiased estimator of Chen et al. 2021,
                                           "Evaluating Large Language Models Trained on Code"
                                           (arXiv 2107.03374, eq. 1), for k <= n
    mean@n  = c / n                        (avg@n; the sampled pass@1)
    maj@k   = the majority answer of k samples is right, averaged over the ⌊n/k⌋ disjoint
              blocks of k samples; a tie between t answers scores the mean correctness of
              the t (the expected score of a uniformly random tie-break)
    greedy  = the greedy completion passes

A metric is the mean of its per-prompt score over prompts; its 95% interval is the percentile
bootstrap over prompts (`bootstrap_interval`), so it describes how much the number would move
on another draw of prompts from the same distribution, not sampling noise alone.

`PromptResult` holds what every score is computed from; `write_results` / `read_results` keep
them as JSON lines, and `summarize` turns them into the metrics, so a table can be recomputed
(for another k, say) without rerunning anything.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95


def pass_at_k(num_samples: np.ndarray | int, num_correct: np.ndarray | int, k: int) -> np.ndarray:
  """The unbiased pass@k estimate 1 − C(n − c, k)/C(n, k) per prompt (Chen et al. 2021).

  Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms the binomial coefficients
  (they overflow float64 for n in the thousands).

  Args:
    num_samples: n per prompt (any shape), n >= k.
    num_correct: c per prompt, 0 <= c <= n, same shape as `num_samples`.
    k: the number of attempts, >= 1.

  Returns:
    float64 array of the broadcast shape, values in [0, 1]; 1 exactly when n − c < k.

  Raises:
    ValueError: k < 1, n < k, or c outside [0, n].
  """
  n = np.asarray(num_samples, np.int64)
  c = np.asarray(num_correct, np.int64)
  if k < 1:
    raise ValueError(f"k={k} must be >= 1")
  if np.any(n < k):
    raise ValueError(f"pass@{k} needs at least k samples per prompt; got n={n.min()}")
  if np.any((c < 0) | (c > n)):
    raise ValueError("num_correct must lie in [0, num_samples]")
  n, c = np.broadcast_arrays(n, c)
  out = np.ones(n.shape, np.float64)
  for index in np.ndindex(n.shape):
    ni, ci = int(n[index]), int(c[index])
    if ni - ci >= k:
      out[index] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
  return out


def majority_at_k(answers: Sequence[str | None], correct: Sequence[float], k: int) -> float:
  """maj@k of one prompt from its n >= k samples (see the module docstring).

  Args:
    answers: the extracted answer of each sample; None (no answer stated) casts no vote.
    correct: each sample's correctness in [0, 1]; samples with the same answer are expected
      to agree (they do when the reward depends on the answer alone); otherwise an answer's
      correctness is the mean over its samples.
    k: samples per vote.

  Returns:
    The mean over the ⌊n/k⌋ disjoint blocks of the block's score; a block without any vote
    scores 0.

  Raises:
    ValueError: k < 1, fewer than k samples, or lengths that differ.
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1")
  if len(answers) != len(correct):
    raise ValueError(f"{len(answers)} answers but {len(correct)} correctness values")
  if len(answers) < k:
    raise ValueError(f"maj@{k} needs at least k samples; got {len(answers)}")
  scores = []
  for start in range(0, len(answers) - k + 1, k):
    votes: dict[str, list[float]] = collections.defaultdict(list)
    for answer, value in zip(answers[start : start + k], correct[start : start + k]):
      if answer is not None:
        votes[answer].append(float(value))
    if not votes:
      scores.append(0.0)
      continue
    most = max(len(v) for v in votes.values())
    winners = [np.mean(v) for v in votes.values() if len(v) == most]
    scores.append(float(np.mean(winners)))
  return float(np.mean(scores))


def majority_answer(answers: Sequence[str | None]) -> str | None:
  """The most frequent non-None answer; a tie goes to the answer seen first; None if none."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  most = max(counts.values())
  return next(a for a in answers if a is not None and counts[a] == most)


def bootstrap_interval(
    scores: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
  """Percentile-bootstrap interval of the mean of per-prompt `scores`, resampling prompts.

  Deterministic for a given seed. One prompt: (score, score).

  Raises:
    ValueError: no scores, or a confidence outside (0, 1).
  """
  values = np.asarray(scores, np.float64)
  if values.size == 0:
    raise ValueError("no scores to bootstrap")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must lie in (0, 1)")
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, (num_resamples, values.size))].mean(axis=1)
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class PromptResult:
  """What every evaluation score of one prompt is computed from.

  Attributes:
    prompt_id: the example's index in the evaluation split.
    prompt: the prompt text.
    greedy_passed: whether the greedy completion passed.
    greedy_reward: its reward.
    answers: the extracted answer of each sampled completion (None: none stated).
    passed: whether each sampled completion passed.
  """

  prompt_id: int
  prompt: str
  greedy_passed: bool
  greedy_reward: float
  answers: tuple[str | None, ...]
  passed: tuple[bool, ...]

  @property
  def n(self) -> int:
    return len(self.passed)

  @property
  def c(self) -> int:
    return int(sum(self.passed))

  def to_json(self) -> dict:
    majority = majority_answer(self.answers)
    return {
        "prompt_id": self.prompt_id,
        "prompt": self.prompt,
        "n": self.n,
        "c": self.c,
        "majority_answer": majority,
        "majority_passed": majority is not None and _answer_correctness(self, majority) >= 0.5,
        "greedy_passed": self.greedy_passed,
        "greedy_reward": self.greedy_reward,
        "answers": list(self.answers),
        "passed": list(self.passed),
    }

  @classmethod
  def from_json(cls, record: Mapping) -> PromptResult:
    return cls(
        prompt_id=int(record["prompt_id"]),
        prompt=record["prompt"],
        greedy_passed=bool(record["greedy_passed"]),
        greedy_reward=float(record["greedy_reward"]),
        answers=tuple(record["answers"]),
        passed=tuple(bool(p) for p in record["passed"]),
    )


def _answer_correctness(result: PromptResult, answer: str) -> float:
  return float(np.mean([p for a, p in zip(result.answers, result.passed) if a == answer]))


def check_ks(ks: Iterable[int], num_samples: int) -> tuple[int, ...]:
  """The sorted distinct k values; ValueError unless every 1 <= k <= num_samples."""
  ks = tuple(sorted(set(int(k) for k in ks)))
  if num_samples < 1:
    raise ValueError(f"eval.num_samples={num_samples} must be >= 1")
  if not ks or ks[0] < 1 or ks[-1] > num_samples:
    raise ValueError(
        f"eval.k={ks} must be a non-empty list of 1 <= k <= eval.num_samples " f"({num_samples})"
    )
  return ks


def summarize(
    results: Sequence[PromptResult], ks: Iterable[int], *, prefix: str = "eval/"
) -> dict[str, float]:
  """Every metric with its 95% bootstrap interval, from per-prompt results.

  Keys (with `prefix`): 'pass@1' (greedy), 'reward' (greedy mean reward), 'mean@n', and for
  each k >= 2 in `ks` 'pass@k' and 'maj@k' (for k = 1 both equal mean@n). Each score has
  '<name>/ci_low' and '<name>/ci_high' beside it.

  Raises:
    ValueError: no results, prompts with different n, or a k outside [1, n].
  """
  if not results:
    raise ValueError("no evaluation results")
  sizes = {r.n for r in results}
  if len(sizes) != 1:
    raise ValueError(f"every prompt needs the same number of samples; got {sorted(sizes)}")
  (n,) = sizes
  ks = check_ks(ks, n)
  per_prompt = {
      "pass@1": [float(r.greedy_passed) for r in results],
      f"mean@{n}": [r.c / n for r in results],
  }
  counts = np.array([r.c for r in results])
  for k in ks:
    if k >= 2:
      per_prompt[f"pass@{k}"] = pass_at_k(n, counts, k).tolist()
      per_prompt[f"maj@{k}"] = [majority_at_k(r.answers, r.passed, k) for r in results]
  out = {f"{prefix}reward": float(np.mean([r.greedy_reward for r in results]))}
  for name, scores in per_prompt.items():
    low, high = bootstrap_interval(scores)
    out[f"{prefix}{name}"] = float(np.mean(scores))
    out[f"{prefix}{name}/ci_low"] = low
    out[f"{prefix}{name}/ci_high"] = high
  return out


def write_results(path: str | os.PathLike, results: Iterable[PromptResult]) -> pathlib.Path:
  """Writes one JSON line per prompt, atomically (a temporary file, then a rename).

  If that fails (a full disk), the temporary file is removed and the OSError names `path`.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  try:
    temporary.write_text("".join(json.dumps(r.to_json()) + "\n" for r in results))
    os.replace(temporary, path)
  except OSError as error:
    temporary.unlink(missing_ok=True)
    if error.filename is not None:
      raise
    raise OSError(error.errno, error.strerror, str(path)) from error
  return path


def read_results(path: str | os.PathLike) -> list[PromptResult]:
  """The results `write_results` wrote."""
  with pathlib.Path(path).open() as file:
    return [PromptResult.from_json(json.loads(line)) for line in file if line.strip()]
