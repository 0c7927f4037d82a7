"""Tests for gmpo_jax.models.logprobs: chunked log-probs and entropy against a float64 NumPy
reference (values and finite-difference gradients), the memory bound, and sequence alignment
on the real Transformer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_fixtures import CONTEXT_CONFIG as _CONFIG
from model_fixtures import context_model as _model
from model_fixtures import full_logits as _full_logits

from gmpo_jax.models import logprobs as lp

TOL = dict(rtol=1e-5, atol=1e-5)


def _reference(hidden, unembed, targets, temperature):
  """float64 NumPy: log p_{t,y} = z_{t,y} − logsumexp(z_t), H_t = −Σ p log p, z = h·W / τ."""
  z = np.einsum('btd,dv->btv', hidden.astype(np.float64), unembed.astype(np.float64)) / temperature
  z_max = z.max(-1, keepdims=True)
  log_p = z - (z_max + np.log(np.exp(z - z_max).sum(-1, keepdims=True)))
  logp = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  entropy = -(np.exp(log_p) * log_p).sum(-1)
  return logp, entropy


def _inputs(seed, batch=2, length=7, dim=4, vocab=9):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, dim)).astype(np.float32)
  unembed = (1.5 * rng.normal(size=(dim, vocab))).astype(np.float32)
  targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  return hidden, unembed, targets


@functools.partial(jax.jit, static_argnames=('chunk_size', 'temperature'))
def _jit_token_logprobs(hidden, unembed, targets, *, chunk_size, temperature):
  return lp.token_logprobs(
      hidden, unembed, targets, chunk_size=chunk_size, with_entropy=True, temperature=temperature
  )


def _eager_token_logprobs(hidden, unembed, targets, *, chunk_size, temperature):
  return lp.token_logprobs(
      hidden, unembed, targets, chunk_size=chunk_size, with_entropy=True, temperature=temperature
  )


class TestTokenLogprobs:

  # chunk_size 3 and 4 do not divide T = 7 (internal padding); 7 is one chunk, 16 > T.
  @pytest.mark.parametrize(
      'fn, chunk_size, temperature',
      [(_jit_token_logprobs, c, t) for c in (1, 3, 4, 7, 16) for t in (1.0, 0.6)]
      + [(_eager_token_logprobs, 3, 0.6)],
  )
  def test_values_match_reference(self, fn, chunk_size, temperature):
    hidden, unembed, targets = _inputs(seed=chunk_size)
    out = fn(hidden, unembed, targets, chunk_size=chunk_size, temperature=temperature)
    ref_logp, ref_entropy = _reference(hidden, unembed, targets, temperature)
    assert out.logp.dtype == jnp.float32 and out.entropy.dtype == jnp.float32
    np.testing.assert_allclose(out.logp, ref_logp, **TOL)
    np.testing.assert_allclose(out.entropy, ref_entropy, **TOL)

  def test_without_entropy_returns_logp_array(self):
    hidden, unembed, targets = _inputs(seed=3)
    out = lp.token_logprobs(hidden, unembed, targets, chunk_size=3)
    np.testing.assert_allclose(out, _reference(hidden, unembed, targets, 1.0)[0], **TOL)

  @pytest.mark.parametrize('with_entropy', [False, True])
  def test_gradients_match_float64_finite_differences(self, with_entropy):
    # A weighted sum of every output with random signed weights reaches every entry of the
    # vector-Jacobian product. T = 5 with chunk 2: a padded last chunk, and the backward
    # pass's 3 vocabulary blocks of ceil(7 / 3) = 3 overlap (the last is shifted left).
    hidden, unembed, targets = _inputs(seed=11, batch=2, length=5, dim=3, vocab=7)
    rng = np.random.default_rng(12)
    w_logp, w_entropy = rng.normal(size=(2, 2, 5))
    temperature = 0.8

    def loss(h, w):
      out = lp.token_logprobs(
          h, w, targets, chunk_size=2, with_entropy=with_entropy, temperature=temperature
      )
      if with_entropy:
        return jnp.sum(out.logp * w_logp) + jnp.sum(out.entropy * w_entropy)
      return jnp.sum(out * w_logp)

    def ref_loss(h, w):
      logp, entropy = _reference(h, w, targets, temperature)
      return np.sum(logp * w_logp) + (np.sum(entropy * w_entropy) if with_entropy else 0.0)

    def finite_difference(x, f, eps=1e-6):
      x = x.astype(np.float64)
      grad = np.zeros_like(x)
      for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
      return grad

    grad_h, grad_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, unembed)
    h64, w64 = hidden.astype(np.float64), unembed.astype(np.float64)
    np.testing.assert_allclose(grad_h, finite_difference(h64, lambda h: ref_loss(h, w64)), **TOL)
    np.testing.assert_allclose(grad_w, finite_difference(w64, lambda w: ref_loss(h64, w)), **TOL)

  @pytest.mark.parametrize('chunk_size', [5, 32])  # 3 overlapping vocabulary blocks; 1 block
  def test_gradients_match_naive_autodiff_at_larger_shape(self, chunk_size):
    hidden, unembed, targets = _inputs(seed=5, batch=3, length=13, dim=8, vocab=34)
    weights = np.random.default_rng(6).normal(size=(2, 3, 13)).astype(np.float32)

    def chunked(h, w):
      out = lp.token_logprobs(h, w, targets, chunk_size=chunk_size, with_entropy=True)
      return jnp.sum(out.logp * weights[0] + out.entropy * weights[1])

    def naive(h, w):
      log_p = jax.nn.log_softmax(jnp.einsum('btd,dv->btv', h, w), axis=-1)
      logp = jnp.take_along_axis(log_p, targets[..., None], -1)[..., 0]
      entropy = -jnp.sum(jnp.exp(log_p) * log_p, -1)
      return jnp.sum(logp * weights[0] + entropy * weights[1])

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, unembed)
    want = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, unembed)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, **TOL)

  def test_bfloat16_inputs_reduce_in_float32(self):
    hidden, unembed, targets = _inputs(seed=7, dim=16, vocab=64)
    hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)
    unembed_bf16 = jnp.asarray(unembed, jnp.bfloat16)
    out = _jit_token_logprobs(hidden_bf16, unembed_bf16, targets, chunk_size=4, temperature=1.0)
    # bf16 × bf16 products are exact in float32, so only float32 summation error remains;
    # a bf16 logsumexp would be off by ~1e-2.
    ref_logp, ref_entropy = _reference(
        np.asarray(hidden_bf16, np.float64), np.asarray(unembed_bf16, np.float64), targets, 1.0
    )
    assert out.logp.dtype == jnp.float32
    np.testing.assert_allclose(out.logp, ref_logp, **TOL)
    np.testing.assert_allclose(out.entropy, ref_entropy, **TOL)
    grads = jax.jit(
        jax.grad(lambda h, w: lp.token_logprobs(h, w, targets, chunk_size=4).sum(), argnums=(0, 1))
    )(hidden_bf16, unembed_bf16)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16

  def test_target_outside_vocabulary_is_minus_inf_with_finite_gradient(self):
    hidden, unembed, targets = _inputs(seed=8)
    targets = targets.copy()
    targets[0, 2], targets[1, 0] = 9, -1  # V = 9
    out = lp.token_logprobs(hidden, unembed, targets, chunk_size=3)
    assert out[0, 2] == -np.inf and out[1, 0] == -np.inf
    valid = np.ones(targets.shape, bool)
    valid[0, 2] = valid[1, 0] = False
    np.testing.assert_allclose(
        np.asarray(out)[valid],
        _reference(hidden, unembed, np.clip(targets, 0, 8), 1.0)[0][valid],
        **TOL,
    )
    grads = jax.jit(
        jax.grad(
            lambda h: jnp.sum(
                jnp.where(valid, lp.token_logprobs(h, unembed, targets, chunk_size=3), 0.0)
            )
        )
    )(hidden)
    assert np.all(np.isfinite(grads))

  def test_empty_sequence(self):
    hidden, unembed, targets = _inputs(seed=9)
    out = lp.token_logprobs(hidden[:, :0], unembed, targets[:, :0], chunk_size=4)
    assert out.shape == (2, 0)

  @pytest.mark.parametrize(
      'kwargs',
      [dict(chunk_size=0), dict(chunk_size=2.0), dict(temperature=0.0), dict(temperature=-1.0)],
  )
  def test_bad_hyperparameters_raise(self, kwargs):
    hidden, unembed, targets = _inputs(seed=10)
    with pytest.raises(ValueError):
      lp.token_logprobs(hidden, unembed, targets, **{'chunk_size': 4, **kwargs})

  def test_bad_shapes_raise(self):
    hidden, unembed, targets = _inputs(seed=10)
    with pytest.raises(AssertionError):
      lp.token_logprobs(hidden, unembed.T, targets)
    with pytest.raises(AssertionError):
      lp.token_logprobs(hidden, unembed, targets[:, :-1])
    with pytest.raises(AssertionError):
      lp.token_logprobs(hidden, unembed, targets.astype(np.float32))

  def test_chunks_split_the_sequence_evenly(self):
    # T = 39 with chunk_size 32: two chunks of 20 (one padded position), not 32 + 7 padded
    # to 64 (25 wasted positions of logits and of the unembedding matmul).
    hidden = jax.ShapeDtypeStruct((2, 39, 4), jnp.float32)
    unembed = jax.ShapeDtypeStruct((4, 9), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, 39), jnp.int32)
    jaxpr = str(
        jax.make_jaxpr(lambda h, w, y: lp.token_logprobs(h, w, y, chunk_size=32))(
            hidden, unembed, targets
        )
    )
    assert 'f32[2,40,4]' in jaxpr and 'f32[2,64,4]' not in jaxpr
    assert 'f32[2,2,20,4]' in jaxpr  # the scan's [B, n, C, D] chunks

  def test_value_and_grad_memory_stays_at_one_chunk(self):
    # Compiled scratch memory of value+grad: the naive program holds several [B, T, V]
    # float32 buffers (8 MiB each here); the chunked one a few [B, chunk, V] (0.5 MiB).
    batch, length, dim, vocab, chunk = 2, 256, 16, 4096, 16
    specs = (
        jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )

    def chunked(h, w, y):
      return lp.token_logprobs(h, w, y, chunk_size=chunk, with_entropy=True).logp.sum()

    def naive(h, w, y):
      log_p = jax.nn.log_softmax(jnp.einsum('btd,dv->btv', h, w), axis=-1)
      return jnp.take_along_axis(log_p, y[..., None], -1).sum()

    def scratch_bytes(f):
      compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*specs).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    full_logits = batch * length * vocab * 4
    chunk_logits = batch * chunk * vocab * 4
    assert scratch_bytes(naive) >= full_logits
    assert scratch_bytes(chunked) <= 4 * chunk_logits < full_logits / 2


def test_project_logits_matches_reference_and_scales_by_temperature():
  hidden, unembed, _ = _inputs(seed=13)
  z = np.einsum('btd,dv->btv', hidden.astype(np.float64), unembed)
  np.testing.assert_allclose(lp.project_logits(hidden, unembed), z, **TOL)
  np.testing.assert_allclose(lp.project_logits(hidden, unembed, temperature=0.5), 2 * z, **TOL)


def test_positions_from_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(
      lp.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]]
  )


@nnx.jit(static_argnames=('temperature', 'with_entropy'))
def _sequence_logprobs(model, tokens, key_mask, temperature, with_entropy):
  return lp.sequence_logprobs(
      model,
      tokens,
      lp.positions_from_mask(key_mask),
      key_mask,
      chunk_size=4,
      temperature=temperature,
      with_entropy=with_entropy,
  )


class TestSequenceLogprobs:

  def _batch(self):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, _CONFIG.vocab_size, (3, 9)).astype(np.int32)
    key_mask = np.ones((3, 9), bool)
    key_mask[0, :3] = False  # left padding
    key_mask[1, 6:] = False  # right padding
    return tokens, key_mask

  @pytest.mark.parametrize('temperature', [1.0, 0.7])
  def test_aligned_with_next_token_log_softmax(self, temperature):
    model = _model()
    tokens, key_mask = self._batch()
    out = _sequence_logprobs(model, tokens, key_mask, temperature, True)
    logits = np.asarray(_full_logits(model, tokens, key_mask), np.float64) / temperature
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.zeros(tokens.shape)
    want_entropy = np.zeros(tokens.shape)
    for b in range(3):
      for t in range(1, 9):
        if key_mask[b, t] and key_mask[b, t - 1]:
          want[b, t] = log_p[b, t - 1, tokens[b, t]]
          want_entropy[b, t] = -(np.exp(log_p[b, t - 1]) * log_p[b, t - 1]).sum()
    np.testing.assert_allclose(out.logp, want, **TOL)
    np.testing.assert_allclose(out.entropy, want_entropy, **TOL)
    # The zeros are exactly the positions without a real token and a real predecessor.
    assert np.all(np.asarray(out.logp)[want == 0] == 0) and np.all(
        want[:, 1:][key_mask[:, 1:] & key_mask[:, :-1]] < 0
    )

  def test_parameter_gradient_matches_directional_finite_difference(self):
    # d/dε L(θ + ε·u) at ε = 0 by central differences in float32 (the forward is the jitted
    # one above, no new compilation); ε and the tolerance are sized for float32 rounding.
    model = _model()
    tokens, key_mask = self._batch()
    weights = np.random.default_rng(3).normal(size=tokens.shape).astype(np.float32)

    def loss(m):
      return jnp.sum(_sequence_logprobs(m, tokens, key_mask, 1.0, True).logp * weights)

    grads = nnx.state(nnx.jit(nnx.grad(loss))(model), nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(4)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    eps = 1e-3

    def shifted(sign):
      return nnx.merge(graphdef, jax.tree.map(lambda p, u: p + sign * eps * u, params, direction))

    numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
    analytic = sum(
        float(jnp.vdot(g, u)) for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3)
