"""Tests for gmpo_jax.rollout.sampling and gmpo_jax.rollout.backends on the real Transformer: cached decoding
against full recomputation, padding and batch invariance, determinism, truncation, stop tokens,
log-probs against a full forward, the sampled distribution, and compile counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from model_fixtures import CONTEXT_CONFIG as _CONFIG
from model_fixtures import context_model as _model
from model_fixtures import full_logits as _full_logits

from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.rollout import sampling
from gmpo_jax.rollout.backends import JaxRollout, MockRollout, RolloutBackend

TOL = dict(rtol=1e-5, atol=1e-5)
N = 6
GREEDY = sampling.SamplingConfig(max_new_tokens=N, temperature=0.0)
SAMPLE = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0)
# Prompts of lengths 3, 5, 1 and 4 in a width-5 array; `_prompts` pads them left or right.
_PROMPTS = [[7, 3, 41], [12, 5, 5, 30, 2], [9], [44, 18, 1, 27]]


def _prompts(side='right'):
  tokens = np.zeros((len(_PROMPTS), 5), np.int32)
  mask = np.zeros((len(_PROMPTS), 5), bool)
  for b, p in enumerate(_PROMPTS):
    cols = slice(0, len(p)) if side == 'right' else slice(5 - len(p), 5)
    tokens[b, cols], mask[b, cols] = p, True
  # Garbage under the padding must not matter.
  tokens[~mask] = 13
  return tokens, mask


def _reference_greedy(model, num_steps):
  """Greedy decoding by a full forward over the whole prefix at every step (no cache).

  Each row is [prompt, generated so far] followed by padding; the forward keeps a fixed
  width, so causal attention makes the padding after the prefix irrelevant.
  """
  width = 5 + num_steps
  seqs = [list(p) for p in _PROMPTS]
  logps = np.zeros((len(seqs), num_steps))
  for step in range(num_steps):
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for b, s in enumerate(seqs):
      tokens[b, : len(s)], mask[b, : len(s)] = s, True
    logits = np.asarray(_full_logits(model, tokens, mask), np.float64)
    for b, s in enumerate(seqs):
      z = logits[b, len(s) - 1]
      log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
      logps[b, step] = log_p.max()
      s.append(int(np.argmax(z)))
  return np.array([s[-num_steps:] for s in seqs]), logps


class TestGreedy:

  def test_cached_decode_equals_full_recompute(self):
    model = _model()
    out = sampling.generate(model, *_prompts('right'), jax.random.key(0), config=GREEDY)
    want_tokens, want_logp = _reference_greedy(model, N)
    np.testing.assert_array_equal(out.completion_tokens, want_tokens)
    np.testing.assert_allclose(out.logprobs, want_logp, **TOL)
    np.testing.assert_allclose(out.policy_logprobs, want_logp, **TOL)
    assert np.all(out.completion_mask) and np.all(out.lengths == N) and not np.any(out.finished)
    # The completions are not all one repeated token (the test would be weak otherwise).
    assert len(np.unique(want_tokens)) > N

  def test_each_row_alone_equals_the_batch(self):
    model = _model()
    tokens, mask = _prompts('right')
    batched = sampling.generate(model, tokens, mask, jax.random.key(0), config=GREEDY)
    for b in range(len(_PROMPTS)):
      alone = sampling.generate(
          model, tokens[b : b + 1], mask[b : b + 1], jax.random.key(0), config=GREEDY
      )
      np.testing.assert_array_equal(alone.completion_tokens[0], batched.completion_tokens[b])
      np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[b], **TOL)

  def test_top_k_one_equals_greedy(self):
    model = _model()
    greedy = sampling.generate(model, *_prompts(), jax.random.key(0), config=GREEDY)
    top1 = sampling.generate(
        model, *_prompts(), jax.random.key(5), config=dataclasses.replace(SAMPLE, top_k=1)
    )
    np.testing.assert_array_equal(top1.completion_tokens, greedy.completion_tokens)
    # A one-token support is a point mass; under the full policy it is the greedy log-prob.
    np.testing.assert_array_equal(top1.logprobs, 0.0)
    np.testing.assert_allclose(top1.policy_logprobs, greedy.logprobs, **TOL)


class TestLayoutAndDeterminism:

  def test_left_and_right_padding_give_identical_outputs(self):
    model = _model()
    right = sampling.generate(model, *_prompts('right'), jax.random.key(3), config=SAMPLE)
    left = sampling.generate(model, *_prompts('left'), jax.random.key(3), config=SAMPLE)
    jax.tree.map(np.testing.assert_array_equal, left, right)
    # The returned prompt is left-aligned with its padding set to pad_id.
    np.testing.assert_array_equal(
        left.tokens[:, :5], np.where(_prompts('left')[1], _prompts('left')[0], 0)
    )
    np.testing.assert_array_equal(left.tokens[:, 5:], left.completion_tokens)

  def test_same_key_same_output_different_key_different_output(self):
    model = _model()
    first = sampling.generate(model, *_prompts(), jax.random.key(1), config=SAMPLE)
    again = sampling.generate(model, *_prompts(), jax.random.key(1), config=SAMPLE)
    other = sampling.generate(model, *_prompts(), jax.random.key(2), config=SAMPLE)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert np.mean(np.asarray(first.completion_tokens) != np.asarray(other.completion_tokens)) > 0.5


class TestStopTokens:

  def test_eos_and_stop_ids_end_and_mask_completions(self):
    model = _model()
    tokens, mask = _prompts()
    free = np.asarray(
        sampling.generate(model, tokens, mask, jax.random.key(0), config=GREEDY).completion_tokens
    )
    eos, stop = int(free[0, 2]), int(free[1, 1])
    config = dataclasses.replace(GREEDY, eos_id=eos, stop_ids=(stop,), pad_id=49)
    out = sampling.generate(model, tokens, mask, jax.random.key(0), config=config)
    for b in range(len(_PROMPTS)):
      hits = np.flatnonzero(np.isin(free[b], [eos, stop]))
      length = hits[0] + 1 if hits.size else N
      assert out.lengths[b] == length and bool(out.finished[b]) == bool(hits.size)
      np.testing.assert_array_equal(out.completion_mask[b], np.arange(N) < length)
      np.testing.assert_array_equal(out.completion_tokens[b, :length], free[b, :length])
      np.testing.assert_array_equal(out.completion_tokens[b, length:], 49)
      np.testing.assert_array_equal(out.logprobs[b, length:], 0.0)
    assert out.lengths[0] <= 3 and out.lengths[1] <= 2


class TestLogprobs:

  def test_sampler_logprobs_equal_full_forward_log_softmax(self):
    model = _model()
    rollout = JaxRollout(model, config=SAMPLE, chunk_size=4)
    out = rollout.generate(*_prompts(), jax.random.key(4))
    assert isinstance(rollout, RolloutBackend)
    logits = np.asarray(_full_logits(model, out.tokens, out.key_mask), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    want = np.zeros(out.tokens.shape)
    want[:, 1:] = np.take_along_axis(log_p[:, :-1], np.asarray(out.tokens)[:, 1:, None], -1)[..., 0]
    want = np.where(out.completion_mask, want, 0.0)
    np.testing.assert_allclose(out.logprobs, want, **TOL)
    np.testing.assert_allclose(out.policy_logprobs, want, **TOL)
    learner = rollout.logprobs(out.tokens, out.key_mask)
    np.testing.assert_allclose(np.where(out.completion_mask, learner, 0.0), want, **TOL)
    np.testing.assert_array_equal(out.positions, positions_from_mask(out.key_mask))

  def test_truncated_sampling_reports_both_distributions(self):
    model = _model()
    config = dataclasses.replace(SAMPLE, temperature=0.7, top_k=12, top_p=0.8)
    rollout = JaxRollout(model, config=config, chunk_size=4)
    out = rollout.generate(*_prompts(), jax.random.key(6))
    scaled = np.asarray(_full_logits(model, out.tokens, out.key_mask), np.float64)[:, :-1] / 0.7
    targets = np.asarray(out.tokens)[:, 1:, None]
    kept = _reference_filter(scaled.reshape(-1, _CONFIG.vocab_size), 12, 0.8).reshape(scaled.shape)
    completion = np.asarray(out.completion_mask)[:, 1:]
    # Every sampled token lies in the kept set.
    assert np.all(np.take_along_axis(kept, targets, -1)[..., 0][completion])
    sampled = _log_softmax(np.where(kept, scaled, -np.inf))
    policy = _log_softmax(scaled)
    for name, log_p in (('logprobs', sampled), ('policy_logprobs', policy)):
      want = np.where(completion, np.take_along_axis(log_p, targets, -1)[..., 0], 0.0)
      np.testing.assert_allclose(getattr(out, name)[:, 1:], want, **TOL, err_msg=name)
    # The learner's temperature-scaled log-probs are the sampler's untruncated ones.
    learner = np.where(out.completion_mask, rollout.logprobs(out.tokens, out.key_mask), 0.0)
    np.testing.assert_allclose(learner, out.policy_logprobs, **TOL)
    assert np.all(np.asarray(out.logprobs) >= np.asarray(out.policy_logprobs))


def _log_softmax(z):
  m = np.max(z, -1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def _reference_filter(logits, top_k, top_p):
  """Kept-token mask [R, V] from the definitions: the k largest, then the smallest prefix of
  the renormalized, sorted distribution whose mass before each kept token is < top_p."""
  keep = np.zeros(logits.shape, bool)
  for r, z in enumerate(logits):
    order = np.argsort(-z, kind='stable')
    kth = z[order[top_k - 1]]
    in_k = z >= kth
    p = np.where(in_k, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    cum_before = 0.0
    threshold = np.inf
    for i in order:
      if not in_k[i] or cum_before >= top_p:
        break
      threshold = z[i]
      cum_before += p[i]
    keep[r] = z >= threshold
  return keep


@pytest.mark.parametrize('top_k, top_p', [(None, 0.55), (4, 1.0), (6, 0.7), (None, 1.0)])
def test_filter_logits_matches_reference(top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 11)).astype(np.float32)
  logits[0, 3] = logits[0, 7]  # a tie
  got = sampling.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p)
  keep = _reference_filter(logits.astype(np.float64), top_k or 11, top_p)
  np.testing.assert_array_equal(np.isfinite(got), keep)
  np.testing.assert_array_equal(np.asarray(got)[keep], logits[keep])


# Untruncated, and τ = 1.3 with top-k 10 then top-p 0.7, which keeps 6 of the 10 here.
@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, None, 1.0), (1.3, 10, 0.7)])
def test_sampled_first_tokens_follow_the_filtered_softmax(temperature, top_k, top_p):
  # 2048 copies of one prompt; the first sampled token of every row is an independent draw
  # from filter(softmax(z / τ)). Pearson's chi-square over bins with expected count ≥ 5
  # (the rest pooled) at significance 1e-4; tokens outside the support must never appear.
  model = _model()
  rows = 2048
  prompt = np.array([[7, 3, 41, 22]] * rows, np.int32)
  config = sampling.SamplingConfig(
      max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p
  )
  out = sampling.generate(
      model, prompt, np.ones_like(prompt, bool), jax.random.key(7), config=config
  )
  z = np.asarray(_full_logits(model, prompt[:1], np.ones((1, 4), bool)), np.float64)[0, -1]
  z = z / temperature
  keep = _reference_filter(z[None], top_k or _CONFIG.vocab_size, top_p)[0]
  probs = np.exp(_log_softmax(np.where(keep, z, -np.inf)))
  counts = np.bincount(np.asarray(out.completion_tokens)[:, 0], minlength=_CONFIG.vocab_size)
  assert counts[~keep].sum() == 0
  expected = rows * probs
  big = expected >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(expected[big], expected[~big].sum())
  if expected[-1] == 0:
    observed, expected = observed[:-1], expected[:-1]
  statistic, p_value = scipy.stats.chisquare(observed, expected)
  assert len(observed) >= 3, 'too few bins for the test to mean anything'
  assert p_value > 1e-4, (statistic, observed, expected)
  first = np.asarray(out.completion_tokens)[:, 0]
  np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[first]), **TOL)


def test_shape_buckets_and_sampling_knobs_avoid_recompilation(backend_compiles):
  # Count backend compiles of the decoding program through jax.monitoring. The (batch 8,
  # prompt 16, N = 6) program may already be compiled by another test.
  model = _model()
  other_knobs = dataclasses.replace(
      SAMPLE, temperature=0.3, top_k=3, top_p=0.5, eos_id=1, stop_ids=(2, 3), pad_id=4
  )
  calls = [
      (1, 3, GREEDY),
      (5, 10, SAMPLE),
      (8, 16, other_knobs),
      (3, 7, GREEDY),
      (9, 4, GREEDY),
      (2, 17, SAMPLE),
  ]
  counts = []
  for batch, length, config in calls:
    tokens = np.full((batch, length), 5, np.int32)
    sampling.generate(model, tokens, np.ones_like(tokens, bool), jax.random.key(0), config=config)
    counts.append(sum('_generate_bucketed' in name for name in backend_compiles))
  # Batch ≤ 8 and prompt ≤ 16 share one program whatever the temperature, top-k, top-p and
  # stop tokens; batch 9 and prompt 17 open new buckets.
  assert counts[0] <= 1
  assert [c - counts[0] for c in counts] == [0, 0, 0, 0, 1, 2]


def test_a_rollout_of_a_new_shape_compiles_three_programs(backend_compiles):
  # Sliced and assembled eagerly, the outputs cost a program per array and operation (11).
  rollout = JaxRollout(_model(), config=SAMPLE, chunk_size=4)
  tokens = np.full((11, 3), 5, np.int32)  # a batch no other test uses
  keys = [jax.random.key(0), jax.random.key(1)]
  backend_compiles.clear()
  rollout.generate(tokens, np.ones_like(tokens, bool), keys[0])
  # The decoding program may exist already (its batch bucket holds other tests' batches).
  assert sorted(set(backend_compiles)) == sorted(backend_compiles)
  assert (
      {'jit(_unbucket)', 'jit(rollout_from_samples)'}
      <= set(backend_compiles)
      <= {'jit(_generate_bucketed)', 'jit(_unbucket)', 'jit(rollout_from_samples)'}
  )
  backend_compiles.clear()
  rollout.generate(tokens, np.ones_like(tokens, bool), keys[1])
  assert not backend_compiles


class TestValidation:

  def test_empty_prompt_row_is_named(self):
    tokens, mask = _prompts()
    mask[2] = False
    with pytest.raises(ValueError, match=r'\[2\]'):
      sampling.generate(_model(), tokens, mask, jax.random.key(0), config=GREEDY)

  def test_token_outside_vocabulary(self):
    tokens, mask = _prompts()
    tokens[1, 0] = _CONFIG.vocab_size
    with pytest.raises(ValueError, match='token ids'):
      sampling.generate(_model(), tokens, mask, jax.random.key(0), config=GREEDY)

  @pytest.mark.parametrize(
      'kwargs',
      [
          dict(max_new_tokens=0),
          dict(temperature=-0.1),
          dict(top_k=0),
          dict(top_p=0.0),
          dict(top_p=1.5),
          dict(batch_multiple=0),
      ],
  )
  def test_bad_config(self, kwargs):
    with pytest.raises(ValueError):
      sampling.SamplingConfig(**{'max_new_tokens': 4, **kwargs})


class TestRollout:

  def test_update_params_changes_generation_and_logprobs(self):
    model = _model()
    rollout = JaxRollout(model, config=GREEDY, chunk_size=4)
    before = rollout.generate(*_prompts(), jax.random.key(0))
    state = nnx.state(model)
    rollout.update_params(jax.tree.map(lambda x: -x, state))
    after = rollout.generate(*_prompts(), jax.random.key(0))
    assert np.any(np.asarray(before.tokens) != np.asarray(after.tokens))
    # The scores follow the new parameters: recompute them through a negated model.
    negated = nnx.merge(*nnx.split(model)[:1], jax.tree.map(lambda x: -x, state))
    want = sampling.generate(negated, *_prompts(), jax.random.key(0), config=GREEDY)
    np.testing.assert_allclose(
        np.asarray(after.policy_logprobs)[:, 5:], want.policy_logprobs, **TOL
    )
    with pytest.raises(ValueError, match='does not match'):
      rollout.update_params(jax.tree.map(lambda x: x[..., :1], state))

  def test_mock_rollout_is_deterministic_and_consistent(self):
    mock = MockRollout(vocab_size=5, max_new_tokens=8, eos_id=4, pad_id=0)
    assert isinstance(mock, RolloutBackend)
    tokens, mask = _prompts('right')
    tokens = tokens % 5
    out = mock.generate(tokens, mask, jax.random.key(0))
    again = mock.generate(tokens, mask, jax.random.key(0))
    other = mock.generate(tokens, mask, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, out, again)
    assert np.any(np.asarray(out.tokens) != np.asarray(other.tokens))
    completion = np.asarray(out.tokens)[:, 5:]
    comp_mask = np.asarray(out.completion_mask)[:, 5:]
    for b in range(len(_PROMPTS)):
      eos_at = np.flatnonzero(completion[b] == 4)
      length = eos_at[0] + 1 if eos_at.size else 8
      np.testing.assert_array_equal(comp_mask[b], np.arange(8) < length)
      assert out.lengths[b] == length and bool(out.finished[b]) == bool(eos_at.size)
    np.testing.assert_allclose(
        np.where(out.completion_mask, mock.logprobs(out.tokens, out.key_mask), 0.0),
        out.policy_logprobs,
    )
    np.testing.assert_allclose(
        np.asarray(out.policy_logprobs)[comp_mask.nonzero()[0], comp_mask.nonzero()[1] + 5],
        -np.log(5),
        rtol=1e-6,
    )
    mock.update_params('v1')
    assert mock.updates == ['v1']
