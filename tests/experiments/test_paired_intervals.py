"""The paired intervals and pass@k curves of `experiments/aggregate.py`, against float64
references written from the definitions (scipy's paired t test, binomial coefficients)."""

import csv
import json
import math

import numpy as np
import pytest
import scipy.stats

from experiments import aggregate
from gmpo_jax.algo.pass_at_k import PromptResult, write_results


@pytest.mark.parametrize("num_seeds", [2, 5, 9])
def test_paired_difference_is_scipys_paired_t_interval(num_seeds):
  rng = np.random.default_rng(num_seeds)
  shared = rng.normal(size=num_seeds) * 3.0  # the per-seed part that pairing removes
  values = shared + rng.normal(0.4, 0.2, num_seeds)
  reference = shared + rng.normal(0.0, 0.2, num_seeds)
  stat = aggregate.paired_difference(dict(enumerate(values)), dict(enumerate(reference)))
  low, high = scipy.stats.ttest_rel(values, reference).confidence_interval(0.95)
  np.testing.assert_allclose(
      [stat.mean - stat.ci95, stat.mean + stat.ci95], [low, high], rtol=1e-12
  )
  d = np.asarray(values, np.float64) - reference
  np.testing.assert_allclose(stat.stderr, d.std(ddof=1) / math.sqrt(num_seeds), rtol=1e-12)
  # Much narrower than the unpaired interval, which the shared part dominates.
  assert stat.ci95 < aggregate.mean_stderr(values).ci95 / 3


def test_paired_difference_uses_only_the_seeds_both_have():
  stat = aggregate.paired_difference({0: 1.0, 1: 2.0, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0})
  assert (stat.num_runs, stat.num_finite) == (2, 2)
  assert stat.mean == pytest.approx(0.75)
  one = aggregate.paired_difference({0: 1.0}, {0: 0.25, 1: 2.0})
  assert one.mean == 0.75 and math.isnan(one.ci95)


def _results(counts, n):
  return [
      PromptResult(
          prompt_id=i,
          prompt=str(i),
          greedy_passed=False,
          greedy_reward=0.0,
          answers=tuple(str(j % 3) for j in range(n)),
          passed=tuple(j < c for j in range(n)),
      )
      for i, c in enumerate(counts)
  ]


def test_pass_at_k_curve_is_the_mean_unbiased_estimate_for_every_k():
  n, counts = 16, [0, 1, 3, 8, 15, 16]
  curve = aggregate.pass_at_k_curve(_results(counts, n))
  expected = [
      np.mean([1.0 - math.comb(n - c, k) / math.comb(n, k) for c in counts])
      for k in range(1, n + 1)
  ]
  np.testing.assert_allclose(curve, expected, rtol=1e-12, atol=1e-15)
  assert curve[0] == pytest.approx(np.mean(counts) / n)  # pass@1 = mean@n


def test_aggregate_writes_the_paired_pass_at_k_table_and_plot(tmp_path):
  n = 8
  rng = np.random.default_rng(0)
  runs = []
  for seed in range(3):
    base = rng.integers(0, n + 1, size=20)
    for point, shift in (("ref", 0), ("better", 1)):
      final = aggregate.pass_at_k_curve(_results(np.minimum(base + shift, n), n))
      initial = aggregate.pass_at_k_curve(_results(base, n))
      runs.append(
          aggregate.RunMetrics(
              point,
              seed,
              [{"step": 0, "eval/pass@1": 0.1}, {"step": 1, "eval/pass@1": 0.2}],
              aggregate.SampledEval(initial, final, 3.0, 2.0),
          )
      )
  files = aggregate.aggregate(
      tmp_path, runs, points=["ref", "better"], metrics=[aggregate.MetricSpec("eval/pass@1")]
  )
  assert files["pass_at_k"].exists()
  with files["pass_at_k_csv"].open() as f:
    rows = {(r["point"], int(r["k"]), r["statistic"]): r for r in csv.DictReader(f)}
  for k in (1, 4, 8):
    d = [b.sampled.final[k - 1] - a.sampled.final[k - 1] for a, b in zip(runs[0::2], runs[1::2])]
    low, high = scipy.stats.ttest_rel(d, np.zeros(3)).confidence_interval(0.95)
    row = rows["better", k, "final_minus_ref"]
    assert float(row["mean"]) == pytest.approx(np.mean(d), rel=1e-12)
    if np.ptp(d) > 0:
      assert float(row["ci95"]) == pytest.approx((high - low) / 2, rel=1e-9)
  table = files["table_md"].read_text()
  assert "## Sampled pass@k minus ref's, paired by seed" in table
  assert "| pass@1 | pass@2 | pass@4 | pass@8 | distinct answers |" in table


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
  rng = np.random.default_rng(1)
  d = rng.normal(0.3, 1.0, 6)
  stat = aggregate.mean_stderr(d)
  n = aggregate.seeds_to_resolve(stat)
  s = d.std(ddof=1)

  def half_width(m):
    return scipy.stats.t.ppf(0.975, m - 1) * s / math.sqrt(m)

  assert half_width(n) < abs(d.mean()) <= half_width(n - 1)
  assert aggregate.seeds_to_resolve(aggregate.mean_stderr([0.1, 0.1])) == 2  # no spread
  assert aggregate.seeds_to_resolve(aggregate.mean_stderr([-0.1, 0.1])) is None  # mean 0
  assert aggregate.seeds_to_resolve(aggregate.mean_stderr([0.5])) is None


def test_load_runs_until_a_step_cuts_the_records_and_the_sampled_evaluation(tmp_path):
  records = [{"step": t, "reward/mean": float(t)} for t in range(5)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  for step, counts in ((0, [0, 1]), (2, [2, 2]), (4, [4, 4])):
    write_results(tmp_path / "eval_results" / f"step_{step:06d}.jsonl", _results(counts, 4))
  (run,) = aggregate.load_runs([("p", 0, tmp_path)], until_step=2)
  assert [r["step"] for r in run.records] == [0, 1, 2]
  np.testing.assert_allclose(run.sampled.initial[0], 1 / 8)
  np.testing.assert_allclose(run.sampled.final[0], 2 / 4)
  (full,) = aggregate.load_runs([("p", 0, tmp_path)])
  assert len(full.records) == 5 and full.sampled.final[0] == 1.0
