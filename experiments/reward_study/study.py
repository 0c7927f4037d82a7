"""Training runs and fixed-parameter diagnostics of the reward-distribution study.

The policy is a table of logits per context and token position (C x T x V, see
`envs`), optionally mixed across contexts; a group is G sampled sequences per
context. One training step samples the groups, scores them, computes advantages
with one of `METHODS` (the estimators of `gmpo_jax.algo.advantages`) and takes
`num_epochs` Adam steps on one of `OBJECTIVES` (the losses of `gmpo_jax.algo.losses`)
with the rollout log-probs held fixed, so the clip matters from the second epoch.

A whole run is a pure function of a PRNG key (`make_train(config)(key, method,
objective)`, as in purejaxrl); the method and the objective are indices into the
config's tuples, chosen with `lax.switch`, so `run_grid` vmaps every method,
objective and seed of one environment into one compiled program.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.reward_study import envs
from gmpo_jax.algo import advantages, losses


@dataclasses.dataclass(frozen=True)
class Method:
  """An advantage estimator of `gmpo_jax.algo.advantages` with bound hyperparameters."""

  label: str
  estimator: str
  hyperparameters: tuple[tuple[str, float | bool], ...] = ()

  def advantage_fn(self) -> Callable[[jax.Array], jax.Array]:
    return advantages.get_advantage_fn(self.estimator, **dict(self.hyperparameters))


@dataclasses.dataclass(frozen=True)
class Objective:
  """A policy loss of `gmpo_jax.algo.losses` with bound hyperparameters."""

  label: str
  loss: str
  hyperparameters: tuple[tuple[str, float | str], ...] = ()

  def loss_fn(self) -> Callable[..., tuple[jax.Array, losses.LossExtras]]:
    return losses.get_policy_loss(self.loss, **dict(self.hyperparameters))


# 'log' is the founding document's log-reward geometric-mean baseline (registry
# name 'gmpo'): A = log(max(R + offset, d)) - mean; 'log-norm' also divides by the
# std of the log-rewards. d (the floor) only acts on rewards below it.
# 'pow p' is the power-mean (Box-Cox) family, L = (max(R, d)^p - 1) / p with the
# log baseline's floor d = 1e-8, so zero rewards are clamped as in 'log d=1e-8'
# (for p = 0.5 that moves 0 to 1e-4, for p = -0.5 it makes a zero worth
# -2e4); 'pow-norm' divides by the std of L. p = 1 is Dr.GRPO (normalized: GRPO)
# and p = 0 the log baseline, so only the interior and negative points are new
# rows; `run.advantage_checks` verifies the two ends. MaxRL (Tajwar et al. 2026,
# arXiv 2602.02710) divides R - mean by the mean: it needs R >= 0, which every
# study environment satisfies (tests/experiments/test_reward_study.py checks it).
METHODS: Final[tuple[Method, ...]] = (
    Method('GRPO', 'grpo'),
    Method('Dr.GRPO', 'dr_grpo'),
    Method('RLOO', 'rloo'),
    Method('log d=1e-8', 'gmpo', (('normalize', False), ('floor', 1e-8))),
    Method('log-norm d=1e-8', 'gmpo', (('normalize', True), ('floor', 1e-8))),
    Method('log d=1e-2', 'gmpo', (('normalize', False), ('floor', 1e-2))),
    Method('log(R+1)', 'gmpo', (('normalize', False), ('offset', 1.0))),
    Method('pow p=0.5', 'power_mean', (('p', 0.5), ('normalize', False), ('floor', 1e-8))),
    Method('pow-norm p=0.5', 'power_mean', (('p', 0.5), ('normalize', True), ('floor', 1e-8))),
    Method('pow p=-0.5', 'power_mean', (('p', -0.5), ('normalize', False), ('floor', 1e-8))),
    Method('pow-norm p=-0.5', 'power_mean', (('p', -0.5), ('normalize', True), ('floor', 1e-8))),
    Method('MaxRL', 'maxrl'),
)

# Token-clip: PPO/GRPO with epsilon 0.2. Geometric: GMPO (Zhao et al. 2025, arXiv
# 2507.20673) with its defaults, token clip at e^(+-0.4).
OBJECTIVES: Final[tuple[Objective, ...]] = (
    Objective(
        'token-clip',
        'token_clip',
        (('epsilon_low', 0.2), ('epsilon_high', 0.2), ('loss_agg_mode', 'token-mean')),
    ),
    Objective(
        'geometric',
        'geometric',
        (
            ('epsilon_low', 0.4),
            ('epsilon_high', 0.4),
            ('clip_mode', 'token'),
            ('loss_agg_mode', 'seq-mean-token-mean'),
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One environment and the training hyperparameters shared by all its runs.

  Attributes:
    env: the reward environment.
    methods: advantage estimators a run can select by index.
    objectives: policy losses a run can select by index.
    num_steps: rollout steps per run.
    group_size: G, completions per context per step.
    num_epochs: mu, optimizer steps per rollout batch on the fixed old log-probs.
    learning_rate: Adam step size.
  """

  env: envs.RewardEnv
  methods: tuple[Method, ...] = METHODS
  objectives: tuple[Objective, ...] = OBJECTIVES
  num_steps: int = 400
  group_size: int = 8
  num_epochs: int = 8
  learning_rate: float = 0.02

  def __post_init__(self):
    if not (self.methods and self.objectives):
      raise ValueError('TrainConfig needs at least one method and one objective.')
    if self.num_steps < 1 or self.num_epochs < 1:
      raise ValueError(
          f'num_steps and num_epochs must be >= 1, got {self.num_steps}, ' f'{self.num_epochs}.'
      )
    if self.group_size < 2:
      raise ValueError(f'group_size must be >= 2, got {self.group_size}.')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}.')


class Scores(NamedTuple):
  """Exact quality of a policy, per context.

  Attributes:
    arith: [C] (E_pi[R] - min_s E[R|s]) / (max_s E[R|s] - min_s E[R|s]) over
      sequences s: 0 for the worst deterministic policy, 1 for the best.
    geo: [C] the same for E_pi[log(R + geo_offset)].
    sequence_prob: [C, N] pi(s) of every sequence, in `envs.all_sequences()` order.
  """

  arith: jax.Array
  geo: jax.Array
  sequence_prob: jax.Array


class TrainResult(NamedTuple):
  """One run (leading axes are added by vmap).

  Attributes:
    arith_score: [S + 1, C] Scores.arith before training and after every step.
    geo_score: [S + 1, C] Scores.geo likewise.
    final_sequence_prob: [C, N] pi(s) of every sequence after the last step.
    penalized_fraction: [] over the run, the fraction of samples above their
      group's median reward that got a negative advantage.
    clip_fraction: [] mean clipped-token fraction (low + high) over all epochs.
    zero_advantage_fraction: [] fraction of groups whose advantages are all 0.
  """

  arith_score: jax.Array
  geo_score: jax.Array
  final_sequence_prob: jax.Array
  penalized_fraction: jax.Array
  clip_fraction: jax.Array
  zero_advantage_fraction: jax.Array


class Diagnostics(NamedTuple):
  """Estimator statistics at fixed parameters, one per method ([M] float32 each).

  Attributes:
    penalized_fraction: fraction of samples above their group's median that get
      a negative advantage.
    grad_snr: |E g|^2 / tr Cov[g] for the per-batch policy gradient g (one
      batch = one group per context), with |E g|^2 estimated without its noise
      bias tr Cov / N and floored at 0. Scale free: comparable across
      estimators; 1 / SNR is the relative variance of g.
    cos_arith: cosine between E g (ascent direction) and the exact gradient of
      the mean over contexts of Scores.arith.
    cos_geo: the same for Scores.geo.
  """

  penalized_fraction: jax.Array
  grad_snr: jax.Array
  cos_arith: jax.Array
  cos_geo: jax.Array


def policy_logits(params: jax.Array, mixing: jax.Array) -> jax.Array:
  """logits[c] = sum_k mixing[c, k] params[k]: [C, T, V] float32."""
  chex.assert_rank([params, mixing], [3, 2])
  return jnp.einsum('ck,ktv->ctv', mixing, params)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log pi(tokens[c, g, t]) under logits [C, T, V]: [C, G, T] float32."""
  chex.assert_rank([logits, tokens], 3)
  logp = jax.nn.log_softmax(logits, axis=-1)[:, None]  # [C, 1, T, V]
  return jnp.take_along_axis(
      jnp.broadcast_to(logp, tokens.shape + logits.shape[-1:]), tokens[..., None], axis=-1
  )[..., 0]


def penalized_counts(rewards: jax.Array, advantage: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Samples above their group's median with a negative advantage.

  Args:
    rewards: [B, G] float rewards.
    advantage: [B, G] float advantages of the same samples.

  Returns:
    (penalized, above): int32 counts over the batch of samples with R_i >
    median_j R_j and A_i < 0, and of samples with R_i > median_j R_j. A group
    of all-equal rewards has no sample above its median.
  """
  chex.assert_rank(rewards, 2)
  chex.assert_equal_shape([rewards, advantage])
  above = rewards > jnp.median(rewards, axis=-1, keepdims=True)
  return jnp.sum(above & (advantage < 0)), jnp.sum(above)


def make_scorer(env: envs.RewardEnv) -> Callable[[jax.Array], Scores]:
  """Exact `Scores` of the policy with logits [C, T, V], from `env.exact_tables()`."""
  tables = env.exact_tables()
  sequences = jnp.asarray(envs.all_sequences())  # [N, T]
  positions = jnp.arange(envs.NUM_TOKENS)[None, :]

  def normalizer(table):
    low = table.min(axis=1)
    span = table.max(axis=1) - low
    return tuple(jnp.asarray(x, jnp.float32) for x in (table, low, span))

  mean, mean_low, mean_span = normalizer(tables.mean_reward)
  log, log_low, log_span = normalizer(tables.mean_log_reward)

  def score(logits):
    chex.assert_shape(logits, (env.num_contexts, envs.NUM_TOKENS, envs.VOCAB_SIZE))
    logp = jax.nn.log_softmax(logits, axis=-1)  # [C, T, V]
    sequence_prob = jnp.exp(jnp.sum(logp[:, positions, sequences], axis=-1))
    arith = (jnp.sum(sequence_prob * mean, axis=1) - mean_low) / mean_span
    geo = (jnp.sum(sequence_prob * log, axis=1) - log_low) / log_span
    return Scores(arith, geo, sequence_prob)

  return score


class _Parts(NamedTuple):
  """What a training run and the diagnostics share for one config."""

  mixing: jax.Array
  score: Callable[[jax.Array], Scores]
  sample_batch: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  flat_logprobs: Callable[[jax.Array, jax.Array], jax.Array]
  advantage: Callable[[jax.Array, jax.Array], jax.Array]
  policy_loss: Callable[..., tuple[jax.Array, losses.LossExtras]]
  params_shape: tuple[int, int, int]


def _parts(config: TrainConfig) -> _Parts:
  env = config.env
  num_contexts, group = env.num_contexts, config.group_size
  mixing = jnp.asarray(env.context_mixing())
  advantage_fns = [method.advantage_fn() for method in config.methods]
  loss_fns = [objective.loss_fn() for objective in config.objectives]
  mask = jnp.ones((num_contexts * group, envs.NUM_TOKENS), bool)

  def sample_batch(key, logits):
    key_tokens, key_rewards = jax.random.split(key)
    tokens = jax.random.categorical(
        key_tokens, logits[:, None], shape=(num_contexts, group, envs.NUM_TOKENS)
    )
    return tokens, env.sample(key_rewards, tokens)

  def flat_logprobs(params, tokens):
    """[C * G, T] log-probs of the sampled tokens: the losses' [B, T] layout."""
    return token_logprobs(policy_logits(params, mixing), tokens).reshape(mask.shape)

  def advantage(method_index, rewards):
    return jax.lax.switch(method_index, advantage_fns, rewards)

  def policy_loss(params, tokens, old_logp, flat_advantage, objective_index):
    return jax.lax.switch(
        objective_index, loss_fns, flat_logprobs(params, tokens), old_logp, flat_advantage, mask
    )

  return _Parts(
      mixing,
      make_scorer(env),
      sample_batch,
      flat_logprobs,
      advantage,
      policy_loss,
      (num_contexts, envs.NUM_TOKENS, envs.VOCAB_SIZE),
  )


def make_train(config: TrainConfig) -> Callable[[jax.Array, int, int], TrainResult]:
  """Builds train(key, method_index, objective_index) -> TrainResult.

  The run starts from the uniform policy (zero logits) and is a pure function of
  its arguments, so it can be jitted and vmapped over keys and indices.
  """
  parts = _parts(config)
  optimizer = optax.adam(config.learning_rate)

  def train(key, method_index, objective_index):
    params = jnp.zeros(parts.params_shape, jnp.float32)

    def step(carry, step_key):
      params, opt_state = carry
      logits = policy_logits(params, parts.mixing)
      tokens, rewards = parts.sample_batch(step_key, logits)
      advantage = parts.advantage(method_index, rewards)
      old_logp = parts.flat_logprobs(params, tokens)
      flat_advantage = advantage.reshape(-1)

      def epoch(carry, _):
        params, opt_state = carry
        grads, extras = jax.grad(parts.policy_loss, has_aux=True)(
            params, tokens, old_logp, flat_advantage, objective_index
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        clipped = extras.clip_fraction_low + extras.clip_fraction_high
        return (optax.apply_updates(params, updates), opt_state), clipped

      (params, opt_state), clipped = jax.lax.scan(
          epoch, (params, opt_state), None, length=config.num_epochs
      )
      scores = parts.score(policy_logits(params, parts.mixing))
      penalized, above = penalized_counts(rewards, advantage)
      metrics = (
          scores.arith,
          scores.geo,
          penalized,
          above,
          jnp.mean(clipped),
          jnp.mean(jnp.all(advantage == 0, axis=-1)),
      )
      return (params, opt_state), metrics

    (params, _), metrics = jax.lax.scan(
        step, (params, optimizer.init(params)), jax.random.split(key, config.num_steps)
    )
    arith, geo, penalized, above, clipped, zero = metrics
    initial = parts.score(policy_logits(jnp.zeros_like(params), parts.mixing))
    final = parts.score(policy_logits(params, parts.mixing))
    return TrainResult(
        arith_score=jnp.concatenate([initial.arith[None], arith]),
        geo_score=jnp.concatenate([initial.geo[None], geo]),
        final_sequence_prob=final.sequence_prob,
        penalized_fraction=jnp.sum(penalized) / jnp.maximum(jnp.sum(above), 1),
        clip_fraction=jnp.mean(clipped),
        zero_advantage_fraction=jnp.mean(zero),
    )

  return train


def make_diagnostics(
    config: TrainConfig, *, num_batches: int
) -> Callable[[jax.Array], Diagnostics]:
  """Builds diagnose(key) -> Diagnostics with a leading [M] axis (every method).

  At the initial (uniform) policy, draws `num_batches` independent batches (one
  group per context) and gives every method the same batches. For each batch
  and method it takes the on-policy gradient of the first objective. At ratio 1
  and equal lengths the token-clip (token-mean) and geometric
  (seq-mean-token-mean) objectives have the same gradient,
  -mean_i A_i mean_t grad log pi, so the choice of objective does not matter here.
  """
  if num_batches < 2:
    raise ValueError(f'num_batches must be >= 2, got {num_batches}.')
  parts = _parts(config)
  params = jnp.zeros(parts.params_shape, jnp.float32)
  logits = policy_logits(params, parts.mixing)
  advantage_fns = [method.advantage_fn() for method in config.methods]
  objective_fn = config.objectives[0].loss_fn()

  def first_objective(params, tokens, old_logp, advantage):
    return objective_fn(
        parts.flat_logprobs(params, tokens), old_logp, advantage, jnp.ones(old_logp.shape, bool)
    )

  def mean_score(field):
    return lambda p: jnp.mean(getattr(parts.score(policy_logits(p, parts.mixing)), field))

  exact_arith = jax.grad(mean_score('arith'))(params).reshape(-1)
  exact_geo = jax.grad(mean_score('geo'))(params).reshape(-1)

  def one_batch(key):
    tokens, rewards = parts.sample_batch(key, logits)
    old_logp = parts.flat_logprobs(params, tokens)

    def ascent(advantage):
      grads, _ = jax.grad(first_objective, has_aux=True)(
          params, tokens, old_logp, advantage.reshape(-1)
      )
      return -grads.reshape(-1)

    advantage = jnp.stack([fn(rewards) for fn in advantage_fns])  # [M, C, G]
    counts = jax.vmap(penalized_counts, in_axes=(None, 0))(rewards, advantage)
    return jax.vmap(ascent)(advantage), counts

  def cosine(a, b):
    return a @ b / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b), 1e-30)

  def diagnose(key):
    ascent, (penalized, above) = jax.vmap(one_batch)(
        jax.random.split(key, num_batches)
    )  # [N, M, P], [N, M]
    mean = jnp.mean(ascent, axis=0)
    total_variance = jnp.sum(jnp.var(ascent, axis=0, ddof=1), axis=-1)
    signal = jnp.maximum(jnp.sum(mean**2, axis=-1) - total_variance / num_batches, 0)
    return Diagnostics(
        penalized_fraction=jnp.sum(penalized, 0) / jnp.maximum(jnp.sum(above, 0), 1),
        grad_snr=signal / jnp.maximum(total_variance, 1e-30),
        cos_arith=cosine(mean, exact_arith),
        cos_geo=cosine(mean, exact_geo),
    )

  return diagnose


def run_grid(config: TrainConfig, key: jax.Array, *, num_seeds: int) -> TrainResult:
  """Every method x objective x seed of one config in one jitted, vmapped call.

  The seeds share keys across methods and objectives (common random numbers).

  Returns:
    TrainResult with leading axes [M, O, num_seeds].
  """
  train = make_train(config)
  over_seeds = jax.vmap(train, in_axes=(0, None, None))
  over_objectives = jax.vmap(over_seeds, in_axes=(None, None, 0))
  over_methods = jax.vmap(over_objectives, in_axes=(None, 0, None))
  return jax.jit(over_methods)(
      jax.random.split(key, num_seeds),
      jnp.arange(len(config.methods)),
      jnp.arange(len(config.objectives)),
  )


def run_diagnostics(
    config: TrainConfig, key: jax.Array, *, num_seeds: int, num_batches: int
) -> Diagnostics:
  """`make_diagnostics` for every seed: leading axes [num_seeds, M]."""
  diagnose = make_diagnostics(config, num_batches=num_batches)
  return jax.jit(jax.vmap(diagnose))(jax.random.split(key, num_seeds))


def all_advantages(methods: Sequence[Method]) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
  """A jitted fn(rewards [B, G], mask [B, G] | None) -> [M, B, G]: every method."""
  fns = [method.advantage_fn() for method in methods]
  return jax.jit(lambda rewards, mask=None: jnp.stack([fn(rewards, mask) for fn in fns]))


def scale_deviation(
    rewards: jax.Array, methods: Sequence[Method], scales: Sequence[float]
) -> np.ndarray:
  """max |A(cR) - A(R)| / max |A(R)| for every method and scale c: [M, len(scales)].

  0 means the estimator is exactly scale invariant on these rewards ([B, G]).
  """
  chex.assert_rank(rewards, 2)
  advantage = all_advantages(methods)
  base = np.asarray(advantage(rewards), np.float64)
  deviation = [
      np.max(np.abs(np.asarray(advantage(rewards * scale), np.float64) - base), axis=(1, 2))
      for scale in scales
  ]
  return np.stack(deviation, axis=1) / np.max(np.abs(base), axis=(1, 2))[:, None]
