"""Evaluation estimators: pass@k against exact enumeration, maj@k ties, intervals, round trip."""

import errno
import itertools
import math
import os
import pathlib

import numpy as np
import pytest

from gmpo_jax.algo import pass_at_k as evaluation


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
  """The fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


class TestPassAtK:

  @pytest.mark.parametrize("n", [1, 2, 5, 8])
  def test_equals_enumeration_of_subsets(self, n):
    for c in range(n + 1):
      for k in range(1, n + 1):
        got = float(evaluation.pass_at_k(n, c, k))
        assert got == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12), (n, c, k)

  def test_equals_binomial_formula_for_large_n(self):
    rng = np.random.default_rng(0)
    n = np.full(50, 200)
    c = rng.integers(0, 201, 50)
    expected = [1 - math.comb(200 - ci, 16) / math.comb(200, 16) for ci in c]
    np.testing.assert_allclose(evaluation.pass_at_k(n, c, 16), expected, rtol=1e-10, atol=1e-12)

  def test_pass_at_1_is_the_passing_fraction(self):
    c = np.array([0, 3, 7, 10])
    np.testing.assert_allclose(evaluation.pass_at_k(10, c, 1), c / 10)

  def test_no_overflow_for_thousands_of_samples(self):
    value = float(evaluation.pass_at_k(5000, 3, 100))
    assert 0 < value < 1 and np.isfinite(value)

  @pytest.mark.parametrize(
      "n, c, k, match",
      [
          (4, 1, 5, "at least k"),
          (4, 5, 2, "num_correct"),
          (4, -1, 2, "num_correct"),
          (4, 1, 0, "k=0"),
      ],
  )
  def test_bad_input_is_an_error(self, n, c, k, match):
    with pytest.raises(ValueError, match=match):
      evaluation.pass_at_k(n, c, k)


class TestMajorityAtK:

  def test_clear_majority(self):
    answers = ["7", "7", "3", "7"]
    assert evaluation.majority_at_k(answers, [1, 1, 0, 1], 4) == 1.0
    assert evaluation.majority_at_k(answers, [0, 0, 1, 0], 4) == 0.0

  def test_tie_scores_the_mean_correctness_of_the_tied_answers(self):
    # Two votes each for '5' (right) and '6' (wrong): a random tie-break is right half the time.
    assert evaluation.majority_at_k(["5", "6", "5", "6"], [1, 0, 1, 0], 4) == 0.5
    # A three-way tie of singletons, one right.
    assert evaluation.majority_at_k(["1", "2", "3"], [0, 1, 0], 3) == pytest.approx(1 / 3)

  def test_disjoint_blocks_are_averaged(self):
    # Blocks of 2: ['4','4'] right, ['9','4'] tie of one right and one wrong, ['9','9'] wrong.
    answers = ["4", "4", "9", "4", "9", "9", "4"]  # the 7th sample is left over
    correct = [a == "4" for a in answers]
    assert evaluation.majority_at_k(answers, correct, 2) == pytest.approx((1 + 0.5 + 0) / 3)

  def test_k1_is_the_passing_fraction(self):
    answers = ["1", "2", "1", None, "3"]
    correct = [1, 0, 1, 0, 0]
    assert evaluation.majority_at_k(answers, correct, 1) == pytest.approx(2 / 5)

  def test_none_casts_no_vote(self):
    # Without the Nones the single '8' (right) wins; a block with no answer at all scores 0.
    assert evaluation.majority_at_k([None, None, "8"], [0, 0, 1], 3) == 1.0
    assert evaluation.majority_at_k([None, None], [0, 0], 2) == 0.0

  def test_majority_answer_breaks_ties_by_first_seen(self):
    assert evaluation.majority_answer(["b", "a", "a", "b"]) == "b"
    assert evaluation.majority_answer([None, "a"]) == "a"
    assert evaluation.majority_answer([None]) is None

  def test_bad_input_is_an_error(self):
    with pytest.raises(ValueError, match="at least k"):
      evaluation.majority_at_k(["1"], [1], 2)
    with pytest.raises(ValueError, match="correctness"):
      evaluation.majority_at_k(["1", "2"], [1], 1)


class TestBootstrapInterval:

  def test_covers_the_mean_and_shrinks_with_more_prompts(self):
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    low_s, high_s = evaluation.bootstrap_interval(small)
    low_l, high_l = evaluation.bootstrap_interval(large)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert (high_l - low_l) < (high_s - low_s) / 5

  def test_matches_the_binomial_normal_interval(self):
    scores = np.random.default_rng(2).random(2000) < 0.4
    p = scores.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / scores.size)
    low, high = evaluation.bootstrap_interval(scores)
    assert low == pytest.approx(p - half, abs=0.006) and high == pytest.approx(p + half, abs=0.006)

  def test_deterministic_and_degenerate(self):
    scores = [0.0, 1.0, 1.0, 0.5]
    assert evaluation.bootstrap_interval(scores) == evaluation.bootstrap_interval(scores)
    assert evaluation.bootstrap_interval([0.25]) == (0.25, 0.25)
    with pytest.raises(ValueError, match="no scores"):
      evaluation.bootstrap_interval([])


def _results(seed: int = 0, num_prompts: int = 30, n: int = 8):
  rng = np.random.default_rng(seed)
  results = []
  for i in range(num_prompts):
    answers = tuple(str(a) for a in rng.integers(0, 3, n))
    results.append(
        evaluation.PromptResult(
            prompt_id=i,
            prompt=f"{i}+1=",
            greedy_passed=bool(rng.random() < 0.5),
            greedy_reward=float(rng.random()),
            answers=answers,
            passed=tuple(a == "0" for a in answers),
        )
    )
  return results


class TestSummarize:

  def test_values_and_intervals(self):
    results = _results()
    metrics = evaluation.summarize(results, (1, 4, 8))
    c = np.array([r.c for r in results])
    assert metrics["eval/mean@8"] == pytest.approx(np.mean(c / 8))
    assert metrics["eval/pass@1"] == pytest.approx(np.mean([r.greedy_passed for r in results]))
    assert metrics["eval/pass@4"] == pytest.approx(np.mean(evaluation.pass_at_k(8, c, 4)))
    assert metrics["eval/maj@8"] == pytest.approx(
        np.mean([evaluation.majority_at_k(r.answers, r.passed, 8) for r in results])
    )
    assert "eval/pass@8" in metrics and "eval/maj@4" in metrics
    assert "eval/maj@1" not in metrics  # k = 1 is mean@n
    for name in ("pass@1", "mean@8", "pass@4", "maj@8"):
      assert (
          metrics[f"eval/{name}/ci_low"]
          <= metrics[f"eval/{name}"]
          <= metrics[f"eval/{name}/ci_high"]
      )
    # More attempts never pass less often.
    assert metrics["eval/mean@8"] <= metrics["eval/pass@4"] <= metrics["eval/pass@8"]

  def test_round_trip_through_jsonl_recomputes_the_same_metrics(self, tmp_path):
    results = _results(seed=3)
    path = evaluation.write_results(tmp_path / "eval_results" / "step_000010.jsonl", results)
    lines = path.read_text().splitlines()
    assert len(lines) == len(results)
    back = evaluation.read_results(path)
    assert back == results
    assert evaluation.summarize(back, (4,)) == evaluation.summarize(results, (4,))

  def test_a_write_on_a_full_disk_leaves_no_temporary_file(self, tmp_path, monkeypatch):
    def half_then_full(path, text):
      pathlib.Path.write_bytes(path, text[: len(text) // 2].encode())
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_full)
    with pytest.raises(OSError) as raised:
      evaluation.write_results(tmp_path / "step_000010.jsonl", _results(seed=3))
    assert raised.value.filename == str(tmp_path / "step_000010.jsonl")
    assert not list(tmp_path.iterdir())

  def test_json_line_has_the_counts_and_majority(self):
    result = evaluation.PromptResult(
        prompt_id=7,
        prompt="2+2=",
        greedy_passed=True,
        greedy_reward=1.11,
        answers=("4", "5", "4", None),
        passed=(True, False, True, False),
    )
    record = result.to_json()
    assert (record["prompt_id"], record["n"], record["c"]) == (7, 4, 2)
    assert record["majority_answer"] == "4" and record["majority_passed"] is True

  def test_errors(self):
    with pytest.raises(ValueError, match="no evaluation results"):
      evaluation.summarize([], (1,))
    with pytest.raises(ValueError, match="eval.k"):
      evaluation.summarize(_results(n=4), (8,))
    mixed = _results(n=4)[:2] + _results(n=8)[:2]
    with pytest.raises(ValueError, match="same number of samples"):
      evaluation.summarize(mixed, (2,))
    with pytest.raises(ValueError, match="eval.k"):
      evaluation.check_ks((), 4)
    with pytest.raises(ValueError, match="eval.k"):
      evaluation.check_ks((0,), 4)
    assert evaluation.check_ks((8, 4, 4), 8) == (4, 8)
