"""Tests for gmpo_jax.models.attention: every kernel against the dense reference (values and
gradients) on padded batches with GQA and lengths that are not a multiple of the block,
a finite-difference gradient check in float64, the absence of any T×T array in the
blockwise program, and the 'auto' selection table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from gmpo_jax.infra import sharding
from gmpo_jax.models import attention as attn

HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(rng, batch, length, heads, kv_heads, dim, *, keys=None, dtype=jnp.float32):
  keys = length if keys is None else keys
  q = rng.standard_normal((batch, length, heads, dim))
  k = rng.standard_normal((batch, keys, kv_heads, dim))
  v = rng.standard_normal((batch, keys, kv_heads, dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _padding_mask(length, batch=4):
  """Row 0 dense; row 1 left padding; row 2 left padding crossing a block edge plus an
  interior hole and right padding; row 3 no real token at all (every query fully masked)."""
  mask = np.ones((4, length), bool)
  mask[1, :5] = False
  mask[2, :11] = False
  mask[2, 17:20] = False
  mask[2, length - 4 :] = False
  mask[3] = False
  return jnp.asarray(mask[:batch])


def _dense(q, k, v, key_mask, offset=0):
  return attn.dense_attention(
      q, k, v, attn.causal_padding_mask(key_mask, q.shape[1], offset), precision=HIGHEST
  )


def _weighted_sum(fn, weights):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)


class TestBlockwiseMatchesDense:

  @pytest.mark.parametrize(
      "length,heads,kv_heads,block",
      [
          (37, 6, 2, 8),  # GQA, T not a multiple of the block, 5 blocks
          (16, 4, 4, 8),  # multi-head, T a multiple of the block
          (21, 4, 1, 32),  # multi-query, one block shorter than block_size
          (64, 4, 2, 16),
      ],
  )
  def test_values_and_gradients(self, length, heads, kv_heads, block):
    rng = np.random.default_rng(length)
    q, k, v = _inputs(rng, 4, length, heads, kv_heads, 8)
    key_mask = _padding_mask(length)
    blockwise = functools.partial(
        attn.blockwise_attention, key_mask=key_mask, block_size=block, precision=HIGHEST
    )
    dense = functools.partial(_dense, key_mask=key_mask)
    out, ref = jax.jit(blockwise)(q, k, v), dense(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    # Every row, the fully-masked ones (rows 3 and the heads of rows 1–2) included.
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        out[3],
        jnp.repeat(jnp.mean(v[3], axis=0), heads // kv_heads, axis=0)[None].repeat(length, 0),
        atol=1e-5,
    )

    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = jax.jit(jax.grad(_weighted_sum(blockwise, weights), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(_weighted_sum(dense, weights), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
      assert np.isfinite(np.asarray(g)).all(), name
      np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()), rtol=1e-5, err_msg=name)

  def test_query_offset_into_a_longer_cache(self):
    """Prefill at a traced cache index: queries at slots o + t over S > T slots."""
    rng = np.random.default_rng(1)
    length, keys, offset = 13, 40, 9
    q, k, v = _inputs(rng, 3, length, 4, 2, 8, keys=keys)
    key_mask = np.zeros((3, keys), bool)
    key_mask[:, : offset + length] = True
    key_mask[1, :6] = False
    key_mask[2, : offset + 3] = False  # the first 3 queries of row 2 see nothing
    key_mask = jnp.asarray(key_mask)

    @jax.jit
    def blockwise(q, k, v, offset):
      return attn.blockwise_attention(
          q, k, v, key_mask, query_offset=offset, block_size=8, precision=HIGHEST
      )

    np.testing.assert_allclose(
        blockwise(q, k, v, jnp.int32(offset)),
        _dense(q, k, v, key_mask, offset),
        atol=1e-5,
        rtol=1e-5,
    )

  @pytest.mark.parametrize("length", [1, 5])
  def test_cached_kernel_equals_dense_over_the_written_cache(self, length):
    """Cache slots before the chunk ([B, K, S, hd], read in place) then the chunk's own keys:
    the values of dense attention over the cache with the chunk written into it."""
    rng = np.random.default_rng(2)
    batch, slots, offset = 3, 21, 11
    q, k, v = _inputs(rng, batch, length, 6, 2, 8, keys=slots)
    key_mask = jnp.asarray(rng.random((batch, slots)) < 0.7).at[:, offset].set(True)
    mask = attn.causal_padding_mask(key_mask, length, offset)
    want = attn.dense_attention(q, k, v, mask, precision=HIGHEST)
    # The cache holds garbage where the chunk will be written: it must not be read.
    chunk = slice(offset, offset + length)
    stale = [x.at[:, chunk].set(1e3) for x in (k, v)]
    cache_k, cache_v = (jnp.swapaxes(x, 1, 2) for x in stale)
    before_chunk = jnp.arange(slots) < offset
    got = jax.jit(functools.partial(attn.cached_dense_attention, precision=HIGHEST))(
        q,
        cache_k,
        cache_v,
        mask & before_chunk,
        k[:, chunk],
        v[:, chunk],
        attn.causal_padding_mask(key_mask[:, chunk], length),
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_bfloat16_is_close_and_keeps_dtype(self):
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, 4, 29, 4, 2, 16, dtype=jnp.bfloat16)
    key_mask = _padding_mask(29)
    out = attn.blockwise_attention(q, k, v, key_mask, block_size=8)
    ref = _dense(*(x.astype(jnp.float32) for x in (q, k, v)), key_mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)

  def test_float64_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(3)
      q, k, v = _inputs(rng, 2, 11, 4, 2, 4, dtype=jnp.float64)
      key_mask = _padding_mask(11, batch=2)

      @jax.jit
      def fn(q, k, v):
        return attn.blockwise_attention(q, k, v, key_mask, block_size=4, precision=HIGHEST)

      assert fn(q, k, v).dtype == jnp.float64
      jtu.check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)

  def test_no_array_is_quadratic_in_length(self):
    """Every intermediate of value-and-grad (forward, recompute, backward) has at most one
    axis of length ≥ T: score tiles are [B, K, G, block, block]."""
    length, block = 64, 8
    q, k, v = _inputs(np.random.default_rng(4), 1, length, 4, 2, 8)
    key_mask = _padding_mask(length, batch=1)

    def loss(impl):
      def fn(q, k, v):
        return jnp.sum(attn.causal_attention(q, k, v, key_mask, impl=impl, block_size=block))

      return jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    def widest(jaxpr):
      most = 0
      for eqn in jaxpr.eqns:
        for var in eqn.outvars:
          most = max(most, sum(d >= length for d in getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
          for sub in param if isinstance(param, (tuple, list)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
              most = max(most, widest(inner))
      return most

    assert widest(loss("xla").jaxpr) == 2  # the check sees the dense [B, K, G, T, T] scores
    assert widest(loss("blockwise").jaxpr) == 1

  def test_rejects_bad_arguments(self):
    q, k, v = _inputs(np.random.default_rng(5), 1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
      attn.blockwise_attention(q, k, v, jnp.ones((1, 8), bool))
    q, k, v = _inputs(np.random.default_rng(5), 1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="block_size"):
      attn.blockwise_attention(q, k, v, jnp.ones((1, 8), bool), block_size=0)
    with pytest.raises(AssertionError):
      attn.blockwise_attention(q, k, v, jnp.ones((1, 8), jnp.int32))


class TestVendorKernels:
  """The wiring around cuDNN and splash (padding handling, GQA, layout), checked on CPU:
  the cuDNN path through the same `jax.nn.dot_product_attention` call with the XLA
  implementation, splash in the Pallas interpreter."""

  def _check_real_rows(self, fn, rng, length, heads, kv_heads, dim, atol):
    q, k, v = _inputs(rng, 4, length, heads, kv_heads, dim)
    key_mask = _padding_mask(length)
    real = np.asarray(key_mask)
    out, ref = jax.jit(fn)(q, k, v, key_mask), _dense(q, k, v, key_mask)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol)
    # Gradients with the cotangent on real tokens only (what the model's loss gives).
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * key_mask[:, :, None, None]

    def grads_of(kernel):
      return jax.jit(
          jax.grad(lambda *a: jnp.sum(kernel(*a, key_mask) * weights), argnums=(0, 1, 2))
      )(q, k, v)

    grads, refs = grads_of(fn), grads_of(_dense)
    for name, g, r in zip("qkv", grads, refs):
      np.testing.assert_allclose(g, r, atol=atol * float(jnp.abs(r).max()), err_msg=name)

  def test_cudnn_wiring_with_the_xla_implementation(self):
    fn = functools.partial(attn.cudnn_attention, implementation="xla")
    self._check_real_rows(fn, np.random.default_rng(6), 23, 6, 2, 8, atol=1e-5)

  def test_cudnn_rejects_float32(self):
    q, k, v = _inputs(np.random.default_rng(7), 1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="bfloat16"):
      attn.cudnn_attention(q, k, v, jnp.ones((1, 8), bool))

  def test_splash_in_the_pallas_interpreter(self):
    fn = functools.partial(attn.splash_attention, block_size=128, interpret=True)
    self._check_real_rows(fn, np.random.default_rng(8), 37, 4, 2, 16, atol=1e-4)

  @pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the off-TPU error")
  def test_splash_off_tpu_is_a_clear_error(self):
    q, k, v = _inputs(np.random.default_rng(9), 1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="only on TPU"):
      attn.splash_attention(q, k, v, jnp.ones((1, 8), bool))
    # The target is the context mesh's platform: a CPU mesh is not a TPU either.
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      with pytest.raises(ValueError, match="target platform is 'cpu'"):
        attn.splash_attention(q, k, v, jnp.ones((1, 8), bool))


def _check_splash_matches_blockwise(q, k, v, key_mask, *, atol):
  """splash (Pallas interpreter) against blockwise on the real query rows, in value and in the
  gradients of a loss weighted on real rows only (what the model's loss gives), traced under
  the context mesh (if any) as the model traces it."""
  splash = functools.partial(attn.splash_attention, block_size=128, interpret=True)
  blockwise = functools.partial(attn.blockwise_attention, block_size=16, precision=HIGHEST)
  real = np.asarray(key_mask)
  weights = (
      jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
      * key_mask[:, :, None, None]
  )

  def value_and_grads(kernel):
    loss = lambda *a: jnp.sum(kernel(*a, key_mask) * weights)
    return jax.jit(lambda *a: (kernel(*a, key_mask), jax.grad(loss, argnums=(0, 1, 2))(*a)))(
        q, k, v
    )

  (out, grads), (ref, ref_grads) = value_and_grads(splash), value_and_grads(blockwise)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=atol * float(jnp.abs(r).max()), err_msg=name)


class TestSplashUnderAMesh:
  """Under `jax.set_mesh` splash runs inside `shard_map` (the only way a Mosaic kernel runs on
  a multi-chip mesh). The split itself over 8 devices is checked in
  tests/multidevice/test_splash_mesh.py; here, the one-device mesh of this process."""

  def test_one_device_mesh_equals_blockwise(self):
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, 4, 37, 4, 2, 16)
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      _check_splash_matches_blockwise(q, k, v, _padding_mask(37), atol=1e-4)

  def test_lowered_inside_shard_map(self):
    q, k, v = _inputs(np.random.default_rng(11), 2, 8, 4, 2, 8)
    fn = jax.jit(functools.partial(attn.splash_attention, block_size=128, interpret=True))
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, jnp.ones((2, 8), bool)))
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v, jnp.ones((2, 8), bool)))


class TestResolve:

  @pytest.mark.parametrize(
      "impl,backend,dtype,length,cached,expected",
      [
          ("auto", "cpu", "float32", 64, False, "blockwise"),
          ("auto", "cpu", "float32", 4096, False, "blockwise"),
          ("auto", "gpu", "bfloat16", 4096, False, "cudnn"),
          ("auto", "cuda", "float16", 4096, False, "cudnn"),
          ("auto", "gpu", "float32", 4096, False, "blockwise"),
          ("auto", "tpu", "bfloat16", 4096, False, "splash"),
          ("xla", "gpu", "bfloat16", 4096, False, "xla"),
          ("cudnn", "cpu", "bfloat16", 64, False, "cudnn"),  # explicit choices are honoured
          # With a KV cache: dense for one decode step, blockwise for a prefill chunk.
          ("auto", "gpu", "bfloat16", 1, True, "xla"),
          ("splash", "tpu", "bfloat16", 1, True, "xla"),
          ("auto", "tpu", "bfloat16", 512, True, "blockwise"),
          ("cudnn", "gpu", "bfloat16", 512, True, "blockwise"),
          ("xla", "cpu", "float32", 512, True, "xla"),
      ],
  )
  def test_table(self, impl, backend, dtype, length, cached, expected):
    assert (
        attn.resolve_impl(impl, backend=backend, dtype=dtype, num_queries=length, cached=cached)
        == expected
    )

  def test_unknown_impl_and_block_defaults(self):
    with pytest.raises(ValueError, match="Unknown attention_impl"):
      attn.resolve_impl("flash", backend="cpu", dtype="float32", num_queries=4, cached=False)
    assert attn.default_block_size("cpu") == attn.CPU_BLOCK_SIZE
    assert attn.default_block_size("tpu") == attn.DEFAULT_BLOCK_SIZE
