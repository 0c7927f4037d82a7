"""Batched autoregressive sampling with a KV cache, compiled once per shape bucket.

One concept: the compiled sampler (bucketing, prefill, the decode loop and the choice of each
token), hence its length.

`generate` left-aligns the prompts (any padding pattern), pads batch and prompt length up to
buckets so that calls with nearby shapes reuse one compiled program, prefills the KV cache
with the whole prompt in one forward pass, then decodes one token per step inside a
`lax.while_loop` that stops once every row has emitted a stop token, testing that every
`steps_per_check` steps (see `default_steps_per_check`); a step attends to the cache's live
slots rounded up to the next `cache_read_bucket` (see `read_windows`). Temperature,
top-k, top-p, the stop tokens and the pad id are traced values: changing them (greedy
evaluation between sampled training rollouts, say) reuses the compiled program; only the
shapes (batch bucket, prompt bucket, max_new_tokens), the KV-cache dtype, steps_per_check,
cache_read_bucket and the model structure select a program.

Log-probabilities. Logits come from `gmpo_jax.models.logprobs.project_logits`, the same function the
learner's `token_logprobs` uses, and every choice is made in float32. For each generated token
two log-probabilities are returned:
  * `logprobs`: under the distribution actually sampled from: softmax(z / τ) restricted to
    the top-k, then to the top-p nucleus, renormalized;
  * `policy_logprobs`: under the untruncated softmax(z / τ), which is what
    `sequence_logprobs(..., temperature=τ)` computes for the learner. The two are equal when
    top-k and top-p are off.
Greedy decoding (temperature 0) picks argmax z and reports both log-probabilities at τ = 1
(the τ → 0 limit is a point mass, which carries no information).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models.logprobs import positions_from_mask, project_logits
from gmpo_jax.models.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding hyperparameters (frozen; validated on construction).

  Attributes:
    max_new_tokens: N, the completion width; generation stops earlier when all rows stopped.
    temperature: τ ≥ 0; 0 means greedy (argmax).
    top_k: keep the k largest logits (ties with the k-th are kept too); None = off.
    top_p: nucleus: keep the smallest set of highest-probability tokens whose mass reaches
      top_p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
      arXiv 1904.09751); 1.0 = off.
    eos_id: end-of-sequence id; None = none.
    stop_ids: further ids that end a completion (they are kept in it, like EOS).
    pad_id: written after a completion's end and in prompt padding.
    batch_multiple: the batch is padded up to a multiple of this.
    min_prompt_bucket: prompt lengths are padded up to the next power of two, at least this.
    cache_dtype: KV-cache storage dtype; None = `transformer.default_cache_dtype` (the
      model's compute dtype on the CPU, bfloat16 for a float32 model on GPU/TPU).
    steps_per_check: k, decode steps run between two tests of "every row has stopped";
      None = `default_steps_per_check()` (by backend). The outputs do not depend on k; a
      larger k trades up to k − 1 wasted steps after the last row stops for fewer host
      round trips (GPU).
    cache_read_bucket: w, the step of the decode loop's cache window: decode steps run in
      phases, phase j attending to the first min(P + j·w, P + N) cache slots only, so a step
      reads about the live part of the cache (w / 2 slots more on average) rather than all
      P + N. Each phase is a compiled copy of the decode step (ceil(N / w) of them); None or
      w ≥ N: one phase reading all slots. The outputs do not depend on w.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  eos_id: int | None = None
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  batch_multiple: int = 8
  min_prompt_bucket: int = 16
  cache_dtype: Any = None
  steps_per_check: int | None = None
  cache_read_bucket: int | None = 512

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
      raise ValueError(f'max_new_tokens must be a positive int, got {self.max_new_tokens!r}')
    if not self.temperature >= 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature!r}')
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
      raise ValueError(f'top_k must be a positive int or None, got {self.top_k!r}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must lie in (0, 1], got {self.top_p!r}')
    object.__setattr__(self, 'stop_ids', tuple(int(i) for i in self.stop_ids))
    for name in ('batch_multiple', 'min_prompt_bucket'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f'{name} must be a positive int, got {getattr(self, name)!r}')
    for name in ('steps_per_check', 'cache_read_bucket'):
      value = getattr(self, name)
      if value is not None and (
          isinstance(value, bool) or not isinstance(value, int) or value <= 0
      ):
        raise ValueError(f'{name} must be a positive int or None, got {value!r}')
    if self.cache_dtype is not None:
      object.__setattr__(self, 'cache_dtype', jnp.dtype(self.cache_dtype))

  @property
  def all_stop_ids(self) -> tuple[int, ...]:
    """EOS and the extra stop ids, sorted."""
    eos = () if self.eos_id is None else (self.eos_id,)
    return tuple(sorted(set(self.stop_ids) | set(eos)))

  @property
  def logit_temperature(self) -> float:
    """The τ that scales the logits: the sampling temperature, or 1 for greedy decoding."""
    return self.temperature if self.temperature > 0 else 1.0


def default_steps_per_check(backend: str | None = None) -> int:
  """Decode steps between two tests of "all rows stopped" when none is asked for: 8 on GPUs.

  XLA:GPU runs a `while_loop` whose trip count it cannot infer by evaluating the condition
  on the device, copying the predicate to the host and blocking until the stream drains,
  once per iteration (`WhileThunk::ExecuteOnStream`, openxla/xla
  xla/backends/gpu/runtime/while_thunk.cc). Each decode step then pays a round trip, and the
  next step's kernels cannot be queued while the current one runs. An inner loop of k
  steps has a static trip count, which that thunk runs without the host copy, so the round
  trips drop from N to about N / k, for at most k − 1 extra steps after the last row stops
  (8: < 1.4 % of a 512-token rollout). The GPU default of 8 follows from this argument and is
  not measured yet. On the CPU the loop condition is host code anyway, and k = 4 or 8 showed
  no consistent gain over the shared machine's noise (BENCHMARKS.md, "Decode loop: steps per
  finish check"), while short completions would pay for the late stop. A TPU runs control
  flow on the chip, so it should save nothing either (not measured).

  Args:
    backend: `jax.default_backend()` when None.

  Returns:
    8 on 'gpu' / 'cuda' / 'rocm', else 1.
  """
  backend = jax.default_backend() if backend is None else backend
  return 8 if backend in ('gpu', 'cuda', 'rocm') else 1


class SampleOutput(NamedTuple):
  """What `generate` returns; B prompts, P prompt width (as given), N = max_new_tokens.

  Attributes:
    tokens: [B, P + N] int32: the prompt left-aligned (padding moved to the front), then the
      completion; pad_id after each completion's end.
    prompt_mask: [B, P] bool, True on the prompt's real tokens (left-padded layout).
    completion_tokens: [B, N] int32 (= tokens[:, P:]).
    completion_mask: [B, N] bool, True on generated tokens up to and including the first stop
      token (or all N when none was produced).
    logprobs: [B, N] float32, log-prob under the truncated distribution sampled from (module
      docstring); 0 where completion_mask is False.
    policy_logprobs: [B, N] float32, log-prob under the untruncated softmax(z / τ); 0 where
      completion_mask is False.
    lengths: [B] int32, completion_mask.sum(1).
    finished: [B] bool, the completion ended with a stop token (False: truncated at N).
  """

  tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  policy_logprobs: jax.Array
  lengths: jax.Array
  finished: jax.Array


def filter_logits(
    logits: jax.Array, *, top_k: jax.Array | int | None, top_p: jax.Array | float
) -> jax.Array:
  """Top-k then top-p (nucleus) truncation: excluded logits become −inf.

  Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv 1904.09751:
  with p sorted in decreasing order, keep token j when Σ_{i<j} p_i < top_p (so the most likely
  token is always kept). Top-p is applied to the distribution renormalized after top-k,
  as in Hugging Face `generate`. Tokens tied with the last kept value are kept too.
  Both hyperparameters may be traced: one program serves every setting, and the sort only
  runs (under `lax.cond`) when a truncation is on.

  Args:
    logits: [B, V] float32 (already divided by the temperature).
    top_k: int32 scalar; keep the k largest; None or 0 = off (k ≥ V keeps everything).
    top_p: float32 scalar in (0, 1]; 1 = off.

  Returns:
    [B, V] float32, at least one finite entry per row.
  """
  chex.assert_rank(logits, 2)
  chex.assert_type(logits, jnp.float32)
  vocab = logits.shape[-1]
  top_k = jnp.asarray(0 if top_k is None else top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def truncate(z):
    sorted_desc = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth_largest = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1)
    sorted_desc = jnp.where(sorted_desc >= kth_largest, sorted_desc, -jnp.inf)
    sorted_probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # top_p = 1 must keep all k even where float32 mass_before rounds up to 1.
    num_kept = jnp.where(top_p < 1.0, jnp.sum(mass_before < top_p, axis=-1, keepdims=True), k)
    threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    return jnp.where(z >= threshold, z, -jnp.inf)

  active = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)
  return jax.lax.cond(active, truncate, lambda z: z, logits)


class _Knobs(NamedTuple):
  """The traced part of a `SamplingConfig` (changing it does not recompile)."""

  inverse_temperature: jax.Array  # f32: 1/τ, or 1 for greedy
  greedy: jax.Array  # bool
  top_k: jax.Array  # int32, 0 = off
  top_p: jax.Array  # f32
  is_stop: jax.Array  # [V] bool
  pad_id: jax.Array  # int32


def _choose(hidden: jax.Array, unembed: jax.Array, row_keys: jax.Array, knobs: _Knobs):
  """One token per row from hidden [B, D]: (token, logp, policy_logp)."""
  # Same arithmetic as `project_logits(..., temperature=τ)` (the learner's path): both multiply
  # float32 logits by the float32 rounding of 1/τ.
  logits = project_logits(hidden, unembed) * knobs.inverse_temperature
  policy_log_probs = jax.nn.log_softmax(logits, axis=-1)
  filtered = filter_logits(logits, top_k=knobs.top_k, top_p=knobs.top_p)
  sampled = jax.vmap(jax.random.categorical)(row_keys, filtered)
  token = jnp.where(knobs.greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
  sampled_log_probs = jax.nn.log_softmax(filtered, axis=-1)

  def at_token(x):
    return jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]

  return token, at_token(sampled_log_probs), at_token(policy_log_probs)


class _DecodeState(NamedTuple):
  step: jax.Array  # int32: next completion column to write
  cache: Any  # KVCache
  done: jax.Array  # [B] bool
  tokens: jax.Array  # [B, N] int32
  mask: jax.Array  # [B, N] bool
  logprobs: jax.Array  # [B, N] f32
  policy_logprobs: jax.Array


def read_windows(prompt_len: int, max_new_tokens: int, bucket: int | None) -> tuple[int, ...]:
  """The cache slots each decode phase attends to: P + w, P + 2w, …, then P + N.

  Args:
    prompt_len: P, the prompt bucket.
    max_new_tokens: N.
    bucket: w (`SamplingConfig.cache_read_bucket`); None: one window of P + N.

  Returns:
    The increasing windows, the last P + N.
  """
  total = prompt_len + max_new_tokens
  if bucket is None:
    return (total,)
  return tuple(range(prompt_len + bucket, total, bucket)) + (total,)


@functools.partial(
    jax.jit,
    static_argnames=(
        'graphdef',
        'max_new_tokens',
        'cache_dtype',
        'steps_per_check',
        'cache_read_bucket',
    ),
)
def _generate_bucketed(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    key,
    knobs,
    *,
    max_new_tokens,
    cache_dtype,
    steps_per_check,
    cache_read_bucket,
):
  """The compiled program: left-aligned, bucketed [B, P] prompts -> bucketed outputs."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_tokens.shape
  unembed = model.unembed_matrix()
  # Each row's stream depends only on (key, row): a prompt gets the same sample whatever
  # batch bucket it lands in.
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))

  positions = positions_from_mask(prompt_mask)
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens, cache_dtype)
  hidden, cache = model(
      prompt_tokens, positions, key_mask=prompt_mask, cache=cache, read_slots=prompt_len
  )
  # Prompts are left-aligned, so the last column is every row's last real token.
  first_position = positions[:, -1] + 1

  def record(s: _DecodeState, hidden_last: jax.Array) -> _DecodeState:
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, s.step)
    token, logp, policy_logp = _choose(hidden_last, unembed, step_keys, knobs)
    active = ~s.done
    token = jnp.where(active, token, knobs.pad_id)

    def put(buffer, column):
      return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], s.step, axis=1)

    return s._replace(
        step=s.step + 1,
        done=s.done | (active & knobs.is_stop[token]),
        tokens=put(s.tokens, token),
        mask=put(s.mask, active),
        logprobs=put(s.logprobs, jnp.where(active, logp, 0.0)),
        policy_logprobs=put(s.policy_logprobs, jnp.where(active, policy_logp, 0.0)),
    )

  def decode_step(s: _DecodeState, window: int) -> _DecodeState:
    last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)
    hidden, cache = model(
        last,
        (first_position + s.step - 1)[:, None],
        key_mask=~s.done[:, None],
        cache=s.cache,
        read_slots=window,
    )
    return record(s._replace(cache=cache), hidden[:, 0])

  def decode_loop(s: _DecodeState, width: int, window: int) -> _DecodeState:
    """Runs `width` steps at a time while they fit in N columns and in the first `window`
    cache slots, and some row is running."""

    def cond(s):
      # Decode step `step` writes cache slot P + step − 1; the iteration's last one must fit.
      last_step = s.step + width - 1
      return (last_step < max_new_tokens) & (prompt_len + last_step <= window) & ~jnp.all(s.done)

    def body(s):
      if width == 1:
        return decode_step(s, window)
      # A static trip count: XLA:GPU runs it without a host round trip per step.
      return jax.lax.fori_loop(0, width, lambda _, s: decode_step(s, window), s)

    return jax.lax.while_loop(cond, body, s)

  init = _DecodeState(
      step=jnp.zeros((), jnp.int32),
      cache=cache,
      done=jnp.zeros((batch,), bool),
      tokens=jnp.zeros((batch, max_new_tokens), jnp.int32) + knobs.pad_id,
      mask=jnp.zeros((batch, max_new_tokens), bool),
      logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
      policy_logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
  )
  # Column 0 comes from the prefill; the N − 1 decode steps run k at a time, window after
  # window (steps that do not fill an iteration of k in a window run in the next one), then
  # the last (N − 1) mod k in one more iteration, so no step writes past column N − 1. A row
  # that stopped within an iteration writes pad / False for the rest of it, as with k = 1.
  final = record(init, hidden[:, -1])
  windows = read_windows(prompt_len, max_new_tokens, cache_read_bucket)
  for window in windows:
    final = decode_loop(final, steps_per_check, window)
  if (max_new_tokens - 1) % steps_per_check:
    final = decode_loop(final, (max_new_tokens - 1) % steps_per_check, windows[-1])
  out = SampleOutput(
      tokens=jnp.concatenate([prompt_tokens, final.tokens], axis=1),
      prompt_mask=prompt_mask,
      completion_tokens=final.tokens,
      completion_mask=final.mask,
      logprobs=final.logprobs,
      policy_logprobs=final.policy_logprobs,
      lengths=jnp.sum(final.mask, axis=1, dtype=jnp.int32),
      finished=final.done,
  )
  # Under the runner's mesh the model splits the batch over the data axes; the host reads every
  # row of the result, so it comes back replicated (addressable on every process).
  if not jax.sharding.get_abstract_mesh().empty:
    out = jax.lax.with_sharding_constraint(out, jax.P())
  return out


def prompt_bucket(length: int, *, minimum: int) -> int:
  """The padded prompt width: the next power of two ≥ length, at least `minimum`."""
  return max(minimum, 1 << max(length - 1, 0).bit_length())


def left_align(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, *, pad_id: int):
  """Moves every row's real tokens to the end, in order (left padding); host-side NumPy.

  Args:
    prompt_tokens: [B, P] int token ids.
    prompt_mask: [B, P] bool, True on real tokens (any padding pattern).
    pad_id: written at padding positions.

  Returns:
    (tokens [B, P] int32, mask [B, P] bool), left-padded.
  """
  order = np.argsort(prompt_mask, axis=1, kind='stable')  # False first, real tokens in order
  mask = np.take_along_axis(prompt_mask, order, axis=1)
  tokens = np.where(mask, np.take_along_axis(prompt_tokens, order, axis=1), pad_id)
  return tokens.astype(np.int32), mask


def generate(
    model_or_graphdef_state: nnx.Module | tuple[nnx.GraphDef, nnx.State],
    prompt_tokens: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    key: jax.Array,
    *,
    config: SamplingConfig,
) -> SampleOutput:
  """Samples o ~ π_θ(· | prompt) autoregressively: o_t ~ filter(softmax(z_t / τ)).

  The policy of GRPO / GMPO rollouts (Shao et al. 2024, arXiv 2402.03300; Zhao et al. 2025,
  "Geometric-Mean Policy Optimization", arXiv 2507.20673). Host-level entry point (not
  traceable): it reads the prompt mask to validate and bucket the shapes, then calls one
  compiled program per (batch bucket, prompt bucket, max_new_tokens, cache dtype,
  steps_per_check, cache_read_bucket, model structure).

  Args:
    model_or_graphdef_state: a `Transformer`, or its `nnx.split` (graphdef, state).
    prompt_tokens: [B, P] integer ids in [0, V) (values at padding are ignored).
    prompt_mask: [B, P] bool, True on real tokens; left, right or any padding.
    key: PRNG key; the output is a deterministic function of (key, prompts, params, config).
    config: `SamplingConfig`.

  Returns:
    `SampleOutput` (see its docstring for the layout and which log-probabilities).

  Raises:
    ValueError: a row with no real token (naming the rows), a prompt, stop or pad id
      outside [0, V), or shapes that do not match.
  """
  if isinstance(model_or_graphdef_state, nnx.Module):
    graphdef, state = nnx.split(model_or_graphdef_state)
  else:
    graphdef, state = model_or_graphdef_state
  model_config = nnx.merge(graphdef, state).config
  prompt_tokens = np.asarray(prompt_tokens)
  prompt_mask = np.asarray(prompt_mask)
  chex.assert_rank([prompt_tokens, prompt_mask], 2)
  chex.assert_equal_shape([prompt_tokens, prompt_mask])
  chex.assert_type([prompt_tokens, prompt_mask], [int, bool])
  empty = np.flatnonzero(~prompt_mask.any(axis=1))
  if empty.size:
    raise ValueError(f'prompt rows {empty.tolist()} have no real token (prompt_mask all False)')
  vocab = model_config.vocab_size
  real = prompt_tokens[prompt_mask]
  if real.min() < 0 or real.max() >= vocab:
    raise ValueError(
        f'prompt token ids must lie in [0, {vocab}), got min {real.min()} ' f'max {real.max()}'
    )
  special = config.all_stop_ids + (config.pad_id,)
  if min(special) < 0 or max(special) >= vocab:
    raise ValueError(f'eos_id, stop_ids and pad_id must lie in [0, {vocab}), got {special}')

  batch, prompt_len = prompt_tokens.shape
  tokens, mask = left_align(prompt_tokens, prompt_mask, pad_id=config.pad_id)
  batch_padded = -(-batch // config.batch_multiple) * config.batch_multiple
  width = prompt_bucket(prompt_len, minimum=config.min_prompt_bucket)
  bucket_tokens = np.full((batch_padded, width), config.pad_id, np.int32)
  bucket_mask = np.zeros((batch_padded, width), bool)
  bucket_tokens[:batch, width - prompt_len :] = tokens
  bucket_mask[:batch, width - prompt_len :] = mask
  # Filler rows get one real (pad) token so that no row starts with nothing to attend to.
  bucket_mask[batch:, -1] = True

  is_stop = np.zeros(vocab, bool)
  is_stop[list(config.all_stop_ids)] = True
  knobs = _Knobs(
      # np.float32(1/τ) is the constant `project_logits(temperature=τ)` multiplies by.
      inverse_temperature=np.float32(1.0 / config.logit_temperature),
      greedy=np.bool_(config.temperature == 0),
      top_k=np.int32(config.top_k or 0),
      top_p=np.float32(config.top_p),
      is_stop=is_stop,
      pad_id=np.int32(config.pad_id),
  )
  out = _generate_bucketed(
      graphdef,
      state,
      bucket_tokens,
      bucket_mask,
      key,
      knobs,
      max_new_tokens=config.max_new_tokens,
      cache_dtype=config.cache_dtype,
      steps_per_check=config.steps_per_check or default_steps_per_check(),
      cache_read_bucket=config.cache_read_bucket,
  )
  return _unbucket(out, batch=batch, prompt_len=prompt_len)


@functools.partial(jax.jit, static_argnames=('batch', 'prompt_len'))
def _unbucket(out: SampleOutput, *, batch: int, prompt_len: int) -> SampleOutput:
  """The request's rows and prompt columns of the bucketed outputs, in one program (sliced
  eagerly, each array's slice is a program of its own, compiled and kept resident)."""
  columns = slice(out.prompt_mask.shape[1] - prompt_len, None)
  return SampleOutput(
      tokens=out.tokens[:batch, columns],
      prompt_mask=out.prompt_mask[:batch, columns],
      completion_tokens=out.completion_tokens[:batch],
      completion_mask=out.completion_mask[:batch],
      logprobs=out.logprobs[:batch],
      policy_logprobs=out.policy_logprobs[:batch],
      lengths=out.lengths[:batch],
      finished=out.finished[:batch],
  )
