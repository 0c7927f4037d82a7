"""Tables and plots of a launched grid: per grid point, mean ± 95% confidence interval over seeds.

`experiments/launch.py` calls `aggregate` after its runs (or alone with `--aggregate-only`).
Input: each finished run's `metrics.jsonl` (`gmpo_jax.infra.metrics.read_metrics`: one record per
step, step 0 = the evaluation before RL, `null` for a non-finite value). Output, in `out`:

    table.md          final values, extremes over the RL steps and step-0 values, one row per
                      grid point, "mean ± s.e." over seeds; each point's final values and
                      extremes minus the first point's, paired by seed; then what each point
                      overrides
    table.csv         the same numbers, one row per (point, metric, statistic), full precision
    runs.csv          the per-run values behind them, one row per (point, seed, metric, statistic)
    curves.png        one panel per metric: the mean over seeds against the step, one color per
                      point, with its 95% confidence band, and a legend
    final_bars.png    one panel per metric: the final value per point, 95% CI error bars, one
                      dot per seed
    pass_at_k.csv     for runs that kept their evaluation results (`eval_results/`): the
    pass_at_k.png     sampled pass@k of the last evaluation for every k = 1..n (the unbiased
                      estimator from the n samples of each held-out prompt, averaged over the
                      prompts), per point over seeds and paired with the first point; the plot
                      shows the curves against k with their 95% bands, and the paired
                      differences; table.md lists k = 1, 2, 4, ..., n and the mean number of
                      distinct answers among a prompt's n samples (diversity)

Statistics of one run and metric (records without the metric do not count):
  final    the value of the last record that has the metric;
  max/min  the largest (smallest) finite value over the RL steps (step >= 1), as chosen per metric;
  initial  the step-0 value (the evaluation before RL), for the metrics logged there;
  gain     final − initial: what RL added to its starting policy (the seeds' CI of it is the
           number to quote).
Over seeds: mean, standard error s / sqrt(n) (s with ddof = 1) and the half-width of the 95%
confidence interval of the mean, t_{0.975, n-1} · s / sqrt(n) (Student's t: seeds are few), of
the finite values; both are undefined for one value (NaN in the CSV, left out of the table), and
a cell says "(k/n)" when only k of the n runs had a finite value (a diverged run is never hidden).

Paired by seed (statistics `final_minus_<first point>` and `max_minus_...` / `min_minus_...`):
the same statistics of the per-seed differences, e.g. final(point, s) − final(first point, s),
over the seeds both finished (`paired_difference`). Runs of one
seed share the warm start, the data order and the sampling keys, so the difference removes the
spread between seeds that dominates the unpaired intervals; it is the interval to read when
ordering methods.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gmpo_jax.algo import pass_at_k as evaluation
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.runner.evaluate import EVAL_RESULTS_DIR

TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
RUNS_CSV = "runs.csv"
CURVES_PNG = "curves.png"
BARS_PNG = "final_bars.png"
PASS_AT_K_CSV = "pass_at_k.csv"
PASS_AT_K_PNG = "pass_at_k.png"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  """A metric to report and which extreme over the RL steps goes next to its final value.

  Attributes:
    name: the metric's key in metrics.jsonl.
    mode: 'max' or 'min': the best value for rewards, the worst for stability diagnostics
      (ratio_max -> max, ratio_min -> min, entropy -> min: collapse).
  """

  name: str
  mode: Literal["max", "min"] = "max"

  def __post_init__(self):
    if not self.name:
      raise ValueError("a metric name must not be empty")
    if self.mode not in ("max", "min"):
      raise ValueError(f"metric {self.name!r}: mode must be 'max' or 'min', got {self.mode!r}")

  @classmethod
  def parse(cls, text: str) -> MetricSpec:
    """'name' (mode max) or 'name:max' / 'name:min'."""
    name, _, mode = text.strip().partition(":")
    return cls(name.strip(), mode.strip() or "max")


DEFAULT_METRICS: tuple[MetricSpec, ...] = tuple(
    MetricSpec.parse(m)
    for m in (
        "eval/pass@1:max",
        "eval/reward:max",
        "reward/mean:max",
        "reward/geometric_mean:max",
        "entropy:min",
        "kl:max",
        "approx_kl:max",
        "ratio_max:max",
        "ratio_min:min",
        "clip_fraction_low:max",
        "clip_fraction_high:max",
    )
)


class SampledEval(NamedTuple):
  """The sampled completions of a run's first (step 0) and last held-out evaluation.

  Attributes:
    initial, final: mean over prompts of pass@k for k = 1..n, float64 [n].
    initial_distinct, final_distinct: mean over prompts of the number of distinct answers among
      the n samples (no stated answer counts as one more answer).
  """

  initial: np.ndarray
  final: np.ndarray
  initial_distinct: float
  final_distinct: float


@dataclasses.dataclass(frozen=True)
class RunMetrics:
  """The records of one finished run, and its sampled evaluations when they were kept."""

  point: str
  seed: int
  records: Sequence[Mapping[str, Any]]
  sampled: SampledEval | None = None


def pass_at_k_curve(results: Sequence[evaluation.PromptResult]) -> np.ndarray:
  """[n] float64: the mean over prompts of the unbiased pass@k (`evaluation.pass_at_k`), k = 1..n.

  Raises:
    ValueError: no results, or prompts with different n.
  """
  sizes = {r.n for r in results}
  if len(sizes) != 1:
    raise ValueError(f"every prompt needs the same number of samples; got {sorted(sizes)}")
  (n,) = sizes
  counts = np.array([r.c for r in results])
  return np.array([evaluation.pass_at_k(n, counts, k).mean() for k in range(1, n + 1)])


def load_sampled(workdir: str | pathlib.Path, step: int | None = None) -> SampledEval | None:
  """The step-0 and the last (or `step`'s) `eval_results/step_*.jsonl` of a run; None without
  both."""
  files = sorted((pathlib.Path(workdir) / EVAL_RESULTS_DIR).glob("step_*.jsonl"))
  if step is not None:
    files = [f for f in files if int(f.stem.removeprefix("step_")) <= step]
  if len(files) < 2 or files[0].name != "step_000000.jsonl":
    return None
  first, last = evaluation.read_results(files[0]), evaluation.read_results(files[-1])

  def distinct(results):
    return float(np.mean([len(set(r.answers)) for r in results]))

  return SampledEval(pass_at_k_curve(first), pass_at_k_curve(last), distinct(first), distinct(last))


class Stat(NamedTuple):
  """Mean, standard error and 95% CI half-width of the finite values among `num_runs` runs."""

  mean: float
  stderr: float
  num_finite: int
  num_runs: int
  ci95: float


def mean_stderr(values: Iterable[float]) -> Stat:
  """Mean, standard error s / sqrt(n) (ddof = 1) and t_{0.975, n-1}·s/sqrt(n) of the finite values.

  NaN stands for a missing or non-finite value: it is left out and counted. No finite value:
  mean NaN; one: stderr and ci95 NaN (undefined, not 0).
  """
  values = np.asarray(list(values), np.float64)
  finite = values[np.isfinite(values)]
  n = finite.size
  mean = float(finite.mean()) if n else math.nan
  stderr = float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  ci95 = float(scipy.stats.t.ppf(0.975, n - 1) * stderr) if n > 1 else math.nan
  return Stat(mean, stderr, n, values.size, ci95)


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Stat:
  """`mean_stderr` of values[s] − reference[s] over the seeds s in both (a paired t interval).

  Pairing removes what the two share per seed (here: the warm start, the data order and the
  sampling keys), so its interval is the one that orders two points.
  """
  return mean_stderr(values[s] - reference[s] for s in values if s in reference)


def seeds_to_resolve(stat: Stat, *, limit: int = 10_000) -> int | None:
  """The fewest seeds n whose 95% interval t_{0.975, n−1}·s/√n would exclude 0 if the mean and
  the spread s (ddof = 1) stayed as observed (2 when s is 0 and the mean is not); None when s
  is undefined (fewer than 2 values), the mean is 0, or more than `limit` seeds would be
  needed."""
  if stat.num_finite < 2 or not math.isfinite(stat.stderr) or stat.mean == 0:
    return None
  spread = stat.stderr * math.sqrt(stat.num_finite)
  for n in range(2, limit + 1):
    if scipy.stats.t.ppf(0.975, n - 1) * spread / math.sqrt(n) < abs(stat.mean):
      return n
  return None


def _value(record: Mapping[str, Any], name: str) -> float:
  value = record[name]
  return math.nan if value is None else float(value)


def run_statistics(records: Sequence[Mapping[str, Any]], metric: MetricSpec) -> dict[str, float]:
  """{'initial', 'final', 'gain', metric.mode} of one run (see the module docstring); NaN if
  absent."""
  rows = [r for r in records if metric.name in r]
  rl = np.array([_value(r, metric.name) for r in rows if r["step"] >= 1], np.float64)
  rl = rl[np.isfinite(rl)]
  extreme = (rl.max() if metric.mode == "max" else rl.min()) if rl.size else math.nan
  initial = [_value(r, metric.name) for r in rows if r["step"] == 0]
  initial = initial[-1] if initial else math.nan
  final = _value(rows[-1], metric.name) if rows else math.nan
  return {"initial": initial, "final": final, "gain": final - initial, metric.mode: float(extreme)}


def _fmt(stat: Stat) -> str:
  """'mean ± ci95' with the CI half-width to 2 significant digits and the mean to the same
  decimal place; 4 significant digits where there is none (one run) or it is zero (up to float
  rounding)."""
  if not stat.num_finite:
    return "n/a"
  if stat.num_finite < 2:
    text = f"{stat.mean:.4g}"
  elif stat.ci95 <= 1e-9 * abs(stat.mean) or stat.ci95 == 0:
    text = f"{stat.mean:.4g} ± 0"
  else:
    decimals = max(0, 1 - math.floor(math.log10(stat.ci95)))
    text = f"{stat.mean:.{decimals}f} ± {stat.ci95:.{decimals}f}"
  if stat.num_finite < stat.num_runs:
    text += f" ({stat.num_finite}/{stat.num_runs})"
  return text


def _csv_float(value: float) -> str:
  return repr(value) if math.isfinite(value) else ""


def _curves(runs: Sequence[RunMetrics], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean and 95% CI half-width over the runs of the finite values of `name` per step."""
  by_step: dict[int, list[float]] = {}
  for run in runs:
    for record in run.records:
      if name in record:
        by_step.setdefault(record["step"], []).append(_value(record, name))
  steps = sorted(by_step)
  stats = [mean_stderr(by_step[s]) for s in steps]
  return (np.array(steps), np.array([s.mean for s in stats]), np.array([s.ci95 for s in stats]))


def _panels(count: int, *, ncols: int = 3, height: float = 2.8):
  rows = math.ceil(count / ncols)
  cols = min(ncols, count)
  figure = Figure(figsize=(4.6 * cols + 2.4, height * rows), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, cols, squeeze=False).ravel()
  for axis in axes[count:]:
    axis.set_visible(False)
  return figure, axes[:count]


def _colors(points: Sequence[str]) -> dict[str, Any]:
  palette = [f"C{i}" for i in range(10)]
  return {p: palette[i % len(palette)] for i, p in enumerate(points)}


def plot_curves(
    path: pathlib.Path, by_point: Mapping[str, Sequence[RunMetrics]], metrics: Sequence[MetricSpec]
) -> pathlib.Path:
  """Learning curves: mean over seeds per step, 95% CI band, one color per point, a legend."""
  figure, axes = _panels(len(metrics))
  colors = _colors(list(by_point))
  for axis, metric in zip(axes, metrics):
    for point, runs in by_point.items():
      steps, mean, ci95 = _curves(runs, metric.name)
      if not np.isfinite(mean).any():
        continue
      # Sparse series (evaluations every few steps) get markers so single points show.
      axis.plot(
          steps,
          mean,
          color=colors[point],
          linewidth=1.2,
          label=point,
          marker="o" if len(steps) <= 25 else None,
          markersize=3,
      )
      band = np.isfinite(ci95)
      axis.fill_between(
          steps,
          np.where(band, mean - ci95, np.nan),
          np.where(band, mean + ci95, np.nan),
          color=colors[point],
          alpha=0.2,
          linewidth=0,
      )
    axis.set_title(metric.name, fontsize=9)
    axis.set_xlabel("step", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
  _legend(figure, colors)
  figure.savefig(path, dpi=90)
  return path


def plot_final_bars(
    path: pathlib.Path, by_point: Mapping[str, Sequence[RunMetrics]], metrics: Sequence[MetricSpec]
) -> pathlib.Path:
  """Final values: a bar per point at the mean, 95% CI error bar, a dot per seed."""
  figure, axes = _panels(len(metrics))
  colors = _colors(list(by_point))
  for axis, metric in zip(axes, metrics):
    for x, (point, runs) in enumerate(by_point.items()):
      finals = [run_statistics(r.records, metric)["final"] for r in runs]
      stat = mean_stderr(finals)
      if not stat.num_finite:
        continue
      axis.bar(
          x,
          stat.mean,
          color=colors[point],
          alpha=0.7,
          yerr=stat.ci95 if stat.num_finite > 1 else None,
          capsize=3,
      )
      axis.scatter(np.full(len(finals), x), finals, color="black", s=8, zorder=3)
    axis.set_title(f"final {metric.name}", fontsize=9)
    axis.set_xticks(range(len(by_point)), [""] * len(by_point))
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3, axis="y")
  _legend(figure, colors)
  figure.savefig(path, dpi=90)
  return path


def _legend(figure: Figure, colors: Mapping[str, Any]) -> None:
  figure.legend(
      handles=[Patch(color=c, label=p) for p, c in colors.items()],
      loc="outside right upper",
      fontsize=8,
  )


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def aggregate(
    out: str | pathlib.Path,
    runs: Sequence[RunMetrics],
    *,
    points: Sequence[str],
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    curves: Sequence[MetricSpec] | None = None,
    point_overrides: Mapping[str, Sequence[str]] | None = None,
    expected_runs: Mapping[str, int] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, pathlib.Path]:
  """Writes table.md, table.csv, runs.csv, curves.png and final_bars.png into `out`.

  Args:
    out: the results folder.
    runs: the finished runs' records.
    points: every grid point, in the table's order (a point without runs gets an empty row).
    metrics: what the tables and bar charts report.
    curves: what the learning curves show (default: `metrics`).
    point_overrides: point -> its overrides as 'key=value' strings, listed under the tables.
    expected_runs: point -> seeds launched, to show "finished/expected" per point.
    notes: lines printed under the title (the base config, missing runs, ...).

  Returns:
    {'table_md', 'table_csv', 'runs_csv', 'curves', 'bars'} -> the files written.

  Raises:
    ValueError: no metrics, a run of an unknown point, or no runs at all.
  """
  out = pathlib.Path(out)
  metrics = list(metrics)
  curves = list(metrics if curves is None else curves)
  if not metrics or not curves:
    raise ValueError("name at least one metric")
  unknown = sorted({r.point for r in runs} - set(points))
  if unknown:
    raise ValueError(f"runs of unknown points {unknown}")
  if not runs:
    raise ValueError("no finished run to aggregate")
  by_point = {p: [r for r in runs if r.point == p] for p in points}
  available = {k for r in runs for record in r.records for k in record} - {"step"}
  absent = [m.name for m in {*metrics, *curves} if m.name not in available]

  per_run = []  # (point, seed, metric, statistic, value)
  for run in runs:
    for metric in metrics:
      for statistic, value in run_statistics(run.records, metric).items():
        per_run.append((run.point, run.seed, metric.name, statistic, value))
  stats: dict[tuple[str, str, str], Stat] = {}
  for point, point_runs in by_point.items():
    for metric in metrics:
      for statistic in ("initial", "final", "gain", metric.mode):
        stats[point, metric.name, statistic] = mean_stderr(
            v for p, _, m, s, v in per_run if (p, m, s) == (point, metric.name, statistic)
        )
  reference = points[0]
  by_run = {(p, seed, m, s): v for p, seed, m, s, v in per_run}

  def by_seed(point: str, metric: str, statistic: str) -> dict[int, float]:
    return {
        seed: v for (p, seed, m, s), v in by_run.items() if (p, m, s) == (point, metric, statistic)
    }

  for point in points[1:]:
    for metric in metrics:
      for statistic in ("final", metric.mode):
        stats[point, metric.name, f"{statistic}_minus_{reference}"] = paired_difference(
            by_seed(point, metric.name, statistic), by_seed(reference, metric.name, statistic)
        )

  out.mkdir(parents=True, exist_ok=True)
  files = {"table_md": out / TABLE_MD, "table_csv": out / TABLE_CSV, "runs_csv": out / RUNS_CSV}
  with files["runs_csv"].open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", "seed", "metric", "statistic", "value"])
    writer.writerows([p, seed, m, s, _csv_float(v)] for p, seed, m, s, v in per_run)
  with files["table_csv"].open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        ["point", "metric", "statistic", "mean", "stderr", "ci95", "num_finite", "num_runs"]
    )
    for (point, metric, statistic), stat in stats.items():
      writer.writerow(
          [
              point,
              metric,
              statistic,
              _csv_float(stat.mean),
              _csv_float(stat.stderr),
              _csv_float(stat.ci95),
              stat.num_finite,
              stat.num_runs,
          ]
      )

  def seeds_cell(point: str) -> str:
    done = len(by_point[point])
    return f"{done}/{expected_runs[point]}" if expected_runs else str(done)

  lines = ["# Ablation results", ""] + [f"- {note}" for note in notes]
  lines += [
      "- mean ± half-width of its 95% confidence interval over seeds "
      "(t_{0.975, n−1}·s/√n, ddof = 1), the mean rounded to the half-width's second "
      "significant digit; (k/n): only k of n runs had a finite value",
      "",
  ]
  if absent:
    lines += [f"- not logged by any run: {', '.join(sorted(absent))}", ""]
  sections = [
      ("Final values", lambda m: "final", lambda m: m.name),
      (
          "Extremes over the RL steps (step >= 1)",
          lambda m: m.mode,
          lambda m: f"{m.name} ({m.mode})",
      ),
  ]
  initial_metrics = [
      m for m in metrics if any(stats[p, m.name, "initial"].num_finite for p in points)
  ]
  for title, statistic, label in sections:
    lines += [f"## {title}", ""]
    lines += _markdown_table(
        ["point", "seeds"] + [label(m) for m in metrics],
        [
            [p, seeds_cell(p)] + [_fmt(stats[p, m.name, statistic(m)]) for m in metrics]
            for p in points
        ],
    )
    lines.append("")
  if initial_metrics:
    lines += ["## Before RL (step 0)", ""]
    lines += _markdown_table(
        ["point"] + [m.name for m in initial_metrics],
        [[p] + [_fmt(stats[p, m.name, "initial"]) for m in initial_metrics] for p in points],
    )
    lines += ["", "## RL gain (final − step 0)", ""]
    lines += _markdown_table(
        ["point"] + [m.name for m in initial_metrics],
        [[p] + [_fmt(stats[p, m.name, "gain"]) for m in initial_metrics] for p in points],
    )
    lines.append("")
  for title, statistic, label in (sections if len(points) > 1 else ()):
    lines += [f"## {title} minus {reference}'s, paired by seed", ""]
    lines += _markdown_table(
        ["point", "seeds"] + [label(m) for m in metrics],
        [
            [
                p,
                str(
                    stats[p, metrics[0].name, f"{statistic(metrics[0])}_minus_{reference}"].num_runs
                ),
            ]
            + [_fmt(stats[p, m.name, f"{statistic(m)}_minus_{reference}"]) for m in metrics]
            for p in points[1:]
        ],
    )
    lines.append("")
  if len(points) > 1:
    lines += [
        f"## Seeds for the paired final difference from {reference} to exclude 0",
        "",
        "(`seeds_to_resolve`: at the observed mean and spread; — : none would)",
        "",
    ]
    lines += _markdown_table(
        ["point"] + [m.name for m in metrics],
        [
            [p]
            + [
                str(seeds_to_resolve(stats[p, m.name, f"final_minus_{reference}"]) or "—")
                for m in metrics
            ]
            for p in points[1:]
        ],
    )
    lines.append("")
  if point_overrides:
    lines += ["## Points", ""]
    lines += _markdown_table(
        ["point", "overrides"],
        [
            [p, "<br>".join(f"`{o}`" for o in point_overrides.get(p, ())) or "(base config)"]
            for p in points
        ],
    )
    lines.append("")
  sampled = {
      p: {r.seed: r.sampled for r in point_runs if r.sampled is not None}
      for p, point_runs in by_point.items()
  }
  if any(sampled.values()):
    lines += _pass_at_k_section(out, sampled, files)
  files["table_md"].write_text("\n".join(lines))

  curve_points = {p: r for p, r in by_point.items() if r}
  files["curves"] = plot_curves(out / CURVES_PNG, curve_points, curves)
  files["bars"] = plot_final_bars(out / BARS_PNG, curve_points, metrics)
  return files


def _pass_at_k_section(
    out: pathlib.Path,
    sampled: Mapping[str, Mapping[int, SampledEval]],
    files: dict[str, pathlib.Path],
) -> list[str]:
  """pass_at_k.csv, pass_at_k.png and the lines of table.md on the sampled pass@k curves."""
  points = [p for p, runs in sampled.items() if runs]
  reference = points[0]
  n = min(len(e.final) for runs in sampled.values() for e in runs.values())
  ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
  unpaired = {
      (p, k, which): mean_stderr(getattr(e, which)[k - 1] for e in sampled[p].values())
      for p in points
      for k in range(1, n + 1)
      for which in ("initial", "final")
  }
  paired = {
      (p, k): paired_difference(
          {s: e.final[k - 1] for s, e in sampled[p].items()},
          {s: e.final[k - 1] for s, e in sampled[reference].items()},
      )
      for p in points[1:]
      for k in range(1, n + 1)
  }
  distinct = {
      (p, which): mean_stderr(getattr(e, f"{which}_distinct") for e in sampled[p].values())
      for p in points
      for which in ("initial", "final")
  }
  files["pass_at_k_csv"] = out / PASS_AT_K_CSV
  with files["pass_at_k_csv"].open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", "k", "statistic", "mean", "stderr", "ci95", "num_finite", "num_runs"])
    rows = [(p, k, which, stat) for (p, k, which), stat in unpaired.items()]
    rows += [(p, k, f"final_minus_{reference}", stat) for (p, k), stat in paired.items()]
    for p, k, statistic, stat in rows:
      writer.writerow(
          [
              p,
              k,
              statistic,
              _csv_float(stat.mean),
              _csv_float(stat.stderr),
              _csv_float(stat.ci95),
              stat.num_finite,
              stat.num_runs,
          ]
      )
  files["pass_at_k"] = plot_pass_at_k(out / PASS_AT_K_PNG, unpaired, paired, points=points, n=n)
  header = ["point", "seeds"] + [f"pass@{k}" for k in ks] + ["distinct answers"]
  lines = [f"## Sampled pass@k of the last evaluation (n = {n} per prompt, unbiased estimator)", ""]
  lines += _markdown_table(
      header,
      [
          [p, str(len(sampled[p]))]
          + [_fmt(unpaired[p, k, "final"]) for k in ks]
          + [_fmt(distinct[p, "final"])]
          for p in points
      ],
  )
  lines += ["", "Before RL (step 0):", ""]
  lines += _markdown_table(
      header,
      [
          [p, str(len(sampled[p]))]
          + [_fmt(unpaired[p, k, "initial"]) for k in ks]
          + [_fmt(distinct[p, "initial"])]
          for p in points
      ],
  )
  if len(points) > 1:
    lines += ["", f"## Sampled pass@k minus {reference}'s, paired by seed", ""]
    lines += _markdown_table(
        header[:-1],
        [[p, str(paired[p, 1].num_runs)] + [_fmt(paired[p, k]) for k in ks] for p in points[1:]],
    )
  return lines + [""]


def plot_pass_at_k(
    path: pathlib.Path,
    unpaired: Mapping[tuple[str, int, str], Stat],
    paired: Mapping[tuple[str, int], Stat],
    *,
    points: Sequence[str],
    n: int,
) -> pathlib.Path:
  """pass@k against k (log scale) per point with its 95% band, the first point's step 0 dashed;
  beside it each point's paired difference from the first point with its 95% band."""
  figure, axes = _panels(2 if len(points) > 1 else 1, ncols=2, height=3.6)
  colors = _colors(points)
  ks = np.arange(1, n + 1)

  def band(axis, stats, color, **style):
    mean = np.array([s.mean for s in stats])
    ci95 = np.array([s.ci95 for s in stats])
    axis.plot(ks, mean, color=color, linewidth=1.2, **style)
    axis.fill_between(ks, mean - ci95, mean + ci95, color=color, alpha=0.15, linewidth=0)

  band(
      axes[0],
      [unpaired[points[0], k, "initial"] for k in ks],
      "gray",
      linestyle="--",
      label="before RL",
  )
  for point in points:
    band(axes[0], [unpaired[point, k, "final"] for k in ks], colors[point], label=point)
  axes[0].set_title(f"held-out pass@k (n = {n}), mean over seeds, 95% CI", fontsize=9)
  axes[0].set_ylabel("pass@k", fontsize=8)
  if len(points) > 1:
    for point in points[1:]:
      band(axes[1], [paired[point, k] for k in ks], colors[point], label=point)
    axes[1].axhline(0.0, color=colors[points[0]], linewidth=1.0)
    axes[1].set_title(f"pass@k minus {points[0]}'s, paired by seed, 95% CI", fontsize=9)
  for axis in axes:
    axis.set_xscale("log", base=2)
    axis.set_xlabel("k", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
  _legend(figure, {"before RL": "gray", **colors})
  figure.savefig(path, dpi=100)
  return path


def load_runs(
    entries: Iterable[tuple[str, int, str | pathlib.Path]], *, until_step: int | None = None
) -> list[RunMetrics]:
  """(point, seed, workdir) -> the run's records (`gmpo_jax.infra.metrics.read_metrics`) and its
  sampled evaluations (`load_sampled`); with `until_step`, only what was logged up to that step
  (every run then ends at the same step: a grid cut short compares its points there)."""
  runs = []
  for point, seed, workdir in entries:
    records = metrics_lib.read_metrics(workdir)
    if until_step is not None:
      records = [r for r in records if r["step"] <= until_step]
    runs.append(RunMetrics(point, seed, records, load_sampled(workdir, until_step)))
  return runs
