"""Summaries, markdown tables and figures of the reward-distribution study.

Everything here works on NumPy copies of `study.TrainResult` / `study.Diagnostics`
and returns plain dicts (for results.json) or markdown strings. Statistics are
mean +- the half-width of the 95% Student-t confidence interval over seeds
(t_{0.975, n-1} times the standard error, ddof = 1).
"""

import collections
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display on the study machines.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from experiments.reward_study import envs, study  # noqa: E402

TARGET: float = 0.9  # steps-to-target threshold on the normalized scores.


def ci95_factor(n: int) -> float:
  """t_{0.975, n-1}: standard errors per 95% half-width (1.998 for 64 seeds)."""
  return float(stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0


def mean_ci(values: np.ndarray) -> tuple[float, float]:
  """Mean and 95% confidence half-width over the first axis (0 for one value)."""
  values = np.asarray(values, np.float64)
  n = len(values)
  se = values.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
  return float(values.mean()), float(ci95_factor(n) * se)


def fmt(stat: Sequence[float], digits: int = 3) -> str:
  return f'{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}'


def steps_to_target(curves: np.ndarray, target: float = TARGET) -> dict:
  """First step at which each seed's curve reaches `target`.

  Args:
    curves: [S, num_steps + 1] scores per seed, index 0 before training.

  Returns:
    {'mean', 'ci95'} over the seeds that reached it (NaN if none), and
    'reached' / 'seeds' counts: a seed that never reaches it is not averaged in.
  """
  hit = curves >= target
  reached = hit.any(axis=1)
  first = hit.argmax(axis=1)[reached]
  stat = mean_ci(first) if reached.any() else (float('nan'), float('nan'))
  return {
      'mean': stat[0],
      'ci95': stat[1],
      'reached': int(reached.sum()),
      'seeds': int(len(curves)),
  }


def fmt_steps(steps: dict) -> str:
  if not steps['reached']:
    return f'never (0/{steps["seeds"]})'
  return f'{steps["mean"]:.0f} ± {steps["ci95"]:.0f} ' f'({steps["reached"]}/{steps["seeds"]})'


def sequence_label(env: envs.RewardEnv, context: int, index: int) -> str:
  """Token types of sequence `index` in `context`, e.g. 'AABA'."""
  types = env.token_types()[context][envs.all_sequences()[index]]
  return ''.join(envs.TYPE_NAMES[t] for t in types)


def optima(env: envs.RewardEnv) -> list[dict]:
  """Per context: the optimal sequence and value under each objective, and the
  values of the initial uniform policy."""
  tables = env.exact_tables()
  out = []
  for c in range(env.num_contexts):
    mean, log = tables.mean_reward[c], tables.mean_log_reward[c]
    out.append(
        {
            'arith_opt': sequence_label(env, c, int(mean.argmax())),
            'arith_opt_value': float(mean.max()),
            'geo_opt': sequence_label(env, c, int(log.argmax())),
            'geo_opt_value': float(log.max()),
            'uniform_policy_mean': float(mean.mean()),
            'uniform_policy_mean_log': float(log.mean()),
            'geo_offset': env.geo_offset,
        }
    )
  return out


def summarize_runs(config: study.TrainConfig, result: study.TrainResult) -> list[dict]:
  """One row per method x objective from a `study.run_grid` result (NumPy)."""
  env = config.env
  tables = env.exact_tables()
  arith_best = tables.mean_reward.argmax(axis=1)
  geo_best = tables.mean_log_reward.argmax(axis=1)
  contexts = np.arange(env.num_contexts)
  rows = []
  for m, method in enumerate(config.methods):
    for o, objective in enumerate(config.objectives):
      arith = result.arith_score[m, o]  # [S, steps + 1, C]
      geo = result.geo_score[m, o]
      prob = result.final_sequence_prob[m, o]  # [S, C, N]
      modal = prob.argmax(axis=-1)  # [S, C]
      labels = [
          '/'.join(sequence_label(env, c, int(n)) for c, n in enumerate(seed)) for seed in modal
      ]
      label, count = collections.Counter(labels).most_common(1)[0]
      rows.append(
          {
              'method': method.label,
              'objective': objective.label,
              'arith_final': mean_ci(arith[:, -1].mean(-1)),
              'geo_final': mean_ci(geo[:, -1].mean(-1)),
              'arith_final_per_context': [mean_ci(arith[:, -1, c]) for c in contexts],
              'steps_arith': steps_to_target(arith.mean(-1)),
              'steps_geo': steps_to_target(geo.mean(-1)),
              'prob_arith_opt': mean_ci(prob[:, contexts, arith_best].mean(-1)),
              'prob_geo_opt': mean_ci(prob[:, contexts, geo_best].mean(-1)),
              'modal_sequence': label,
              'modal_count': count,
              'penalized_fraction': mean_ci(result.penalized_fraction[m, o]),
              'clip_fraction': mean_ci(result.clip_fraction[m, o]),
              'zero_advantage_fraction': mean_ci(result.zero_advantage_fraction[m, o]),
          }
      )
  return rows


def summarize_diagnostics(config: study.TrainConfig, diagnostics: study.Diagnostics) -> list[dict]:
  """One row per method from a `study.run_diagnostics` result ([S, M], NumPy)."""
  return [
      {
          'method': method.label,
          **{
              field: mean_ci(getattr(diagnostics, field)[:, m])
              for field in study.Diagnostics._fields
          },
      }
      for m, method in enumerate(config.methods)
  ]


def runs_table(rows: list[dict], seeds: int) -> str:
  header = (
      '| method | objective | E[R] score | E[log R] score | steps to 0.9 (E[R]) '
      '| steps to 0.9 (E[log R]) | π(E[R]-opt) | π(E[log R]-opt) | modal sequence '
      '| penalized (train) | clip fraction |\n'
      '|---|---|---|---|---|---|---|---|---|---|---|\n'
  )
  lines = [
      f'| {r["method"]} | {r["objective"]} | {fmt(r["arith_final"])} '
      f'| {fmt(r["geo_final"])} | {fmt_steps(r["steps_arith"])} '
      f'| {fmt_steps(r["steps_geo"])} | {fmt(r["prob_arith_opt"], 2)} '
      f'| {fmt(r["prob_geo_opt"], 2)} | {r["modal_sequence"]} '
      f'({r["modal_count"]}/{seeds}) | {fmt(r["penalized_fraction"])} '
      f'| {fmt(r["clip_fraction"], 4)} |'
      for r in rows
  ]
  return header + '\n'.join(lines) + '\n'


def diagnostics_table(rows: list[dict]) -> str:
  header = (
      '| method | penalized fraction | gradient SNR | cos(E g, ∇E[R]) '
      '| cos(E g, ∇E[log R]) |\n|---|---|---|---|---|\n'
  )
  lines = [
      f'| {r["method"]} | {fmt(r["penalized_fraction"])} '
      f'| {fmt(r["grad_snr"], 4)} | {fmt(r["cos_arith"])} '
      f'| {fmt(r["cos_geo"])} |'
      for r in rows
  ]
  return header + '\n'.join(lines) + '\n'


def context_table(env: envs.RewardEnv, rows: list[dict]) -> str:
  scales = ' | '.join(f'prompt ×{s:g}' for s in env.context_scales)
  header = f'| method | objective | {scales} |\n' f'|---|---|{"---|" * env.num_contexts}\n'
  lines = [
      f'| {r["method"]} | {r["objective"]} | '
      + ' | '.join(fmt(stat) for stat in r['arith_final_per_context'])
      + ' |'
      for r in rows
  ]
  return header + '\n'.join(lines) + '\n'


# Methods that coincide (RLOO and Dr.GRPO under Adam, floors that never act)
# stay visible when their line styles differ.
_LINE_STYLES = ('-', '--', ':', '-.')


def _band(ax, curves, **style):
  """Mean +- 95% confidence half-width over seeds of [S, steps + 1] curves."""
  mean = curves.mean(axis=0)
  n = len(curves)
  ci = (ci95_factor(n) * curves.std(axis=0, ddof=1) / np.sqrt(n)) if n > 1 else 0 * mean
  steps = np.arange(len(mean))
  (line,) = ax.plot(steps, mean, lw=1.3, **style)
  ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, lw=0)


def _colors(num_methods: int):
  """One distinct color per method (tab10 repeats its last color past 10)."""
  return plt.get_cmap('tab10' if num_methods <= 10 else 'tab20')


def plot_curves(path, config: study.TrainConfig, result: study.TrainResult, title: str) -> None:
  """Rows: objectives; columns: E[R] and E[log R] scores (mean over contexts)."""
  num_objectives = len(config.objectives)
  fig, axes = plt.subplots(
      num_objectives, 2, figsize=(11, 3.2 * num_objectives), squeeze=False, sharex=True
  )
  colors = _colors(len(config.methods))
  for o, objective in enumerate(config.objectives):
    for col, (field, name) in enumerate(
        (('arith_score', 'E[R] score'), ('geo_score', 'E[log R] score'))
    ):
      ax = axes[o, col]
      for m, method in enumerate(config.methods):
        curves = getattr(result, field)[m, o].mean(-1)
        _band(ax, curves, color=colors(m), label=method.label, ls=_LINE_STYLES[m % 4])
      ax.set_title(f'{objective.label}: {name}', fontsize=10)
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel('step')
  axes[0, 1].legend(fontsize=7, loc='lower right')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_contexts(
    path, config: study.TrainConfig, result: study.TrainResult, objective: int = 0
) -> None:
  """E[R] score of every context (one panel each) for one objective."""
  env = config.env
  fig, axes = plt.subplots(
      1, env.num_contexts, figsize=(4 * env.num_contexts, 3.2), squeeze=False, sharey=True
  )
  colors = _colors(len(config.methods))
  for c, scale in enumerate(env.context_scales):
    ax = axes[0, c]
    for m, method in enumerate(config.methods):
      _band(
          ax,
          result.arith_score[m, objective][:, :, c],
          color=colors(m),
          label=method.label,
          ls=_LINE_STYLES[m % 4],
      )
    ax.set_title(f'prompt with rewards ×{scale:g}', fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel(f'E[R] score ({config.objectives[objective].label})')
  axes[0, -1].legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_advantage_scatter(path, worked_examples: Sequence[dict]) -> None:
  """Advantage vs reward for each worked example (`run.advantage_checks` rows).

  Top: the normalized GRPO and log-reward estimators as they are; bottom: the
  unnormalized ones divided by the group's max |A| (their units differ).
  """
  rows = (('GRPO', 'log-norm d=1e-8'), ('Dr.GRPO', 'log d=1e-8'))
  fig, axes = plt.subplots(
      2, len(worked_examples), figsize=(4.5 * len(worked_examples), 6.4), squeeze=False
  )
  markers = ('o', 'x')
  for g, example in enumerate(worked_examples):
    rewards = np.asarray(example['rewards'], np.float64)
    by_label = {row['method']: np.asarray(row['advantages']) for row in example['rows']}
    # Equal rewards would plot on top of each other: spread them sideways a little.
    jitter = 1 + 0.04 * (np.arange(len(rewards)) - len(rewards) / 2) / len(rewards)
    for r, labels in enumerate(rows):
      ax = axes[r, g]
      for k, label in enumerate(labels):
        adv = by_label[label]
        if r == 1:
          adv = adv / np.max(np.abs(adv))
        ax.scatter(rewards * jitter, adv, marker=markers[k], s=40, label=label)
      ax.axhline(0, color='k', lw=0.6)
      ax.set_xscale('symlog', linthresh=1)
      ax.set_xlim(-0.3, 3 * rewards.max())
      ax.set_title(f'R = {example["rewards"]}', fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, loc='upper left')
      ax.set_ylabel('advantage' if r == 0 else 'advantage / max |advantage|')
    axes[1, g].set_xlabel('reward (symlog)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
