"""Reward environments with known optima for the reward-distribution study.

A completion is a sequence of T = 4 tokens from a vocabulary of V = 4; in every
environment token v has a *type* (A, B, C, D) and the reward distribution of a
sequence depends only on the types of its tokens. All V^T = 256 sequences can be
enumerated, so for any policy the expected reward E_pi[R] ("arithmetic") and the
expected log-reward E_pi[log(R + c)] ("geometric": exp of it is the geometric mean
of the reward, c = 0 for positive rewards) are computed exactly from per-sequence
moments (`exact_tables`, float64, closed forms or exact finite sums), not estimated.

Each environment states which sequence maximizes each of the two objectives; in
the "conflict" environments they differ on purpose (a steady token against one with
a higher mean but a lower median), because an advantage built on log R optimizes
E[log R] (the founding document, section 2.1), not E[R].
"""

import abc
import dataclasses
import itertools
import math
from typing import ClassVar, Final, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats

NUM_TOKENS: Final[int] = 4  # T
VOCAB_SIZE: Final[int] = 4  # V; token types 0..3 are called A, B, C, D.
TYPE_NAMES: Final[str] = 'ABCD'


def all_sequences() -> np.ndarray:
  """Every sequence of NUM_TOKENS tokens, lexicographic: [V^T, T] int32."""
  return np.array(list(itertools.product(range(VOCAB_SIZE), repeat=NUM_TOKENS)), dtype=np.int32)


class ExactTables(NamedTuple):
  """Per-sequence reward moments, exact in float64.

  Attributes:
    mean_reward: [C, N] E[R | context, sequence], N = V^T sequences in the order
      of `all_sequences()`.
    mean_log_reward: [C, N] E[log(R + geo_offset) | context, sequence].
  """

  mean_reward: np.ndarray
  mean_log_reward: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardEnv(abc.ABC):
  """A distribution of rewards over token sequences, one group per context.

  Attributes:
    name: short name used in tables and file names.
    summary: one line for the report: the distribution and which sequence is
      optimal under each objective.
    context_scales: reward multiplier of each context (C = its length): rewards of
      context c are s_c times the base reward.
    permute_tokens: if set, token v of context c has type (v + c) mod V, so the
      contexts need different tokens.
    mix_contexts: if set, the policy logits of context c are sum_k M[c, k] W[k]
      with a fixed orthogonal M whose entries are all nonzero (see
      `context_mixing`): every parameter is shared by all contexts, as prompts
      share an LM's weights, while any per-context policy stays representable.
      Needs C >= 3.
  """

  name: str
  summary: str
  context_scales: tuple[float, ...] = (1.0,)
  permute_tokens: bool = False
  mix_contexts: bool = False

  # c in the geometric objective E[log(R + c)]; 0 where rewards are positive.
  geo_offset: ClassVar[float] = 0.0

  def __post_init__(self):
    if not self.context_scales or min(self.context_scales) <= 0:
      raise ValueError(f'{self.name}: context_scales must be positive, got {self.context_scales}.')
    if self.geo_offset != 0 and set(self.context_scales) != {1.0}:
      # log(sR + c) does not separate into log s + log(R + c).
      raise ValueError(f'{self.name}: context scales need geo_offset == 0, got {self.geo_offset}.')
    if self.mix_contexts and self.num_contexts < 3:
      raise ValueError(f'{self.name}: mix_contexts needs >= 3 contexts.')

  @property
  def num_contexts(self) -> int:
    return len(self.context_scales)

  def token_types(self) -> np.ndarray:
    """[C, V] int32: the type of token v in context c."""
    shift = np.arange(self.num_contexts)[:, None] if self.permute_tokens else 0
    return ((np.arange(VOCAB_SIZE)[None, :] + shift) % VOCAB_SIZE).astype(np.int32)

  def context_mixing(self) -> np.ndarray:
    """[C, C] float32 M with logits[c] = sum_k M[c, k] W[k].

    The identity without mixing; with it the Householder reflection
    I - (2 / C) 1 1^T, orthogonal with all entries nonzero for C >= 3.
    """
    num = self.num_contexts
    eye = np.eye(num, dtype=np.float32)
    if not self.mix_contexts:
      return eye
    return eye - np.full((num, num), 2.0 / num, dtype=np.float32)

  def sample(self, key: jax.Array, tokens: jax.Array) -> jax.Array:
    """Draws one reward per sequence.

    Args:
      key: PRNG key.
      tokens: [C, G, T] int32 sampled tokens, one group of G per context.

    Returns:
      [C, G] float32 rewards (>= 0; > 0 unless the environment has zeros).
    """
    chex.assert_rank(tokens, 3)
    chex.assert_axis_dimension(tokens, 0, self.num_contexts)
    chex.assert_axis_dimension(tokens, 2, NUM_TOKENS)
    table = jnp.asarray(self.token_types())
    types = table[jnp.arange(self.num_contexts)[:, None, None], tokens]
    scales = jnp.asarray(self.context_scales, jnp.float32)[:, None]
    return self._sample(key, types) * scales

  def exact_tables(self) -> ExactTables:
    """Exact per-sequence moments for every context ([C, V^T] float64 each)."""
    types = self.token_types()[:, all_sequences()]  # [C, N, T]
    mean, mean_log = self._moments(types.reshape(-1, NUM_TOKENS))
    shape = types.shape[:2]
    scales = np.asarray(self.context_scales, np.float64)[:, None]
    return ExactTables(
        mean_reward=mean.reshape(shape) * scales,
        mean_log_reward=mean_log.reshape(shape) + np.log(scales),
    )

  @abc.abstractmethod
  def _sample(self, key: jax.Array, types: jax.Array) -> jax.Array:
    """[..., T] int32 token types -> [...] float32 unscaled rewards."""

  @abc.abstractmethod
  def _moments(self, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] types -> (E[R], E[log(R + geo_offset)]), each [N] float64, unscaled."""


def _mean_quality(quality, types):
  """Per-sequence quality q = mean_t quality[type_t] (NumPy or JAX)."""
  xp = jnp if isinstance(types, jax.Array) else np
  return xp.mean(xp.asarray(quality)[types], axis=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformEnv(RewardEnv):
  """Bounded: R ~ U[q, q + width], q = mean_t quality[type_t].

  Both optima: all tokens of the highest-quality type.
  """

  quality: tuple[float, ...] = (1.0, 0.7, 0.4, 0.1)
  width: float = 0.5

  def _sample(self, key, types):
    q = _mean_quality(self.quality, types)
    return q + self.width * jax.random.uniform(key, q.shape)

  def _moments(self, types):
    low = _mean_quality(self.quality, types)
    high = low + self.width
    # E[log R] = (1 / w) * integral_a^b log x dx = (b log b - a log a) / w - 1.
    mean_log = (high * np.log(high) - low * np.log(low)) / self.width - 1.0
    return low + self.width / 2, mean_log


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogNormalEnv(RewardEnv):
  """Product of per-token log-normal factors: log R ~ N(sum_t m_t, sum_t s_t^2).

  E[R] = exp(sum m + sum s^2 / 2) and E[log R] = sum m, so with type-dependent s
  the two objectives can prefer different types (Kelly: a high-variance type with
  the larger mean and the smaller median).
  """

  log_mean: tuple[float, ...]
  log_std: tuple[float, ...]

  def _sample(self, key, types):
    noise = jax.random.normal(key, types.shape)
    log_r = jnp.asarray(self.log_mean)[types] + jnp.asarray(self.log_std)[types] * noise
    return jnp.exp(jnp.sum(log_r, axis=-1))

  def _moments(self, types):
    mu = np.sum(np.asarray(self.log_mean)[types], axis=-1)
    var = np.sum(np.square(np.asarray(self.log_std))[types], axis=-1)
    return np.exp(mu + var / 2), mu


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParetoOutlierEnv(RewardEnv):
  """Pareto-tailed rewards with rare lucky outliers that no action controls.

  R = q * P * O: q = mean_t quality[type_t], P ~ Pareto(alpha) on [1, inf), and
  O = outlier_factor with probability outlier_prob (else 1), independent of the
  tokens: a "lucky guess". Both optima: all tokens of the best type.
  E[R] = q alpha / (alpha - 1) (1 - p + p F); E[log R] = log q + 1 / alpha + p log F.
  """

  quality: tuple[float, ...] = (1.0, 0.7, 0.4, 0.1)
  alpha: float = 3.0
  outlier_prob: float = 0.02
  outlier_factor: float = 100.0

  def _sample(self, key, types):
    key_tail, key_luck = jax.random.split(key)
    q = _mean_quality(self.quality, types)
    tail = jax.random.pareto(key_tail, self.alpha, q.shape)
    lucky = jax.random.bernoulli(key_luck, self.outlier_prob, q.shape)
    return q * tail * jnp.where(lucky, self.outlier_factor, 1.0)

  def _moments(self, types):
    q = _mean_quality(self.quality, types)
    p, factor = self.outlier_prob, self.outlier_factor
    mean = q * self.alpha / (self.alpha - 1) * (1 - p + p * factor)
    return mean, np.log(q) + 1 / self.alpha + p * math.log(factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BetaProductEnv(RewardEnv):
  """Multiplicative: R = prod_t X_t, X_t ~ Beta(k mu_t, k (1 - mu_t)).

  A chain of steps that each succeed partially; rewards span four orders of
  magnitude. E[R] = prod mu_t; E[log R] = sum_t psi(k mu_t) - psi(k). Both optima:
  all tokens of the type with the largest mu. k and every k mu must be integers:
  then Beta(a, k - a) is exactly S_a / S_k for the partial sums S of k i.i.d.
  Exp(1) draws, which costs the same for every draw under vmap (the rejection
  sampler behind jax.random.beta loops until the slowest draw is accepted).
  """

  mean: tuple[float, ...] = (0.9, 0.6, 0.3, 0.1)
  concentration: int = 20

  def __post_init__(self):
    super().__post_init__()
    shapes = np.asarray(self.mean) * self.concentration
    if not (
        np.allclose(shapes, np.round(shapes))
        and np.all(np.round(shapes) >= 1)
        and np.all(np.round(shapes) <= self.concentration - 1)
    ):
      raise ValueError(
          f'{self.name}: concentration * mean must be integers in [1, k - 1], got '
          f'{shapes.tolist()}.'
      )

  def _sample(self, key, types):
    shape = jnp.asarray(np.round(np.asarray(self.mean) * self.concentration), jnp.int32)
    partial_sums = jnp.cumsum(
        jax.random.exponential(key, types.shape + (self.concentration,)), axis=-1
    )
    numerator = jnp.take_along_axis(partial_sums, shape[types][..., None] - 1, axis=-1)
    return jnp.prod(numerator[..., 0] / partial_sums[..., -1], axis=-1)

  def _moments(self, types):
    mu = np.asarray(self.mean)[types]
    k = self.concentration
    mean_log = np.sum(special.digamma(k * mu) - special.digamma(k), axis=-1)
    return np.prod(mu, axis=-1), mean_log


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountsEnv(RewardEnv):
  """Tests passed, 0..num_tests, with zeros when the program fails to compile.

  R = 0 with probability 1 - f, else Binomial(num_tests, p), with
  f = prod_t compile_prob[type_t] and p = exp(mean_t log pass_rate[type_t]).
  E[R] = f n p. The geometric objective is E[log(1 + R)] (log R is -inf at 0).
  By design type A maximizes E[R], and a floor or offset on the zeros moves the
  log-reward optimum towards the "safe" type B.
  """

  compile_prob: tuple[float, ...] = (0.85, 0.99, 0.9, 0.9)
  pass_rate: tuple[float, ...] = (0.8, 0.25, 0.1, 0.03)
  num_tests: int = 100

  geo_offset: ClassVar[float] = 1.0

  def _rates(self, types):
    xp = jnp if isinstance(types, jax.Array) else np
    f = xp.prod(xp.asarray(self.compile_prob)[types], axis=-1)
    p = xp.exp(xp.mean(xp.log(xp.asarray(self.pass_rate))[types], axis=-1))
    return f, p

  def _sample(self, key, types):
    key_compile, key_tests = jax.random.split(key)
    f, p = self._rates(types)
    compiled = jax.random.bernoulli(key_compile, f)
    # A sum of Bernoulli draws: exactly Binomial(n, p), at a fixed cost under vmap.
    tests = jax.random.uniform(key_tests, p.shape + (self.num_tests,))
    passed = jnp.sum(tests < p[..., None], axis=-1).astype(jnp.float32)
    return jnp.where(compiled, passed, 0.0)

  def _moments(self, types):
    f, p = self._rates(types)
    k = np.arange(self.num_tests + 1)
    pmf = stats.binom.pmf(k[None, :], self.num_tests, p[:, None])
    return f * self.num_tests * p, f * (pmf @ np.log1p(k))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryEnv(RewardEnv):
  """Binary: R ~ Bernoulli(sigmoid(bias + sum_t logit_weight[type_t])).

  The geometric objective is E[log(1 + R)] = p log 2 (the geometric mean of 0/1
  rewards is 0 for any p < 1), so both optima are all-A.
  """

  bias: float = -1.0
  logit_weight: tuple[float, ...] = (0.75, 0.25, -0.25, -0.75)

  geo_offset: ClassVar[float] = 1.0

  def _success(self, types):
    xp = jnp if isinstance(types, jax.Array) else np
    logit = self.bias + xp.sum(xp.asarray(self.logit_weight)[types], axis=-1)
    return 1 / (1 + xp.exp(-logit))

  def _sample(self, key, types):
    p = self._success(types)
    return jax.random.bernoulli(key, p).astype(jnp.float32)

  def _moments(self, types):
    p = self._success(types)
    return p, p * math.log(2.0)


def study_envs() -> tuple[RewardEnv, ...]:
  """The environments of the study, in report order."""
  return (
      UniformEnv(
          name='uniform',
          summary='bounded U[q, q+0.5], q in [0.1, 1]; both optima AAAA (easy control)',
      ),
      LogNormalEnv(
          name='lognormal',
          log_mean=(0.0, -0.25, -0.5, -1.0),
          log_std=(0.75,) * 4,
          summary='log-normal long tail (log R sd 1.5); both optima AAAA',
      ),
      LogNormalEnv(
          name='kelly',
          log_mean=(0.0, -0.2, -0.6, -1.0),
          log_std=(0.1, 0.8, 0.1, 0.1),
          summary=(
              'log-normal, conflict: B has the larger mean (x1.13/token) and '
              'the smaller median (x0.82/token); E[R] optimum BBBB, '
              'E[log R] optimum AAAA'
          ),
      ),
      ParetoOutlierEnv(
          name='pareto',
          summary=(
              'Pareto(3) tail x rare 100x lucky outliers (p = 0.02, '
              'independent of the tokens); both optima AAAA'
          ),
      ),
      BetaProductEnv(
          name='product',
          summary=('product of 4 Beta step scores, R in ~[1e-5, 1]; both optima ' 'AAAA'),
      ),
      CountsEnv(
          name='counts',
          summary=(
              'tests passed 0..100, zero when not compiling; E[R] optimum AAAA '
              '(f=0.52, 80 tests), safe BBBB compiles (f=0.96) but passes 25'
          ),
      ),
      BinaryEnv(name='binary', summary='Bernoulli(sigmoid(-1 + sum w)); both optima AAAA'),
      UniformEnv(
          name='multiscale',
          context_scales=(0.01, 1.0, 100.0),
          permute_tokens=True,
          mix_contexts=True,
          summary=(
              '3 prompts with rewards x0.01 / x1 / x100 (uniform env), '
              'different best tokens, parameters shared by all prompts'
          ),
      ),
  )
