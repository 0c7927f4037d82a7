"""The reward-distribution study as one command.

    python -m experiments.reward_study [--quick] [--out results/reward_study]

Runs every environment of `envs.study_envs()` with every method x objective x
seed (one compiled, vmapped program per environment), the fixed-parameter
diagnostics, the advantage-level checks (worked examples, scale invariance,
binary identities) and a short high-reuse ("stress") regime, then writes
results.md, results.json and PNG figures into --out. The full study is sized
to run in well under 15 minutes on 2 CPU cores; --quick is a smoke run (one
environment, few steps and seeds) for the tests.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.reward_study import envs, report, study

# The groups of the founding document (section 1.1), one with ordinary samples
# between the geometric and the arithmetic mean, and one with a zero reward.
WORKED_GROUPS: tuple[tuple[float, ...], ...] = (
    (10.0, 10.0, 10.0, 1000.0),
    (1.0, 5.0, 10.0, 20.0, 30.0, 1000.0),
    (0.0, 1.0, 50.0, 100.0),
)

# GMPO's geometric objective at the token-clip's range, to compare the two at
# equal clip widths in the stress regime.
GEOMETRIC_NARROW = study.Objective(
    'geometric e^±0.2',
    'geometric',
    (
        ('epsilon_low', 0.2),
        ('epsilon_high', 0.2),
        ('clip_mode', 'token'),
        ('loss_agg_mode', 'seq-mean-token-mean'),
    ),
)


# p = 1 and p -> 0 of the power-mean family, checked against the estimators they
# reduce to (Dr.GRPO / GRPO and the log baseline) rather than trained twice.
_POWER_MEAN_ENDS = tuple(
    study.Method(
        f'pow{"-norm" if normalize else ""} p={label}',
        'power_mean',
        (('p', p), ('normalize', normalize), ('floor', 1e-8)),
    )
    for p, label in ((1.0, '1'), (1e-6, '1e-6'))
    for normalize in (False, True)
)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Sizes of the study.

  Attributes:
    env_names: environments of the main regime (names in `envs.study_envs()`).
    num_seeds: seeds per method x objective (vmapped).
    num_steps, num_epochs, learning_rate, group_size: the main regime
      (`study.TrainConfig`).
    diag_seeds: seeds of the fixed-parameter diagnostics.
    diag_batches: batches per seed for the gradient statistics.
    stress_env_names: environments of the high-reuse regime (may be empty).
    stress_steps, stress_epochs, stress_learning_rate: that regime.
    stress_methods: method labels run in that regime.
    scale_groups: groups drawn for the scale-invariance and binary checks.
    seed: root PRNG seed.
  """

  env_names: tuple[str, ...] = tuple(env.name for env in envs.study_envs())
  num_seeds: int = 64
  num_steps: int = 400
  num_epochs: int = 8
  learning_rate: float = 0.02
  group_size: int = 8
  diag_seeds: int = 16
  diag_batches: int = 512
  stress_env_names: tuple[str, ...] = ('lognormal', 'pareto', 'kelly')
  stress_steps: int = 200
  stress_epochs: int = 16
  stress_learning_rate: float = 0.1
  stress_methods: tuple[str, ...] = ('GRPO', 'Dr.GRPO', 'log d=1e-8', 'log-norm d=1e-8')
  scale_groups: int = 4096
  seed: int = 0

  def __post_init__(self):
    known_envs = {env.name for env in envs.study_envs()}
    known_methods = {method.label for method in study.METHODS}
    unknown = (set(self.env_names) | set(self.stress_env_names)) - known_envs
    unknown |= set(self.stress_methods) - known_methods
    if unknown:
      raise ValueError(
          f'Unknown environment(s) or method(s) {sorted(unknown)}; environments: '
          f'{sorted(known_envs)}, methods: {sorted(known_methods)}.'
      )
    if self.num_seeds < 2 or self.diag_seeds < 2:
      raise ValueError('num_seeds and diag_seeds must be >= 2 (confidence intervals).')


FULL = StudyConfig()
QUICK = StudyConfig(
    env_names=('uniform',),
    num_seeds=3,
    num_steps=30,
    diag_seeds=2,
    diag_batches=16,
    stress_env_names=(),
    scale_groups=256,
)


def _env(name: str) -> envs.RewardEnv:
  by_name = {env.name: env for env in envs.study_envs()}
  if name not in by_name:
    raise ValueError(f'Unknown environment {name!r}; valid: {", ".join(by_name)}.')
  return by_name[name]


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _uniform_policy_rewards(
    env: envs.RewardEnv, key, num_groups: int, group_size: int
) -> jax.Array:
  """[num_groups, G] rewards of the uniform policy in context 0 of env."""
  key_tokens, key_rewards = jax.random.split(key)
  tokens = jax.random.randint(
      key_tokens, (env.num_contexts, num_groups * group_size, envs.NUM_TOKENS), 0, envs.VOCAB_SIZE
  )
  return env.sample(key_rewards, tokens)[0].reshape(num_groups, group_size)


def advantage_checks(config: StudyConfig, key) -> dict:
  """Worked examples, scale invariance, the binary-reward identities and the ends
  of the power-mean family."""
  methods = study.METHODS
  advantage = study.all_advantages(methods)
  # The groups padded to one shape with a mask: one compiled call for all of them.
  size = max(len(group) for group in WORKED_GROUPS)
  rewards = np.zeros((len(WORKED_GROUPS), size), np.float32)
  mask = np.zeros((len(WORKED_GROUPS), size), bool)
  for g, group in enumerate(WORKED_GROUPS):
    rewards[g, : len(group)], mask[g, : len(group)] = group, True
  values = np.asarray(advantage(jnp.asarray(rewards), jnp.asarray(mask)))  # [M, W, G]
  worked = []
  for g, group in enumerate(WORKED_GROUPS):
    valid = np.asarray(group)[None]
    rows = []
    for i, method in enumerate(methods):
      adv = values[i, g, : len(group)]
      penalized, above = study.penalized_counts(jnp.asarray(valid), jnp.asarray(adv[None]))
      rows.append(
          {
              'method': method.label,
              'advantages': adv.tolist(),
              'negative': int(np.sum(adv < 0)),
              'penalized': int(penalized),
              'above_median': int(above),
          }
      )
    worked.append(
        {
            'rewards': list(group),
            'rows': rows,
            'arithmetic_mean': float(np.mean(group)),
            'geometric_mean': float(np.exp(np.mean(np.log(np.maximum(group, 1e-8))))),
        }
    )

  key_positive, key_binary = jax.random.split(key)
  scales = (1e-6, 1e-3, 1e3)
  positive = _uniform_policy_rewards(
      _env('lognormal'), key_positive, config.scale_groups, config.group_size
  )
  deviation = study.scale_deviation(positive, methods, scales)
  # The ends of the power-mean family, which METHODS leave out as duplicates.
  ends = study.all_advantages(_POWER_MEAN_ENDS)(positive)
  same = dict(zip((m.label for m in methods), np.asarray(advantage(positive), np.float64)))
  end = dict(zip((m.label for m in _POWER_MEAN_ENDS), np.asarray(ends, np.float64)))

  binary = _uniform_policy_rewards(
      _env('binary'), key_binary, config.scale_groups, config.group_size
  )
  by_label = dict(zip((m.label for m in methods), np.asarray(advantage(binary), np.float64)))

  def max_relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

  identities = {
      'log-norm d=1e-8 vs GRPO': max_relative(by_label['log-norm d=1e-8'], by_label['GRPO']),
      'log d=1e-8 vs |ln 1e-8| x Dr.GRPO': max_relative(
          by_label['log d=1e-8'], -math.log(1e-8) * by_label['Dr.GRPO']
      ),
      'log d=1e-2 vs |ln 1e-2| x Dr.GRPO': max_relative(
          by_label['log d=1e-2'], -math.log(1e-2) * by_label['Dr.GRPO']
      ),
  }
  # Any increasing transform of two values standardizes to GRPO; unnormalized, the
  # power mean is Dr.GRPO times L(1) - L(0) = (1 - d^p) / p with the floor d = 1e-8.
  for p in (0.5, -0.5):
    identities[f'pow-norm p={p:g} vs GRPO'] = max_relative(
        by_label[f'pow-norm p={p:g}'], by_label['GRPO']
    )
    factor = (1 - 1e-8**p) / p
    identities[f'pow p={p:g} vs {factor:.5g} x Dr.GRPO'] = max_relative(
        by_label[f'pow p={p:g}'], factor * by_label['Dr.GRPO']
    )
  power_mean_ends = {
      'pow p=1 vs Dr.GRPO': max_relative(end['pow p=1'], same['Dr.GRPO']),
      'pow-norm p=1 vs GRPO': max_relative(end['pow-norm p=1'], same['GRPO']),
      'pow p=1e-6 vs log d=1e-8': max_relative(end['pow p=1e-6'], same['log d=1e-8']),
      'pow-norm p=1e-6 vs log-norm d=1e-8': max_relative(
          end['pow-norm p=1e-6'], same['log-norm d=1e-8']
      ),
  }
  return {
      'worked_examples': worked,
      'scale_invariance': {
          'scales': list(scales),
          'rewards': 'lognormal env, uniform policy',
          'rows': [
              {'method': m.label, 'max_relative_deviation': deviation[i].tolist()}
              for i, m in enumerate(methods)
          ],
      },
      'binary_identities': identities,
      'power_mean_ends': power_mean_ends,
  }


def _train_config(config: StudyConfig, env: envs.RewardEnv, *, stress: bool) -> study.TrainConfig:
  """The main regime (every method and objective), or the high-reuse one."""
  if not stress:
    return study.TrainConfig(
        env=env,
        num_steps=config.num_steps,
        group_size=config.group_size,
        num_epochs=config.num_epochs,
        learning_rate=config.learning_rate,
    )
  methods = tuple(m for m in study.METHODS if m.label in config.stress_methods)
  return study.TrainConfig(
      env=env,
      methods=methods,
      objectives=study.OBJECTIVES + (GEOMETRIC_NARROW,),
      num_steps=config.stress_steps,
      group_size=config.group_size,
      num_epochs=config.stress_epochs,
      learning_rate=config.stress_learning_rate,
  )


def run_study(config: StudyConfig, out: pathlib.Path, command: str) -> dict:
  """Runs the study, writes results.md / results.json / PNGs into `out`.

  Returns:
    {'summary': what results.json holds, 'raw': {env name: (TrainConfig,
    TrainResult as NumPy)}} (the raw curves are for tests and notebooks).
  """
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  load_start = os.getloadavg()
  # RngBitGenerator bits: threefry's unrolled kernels dominate compile time here.
  key = jax.random.key(config.seed, impl='rbg')
  key_checks, key_main, key_diag, key_stress = jax.random.split(key, 4)
  summary = {
      'command': command,
      'config': dataclasses.asdict(config),
      'train_hyperparameters': {
          'group_size': config.group_size,
          'num_steps': config.num_steps,
          'num_epochs': config.num_epochs,
          'learning_rate': config.learning_rate,
          'optimizer': 'adam',
          'T': envs.NUM_TOKENS,
          'V': envs.VOCAB_SIZE,
          'methods': [dataclasses.asdict(m) for m in study.METHODS],
          'objectives': [dataclasses.asdict(o) for o in study.OBJECTIVES],
      },
      'checks': advantage_checks(config, key_checks),
      'envs': {},
      'stress': {},
      'timing_s': {},
  }
  report.plot_advantage_scatter(out / 'advantage_scatter.png', summary['checks']['worked_examples'])
  raw = {}
  for name in config.env_names:
    tic = time.perf_counter()
    env = _env(name)
    train_config = _train_config(config, env, stress=False)
    result = _numpy(
        study.run_grid(
            train_config, jax.random.fold_in(key_main, len(raw)), num_seeds=config.num_seeds
        )
    )
    diagnostics = _numpy(
        study.run_diagnostics(
            train_config,
            jax.random.fold_in(key_diag, len(raw)),
            num_seeds=config.diag_seeds,
            num_batches=config.diag_batches,
        )
    )
    raw[name] = (train_config, result)
    summary['envs'][name] = {
        'summary': env.summary,
        'optima': report.optima(env),
        'context_scales': list(env.context_scales),
        'runs': report.summarize_runs(train_config, result),
        'diagnostics': report.summarize_diagnostics(train_config, diagnostics),
    }
    report.plot_curves(out / f'curves_{name}.png', train_config, result, f'{name}: {env.summary}')
    if env.num_contexts > 1:
      report.plot_contexts(out / f'contexts_{name}.png', train_config, result)
    summary['timing_s'][name] = time.perf_counter() - tic
    print(f'[reward_study] {name}: {summary["timing_s"][name]:.1f} s', flush=True)

  for index, name in enumerate(config.stress_env_names):
    tic = time.perf_counter()
    env = _env(name)
    train_config = _train_config(config, env, stress=True)
    result = _numpy(
        study.run_grid(
            train_config, jax.random.fold_in(key_stress, index), num_seeds=config.num_seeds
        )
    )
    summary['stress'][name] = {'runs': report.summarize_runs(train_config, result)}
    report.plot_curves(
        out / f'stress_{name}.png',
        train_config,
        result,
        f'high reuse (lr {config.stress_learning_rate}, ' f'{config.stress_epochs} epochs): {name}',
    )
    summary['timing_s'][f'stress {name}'] = time.perf_counter() - tic
    print(
        f'[reward_study] stress {name}: ' f'{summary["timing_s"][f"stress {name}"]:.1f} s',
        flush=True,
    )

  summary['timing_s']['total'] = time.perf_counter() - start
  summary['machine'] = {
      'cpus_usable': len(os.sched_getaffinity(0)),
      'load_average_start': load_start,
      'load_average_end': os.getloadavg(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
  }
  (out / 'results.json').write_text(json.dumps(summary, indent=1))
  (out / 'results.md').write_text(results_markdown(summary, config))
  return {'summary': summary, 'raw': raw}


def results_markdown(summary: dict, config: StudyConfig) -> str:
  """The results tables as one markdown document."""
  m = summary['machine']
  parts = [
      '# Reward-distribution study: results\n',
      f'Command: `{summary["command"]}`  \n'
      f'Wall time: {summary["timing_s"]["total"]:.0f} s on {m["cpus_usable"]} usable '
      f'CPU(s) (load average at start {m["load_average_start"][0]:.1f}, end '
      f'{m["load_average_end"][0]:.1f}; jax {m["jax"]}, {m["backend"]}).  \n'
      f'Main regime: T = {envs.NUM_TOKENS} tokens, V = {envs.VOCAB_SIZE}, G = '
      f'{config.group_size}, {config.num_steps} steps, {config.num_epochs} Adam epochs '
      f'per batch at lr {config.learning_rate}, {config.num_seeds} seeds (mean ± '
      f'half-width of the 95% Student-t confidence interval over seeds). Scores are '
      f'normalized per prompt: 0 = worst, 1 = best deterministic policy, computed '
      f'exactly. "Steps to 0.9" averages the seeds that reached 0.9 (count in '
      f'brackets).\n',
      '## Worked examples (advantages of one group)\n',
  ]
  for example in summary['checks']['worked_examples']:
    parts.append(
        f'R = {example["rewards"]}: arithmetic mean {example["arithmetic_mean"]:.4g}, '
        f'geometric mean {example["geometric_mean"]:.4g} (zeros floored at 1e-8).\n\n'
        '| method | advantages | # negative | above-median penalized |\n|---|---|---|---|\n'
        + '\n'.join(
            f'| {r["method"]} | {", ".join(f"{a:.4g}" for a in r["advantages"])} '
            f'| {r["negative"]}/{len(example["rewards"])} '
            f'| {r["penalized"]}/{r["above_median"]} |'
            for r in example['rows']
        )
        + '\n'
    )
  scale = summary['checks']['scale_invariance']
  parts.append(
      '## Scale invariance of the advantages\n\n'
      f'max |A(cR) - A(R)| / max |A(R)| on {config.scale_groups} groups of '
      f'{scale["rewards"]} rewards.\n\n'
      '| method | ' + ' | '.join(f'c = {c:g}' for c in scale['scales']) + ' |\n'
      '|---|'
      + '---|' * len(scale['scales'])
      + '\n'
      + '\n'.join(
          f'| {r["method"]} | ' + ' | '.join(f'{d:.2e}' for d in r['max_relative_deviation']) + ' |'
          for r in scale['rows']
      )
      + '\n'
  )
  parts.append(
      '## Binary 0/1 rewards: identities (max relative deviation)\n\n'
      + '\n'.join(f'- {k}: {v:.2e}' for k, v in summary['checks']['binary_identities'].items())
      + '\n'
  )
  parts.append(
      '## The ends of the power-mean family (max relative deviation, '
      f'{scale["rewards"]} rewards)\n\n'
      + '\n'.join(f'- {k}: {v:.2e}' for k, v in summary['checks']['power_mean_ends'].items())
      + '\n'
  )
  for name, env_summary in summary['envs'].items():
    optima_lines = '\n'.join(
        f'- prompt ×{scale:g}: E[R] optimum {o["arith_opt"]} '
        f'(E[R] = {o["arith_opt_value"]:.4g}), E[log(R + {o["geo_offset"]:g})] optimum '
        f'{o["geo_opt"]} ({o["geo_opt_value"]:.4g}); uniform policy E[R] = '
        f'{o["uniform_policy_mean"]:.4g}, E[log(R + {o["geo_offset"]:g})] = '
        f'{o["uniform_policy_mean_log"]:.4g}'
        for scale, o in zip(env_summary['context_scales'], env_summary['optima'])
    )
    parts.append(
        f'## {name}\n\n{env_summary["summary"]}.\n\n{optima_lines}\n\n'
        + report.runs_table(env_summary['runs'], config.num_seeds)
        + f'\nDiagnostics at the uniform policy ({config.diag_seeds} seeds x '
        f'{config.diag_batches} batches):\n\n'
        + report.diagnostics_table(env_summary['diagnostics'])
        + f'\n![{name}](curves_{name}.png)\n'
    )
    if len(env_summary['context_scales']) > 1:
      env = _env(name)
      parts.append(
          '\nFinal E[R] score per prompt:\n\n'
          + report.context_table(env, env_summary['runs'])
          + f'\n![{name} per prompt](contexts_{name}.png)\n'
      )
  if summary['stress']:
    parts.append(
        f'## High-reuse regime ({config.stress_steps} steps, {config.stress_epochs} '
        f'epochs per batch, lr {config.stress_learning_rate})\n'
    )
    for name, stress in summary['stress'].items():
      parts.append(
          f'### {name}\n\n'
          + report.runs_table(stress['runs'], config.num_seeds)
          + f'\n![stress {name}](stress_{name}.png)\n'
      )
  parts.append(
      '## Timing (s)\n\n'
      + '\n'.join(f'- {k}: {v:.1f}' for k, v in summary['timing_s'].items())
      + '\n'
  )
  return '\n'.join(parts)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--out', default='results/reward_study', help='results folder (created if missing)'
  )
  parser.add_argument(
      '--quick', action='store_true', help='smoke run: one environment, few steps and seeds'
  )
  args = parser.parse_args(argv)
  command = 'python -m experiments.reward_study ' + ' '.join(sys.argv[1:] if argv is None else argv)
  return run_study(QUICK if args.quick else FULL, pathlib.Path(args.out), command.strip())
