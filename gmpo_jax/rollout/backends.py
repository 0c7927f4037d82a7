"""The rollout interface: how the runner gets completions and log-probs, whoever generates them.

The learner never calls generation code directly. A backend implements `RolloutBackend`:
`generate` samples completions for a batch of prompts, `logprobs` scores token sequences under
the backend's current parameters (the "old" policy π_old of the GRPO / GMPO ratio), and
`update_params` pushes new parameters after a learner step. `JaxRollout` runs
`gmpo_jax.rollout.sampling` in-process; `MockRollout` is a uniform-random policy for tests.

Layout shared by every backend: a `Rollout` holds the whole sequence, T = P + N columns (the
prompt left-aligned, then the completion), and every per-token array is aligned with it, as
`gmpo_jax.models.logprobs.sequence_logprobs` returns them, so `completion_mask` is the loss mask.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models.logprobs import DEFAULT_CHUNK_SIZE, positions_from_mask, split_model_logprobs
from gmpo_jax.rollout import sampling
from gmpo_jax.rollout.sampling import SampleOutput, SamplingConfig


class Rollout(NamedTuple):
  """A batch of B sampled sequences of T = P + N tokens.

  Attributes:
    tokens: [B, T] int32, the left-aligned prompt then the completion (pad after its end).
    positions: [B, T] int32 RoPE positions, `positions_from_mask(key_mask)`.
    key_mask: [B, T] bool, True on real tokens (prompt and completion).
    completion_mask: [B, T] bool, True on completion tokens up to and including the stop token.
    logprobs: [B, T] float32, the sampler's log-probs of completion tokens under the
      distribution it sampled from (after temperature, top-k, top-p); 0 elsewhere.
    policy_logprobs: [B, T] float32, log-probs of completion tokens under the untruncated
      temperature-scaled policy (what `RolloutBackend.logprobs` and the learner compute);
      0 elsewhere.
    lengths: [B] int32, completion lengths.
    finished: [B] bool, the completion ended with a stop token (False: truncated).
  """

  tokens: jax.Array
  positions: jax.Array
  key_mask: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  policy_logprobs: jax.Array
  lengths: jax.Array
  finished: jax.Array


@runtime_checkable
class RolloutBackend(Protocol):
  """What the runner needs from a generator (docs/CONTRACTS.md)."""

  def generate(self, prompt_tokens: Any, prompt_mask: Any, key: jax.Array) -> Rollout:
    """Samples one completion per prompt row ([B, P] ids, [B, P] bool mask, any padding)."""
    ...

  def logprobs(self, tokens: jax.Array, key_mask: jax.Array) -> jax.Array:
    """[B, T] per-token log-probs under the current parameters, aligned like `Rollout`."""
    ...

  def update_params(self, state: Any) -> None:
    """Replaces the parameters used by `generate` and `logprobs`."""
    ...


@jax.jit
def rollout_from_samples(out: SampleOutput) -> Rollout:
  """Turns `sampling.generate`'s output into the full-sequence `Rollout` layout (one program).

  Args:
    out: `SampleOutput` with tokens [B, P + N], prompt_mask [B, P], completion arrays [B, N].

  Returns:
    `Rollout` whose per-token arrays are [B, P + N], zero (False) on the prompt columns.
  """
  prompt_width = out.prompt_mask.shape[1]

  def on_completion(x):
    return jnp.pad(x, ((0, 0), (prompt_width, 0)))

  key_mask = jnp.concatenate([out.prompt_mask, out.completion_mask], axis=1)
  return Rollout(
      tokens=out.tokens,
      positions=positions_from_mask(key_mask),
      key_mask=key_mask,
      completion_mask=on_completion(out.completion_mask),
      logprobs=on_completion(out.logprobs),
      policy_logprobs=on_completion(out.policy_logprobs),
      lengths=out.lengths,
      finished=out.finished,
  )


_policy_logprobs = jax.jit(
    split_model_logprobs, static_argnames=('graphdef', 'chunk_size', 'temperature')
)


class JaxRollout:
  """In-process rollouts with `gmpo_jax.rollout.sampling.generate` on a `Transformer`.

  `logprobs` scores under softmax(z / τ) with the sampling temperature τ (1 for greedy), so
  for the backend's own samples it reproduces `Rollout.policy_logprobs`.
  """

  def __init__(
      self, model: nnx.Module, *, config: SamplingConfig, chunk_size: int = DEFAULT_CHUNK_SIZE
  ):
    self._graphdef, self._state = nnx.split(model)
    self.config = config
    self.chunk_size = chunk_size

  def generate(self, prompt_tokens: Any, prompt_mask: Any, key: jax.Array) -> Rollout:
    out = sampling.generate(
        (self._graphdef, self._state), prompt_tokens, prompt_mask, key, config=self.config
    )
    return rollout_from_samples(out)

  def logprobs(self, tokens: jax.Array, key_mask: jax.Array) -> jax.Array:
    return _policy_logprobs(
        self._graphdef,
        self._state,
        tokens,
        key_mask,
        chunk_size=self.chunk_size,
        temperature=self.config.logit_temperature,
    )

  def update_params(self, state: nnx.State) -> None:
    """Takes the learner's `nnx.state(model)` (same structure, shapes and dtypes)."""
    try:
      chex.assert_trees_all_equal_shapes_and_dtypes(state, self._state)
    except AssertionError as err:
      raise ValueError(f'update_params got a state that does not match the model: {err}') from err
    self._state = state


class MockRollout:
  """A uniform-random policy over V tokens: every token has log-prob −log V.

  Deterministic for a given key (host-side NumPy generator seeded from the key's data), and
  consistent: `logprobs` returns −log V exactly where `generate` would report it. Records
  the states pushed with `update_params`, so runner tests can check the push.
  """

  def __init__(
      self, *, vocab_size: int, max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0
  ):
    if vocab_size <= 0 or max_new_tokens <= 0:
      raise ValueError(
          f'vocab_size and max_new_tokens must be positive, got ' f'{vocab_size}, {max_new_tokens}'
      )
    self.vocab_size = vocab_size
    self.max_new_tokens = max_new_tokens
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.updates: list[Any] = []

  def generate(self, prompt_tokens: Any, prompt_mask: Any, key: jax.Array) -> Rollout:
    prompt_tokens, prompt_mask = sampling.left_align(
        np.asarray(prompt_tokens), np.asarray(prompt_mask), pad_id=self.pad_id
    )
    batch = prompt_tokens.shape[0]
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    tokens = rng.integers(0, self.vocab_size, (batch, self.max_new_tokens), dtype=np.int32)
    stop = tokens == self.eos_id if self.eos_id is not None else np.zeros(tokens.shape, bool)
    # A token is in the completion when no stop token came strictly before it.
    mask = np.cumsum(stop, axis=1) - stop == 0
    logp = np.where(mask, -math.log(self.vocab_size), 0.0).astype(np.float32)
    out = SampleOutput(
        tokens=jnp.asarray(
            np.concatenate([prompt_tokens, np.where(mask, tokens, self.pad_id)], axis=1)
        ),
        prompt_mask=jnp.asarray(prompt_mask),
        completion_tokens=jnp.asarray(np.where(mask, tokens, self.pad_id)),
        completion_mask=jnp.asarray(mask),
        logprobs=jnp.asarray(logp),
        policy_logprobs=jnp.asarray(logp),
        lengths=jnp.asarray(mask.sum(axis=1, dtype=np.int32)),
        finished=jnp.asarray(stop.any(axis=1)),
    )
    return rollout_from_samples(out)

  def logprobs(self, tokens: jax.Array, key_mask: jax.Array) -> jax.Array:
    chex.assert_equal_shape([tokens, key_mask])
    has_context = jnp.pad(key_mask[:, 1:] & key_mask[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(has_context, -math.log(self.vocab_size), 0.0).astype(jnp.float32)

  def update_params(self, state: Any) -> None:
    self.updates.append(state)


def _jax_backend(model: nnx.Module, *, config: SamplingConfig, chunk_size: int) -> JaxRollout:
  return JaxRollout(model, config=config, chunk_size=chunk_size)


def _mock_backend(model: nnx.Module, *, config: SamplingConfig, chunk_size: int) -> MockRollout:
  del chunk_size  # nothing is computed with the model
  return MockRollout(
      vocab_size=model.config.vocab_size,
      max_new_tokens=config.max_new_tokens,
      eos_id=config.eos_id,
      pad_id=config.pad_id,
  )


# name -> factory(policy, *, config, chunk_size) -> RolloutBackend, for `config.rollout.backend`.
# An external engine registers here (docs/rollout_backends.md).
ROLLOUT_BACKENDS = {'jax': _jax_backend, 'mock': _mock_backend}


def make_backend(
    name: str, model: nnx.Module, *, config: SamplingConfig, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> RolloutBackend:
  """The backend `name` of `ROLLOUT_BACKENDS` for the policy `model`.

  Args:
    name: 'jax' (the in-process KV-cache sampler, `JaxRollout`) or 'mock' (`MockRollout`, a
      uniform-random policy that exercises the learner without sampling).
    model: the policy at its current parameters.
    config: the decoding settings.
    chunk_size: sequence chunk of the backend's log-prob computation.
  """
  if name not in ROLLOUT_BACKENDS:
    raise ValueError(
        f'unknown rollout backend {name!r}; expected one of {sorted(ROLLOUT_BACKENDS)}'
    )
  return ROLLOUT_BACKENDS[name](model, config=config, chunk_size=chunk_size)
