"""Tests for gmpo_jax.models.transformer: a float64 NumPy reference forward, KV-cache
consistency with left padding, configs and sharding metadata."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmpo_jax.models import transformer as tfm

TINY = tfm.TransformerConfig.from_name("tiny")
# Every optional feature on, untied, odd sizes: the strictest reference comparison.
FULL = dataclasses.replace(
    TINY,
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_heads=6,
    num_kv_heads=2,
    head_dim=10,
    attention_bias=True,
    qk_norm=True,
    tie_word_embeddings=False,
    rope_theta=500.0,
)
LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}


@nnx.jit
def _forward(model, tokens, positions, key_mask):
  hidden, _ = model(tokens, positions, key_mask=key_mask)
  return hidden, model.logits(hidden)


@nnx.jit
def _extend(model, tokens, positions, key_mask, cache):
  hidden, cache = model(tokens, positions, key_mask=key_mask, cache=cache)
  return hidden, model.logits(hidden), cache


def _make(config, seed=0):
  """A model with non-default values everywhere: norm scales ≠ 1, biases ≠ 0, weights large
  enough that attention is far from uniform. Built abstractly and filled from NumPy, which
  skips compiling the random initializers."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: tfm.Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def draw(path, x):
    name = str(path[-1].key)
    if name == "scale":
      value = 1.0 + 0.3 * rng.standard_normal(x.shape)
    elif name.endswith("bias"):
      value = 0.3 * rng.standard_normal(x.shape)
    else:
      value = 0.15 * rng.standard_normal(x.shape)
    return jnp.asarray(value, x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _batch(config, rng, pads, length=12):
  """Row b: `pads[b]` random padding tokens, then the start of one shared random sequence
  (so every row's valid outputs must equal row 0's); positions = cumsum(mask) − 1."""
  sequence = rng.integers(0, config.vocab_size, length)
  tokens = rng.integers(0, config.vocab_size, (len(pads), length))
  for row, pad in enumerate(pads):
    tokens[row, pad:] = sequence[: length - pad]
  tokens = tokens.astype(np.int32)
  mask = np.arange(length)[None, :] >= np.asarray(pads)[:, None]
  positions = (np.cumsum(mask, axis=1) - 1).astype(np.int32)
  return tokens, positions, mask


# ---------------------------------------------------------------------------------------
# float64 NumPy reference, written from the papers (RMSNorm, RoPE rotate-half, GQA, SwiGLU)


def _np_rms(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _np_inv_freq(config):
  """θ_i = b^(−2i/d), then Llama 3 scaling frequency by frequency (arXiv 2407.21783)."""
  out = []
  for i in range(config.head_dim // 2):
    theta = config.rope_theta ** (-2.0 * i / config.head_dim)
    s = config.rope_scaling
    if s is not None and s.rope_type == "linear":
      theta = theta / s.factor
    elif s is not None:
      wavelength = 2 * math.pi / theta
      low_wavelength = s.original_max_position_embeddings / s.low_freq_factor
      high_wavelength = s.original_max_position_embeddings / s.high_freq_factor
      if wavelength > low_wavelength:
        theta = theta / s.factor
      elif wavelength >= high_wavelength:
        ratio = s.original_max_position_embeddings / wavelength
        smooth = (ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        theta = (1 - smooth) * theta / s.factor + smooth * theta
    out.append(theta)
  return np.array(out)


def _np_rope(x, positions, inv_freq):
  angles = positions[:, :, None, None] * inv_freq
  angles = np.concatenate([angles, angles], axis=-1)
  half = x.shape[-1] // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * np.cos(angles) + rotated * np.sin(angles)


def _np_forward(params, config, tokens, positions, key_mask):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  blocks, eps = p["blocks"], config.rms_norm_eps
  inv_freq = _np_inv_freq(config)
  x = p["embedding"][tokens]
  length = tokens.shape[1]
  allowed = np.tril(np.ones((length, length), bool))[None] & key_mask[:, None, :]
  repeat = config.num_heads // config.num_kv_heads
  for layer in range(config.num_layers):
    at = jax.tree.map(lambda a: a[layer], blocks["attn"])
    h = _np_rms(x, blocks["attn_norm"]["scale"][layer], eps)
    q, k, v = (np.einsum("btd,dnh->btnh", h, at[f"{n}_proj"]) for n in "qkv")
    if config.attention_bias:
      q, k, v = q + at["q_bias"], k + at["k_bias"], v + at["v_bias"]
    if config.qk_norm:
      q, k = _np_rms(q, at["q_norm"]["scale"], eps), _np_rms(k, at["k_norm"]["scale"], eps)
    q, k = _np_rope(q, positions, inv_freq), _np_rope(k, positions, inv_freq)
    k, v = np.repeat(k, repeat, axis=2), np.repeat(v, repeat, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(config.head_dim)
    scores = np.where(allowed[:, None], scores, -np.inf)
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    weights = np.where(allowed[:, None], np.exp(scores), 0.0)
    # A padding query with no valid key gets zero weights (its output is unused).
    weights = np.nan_to_num(weights / np.sum(weights, axis=-1, keepdims=True))
    attended = np.einsum("bnts,bsnh->btnh", weights, v)
    x = x + np.einsum("btnh,nhd->btd", attended, at["o_proj"])
    mp = jax.tree.map(lambda a: a[layer], blocks["mlp"])
    h = _np_rms(x, blocks["mlp_norm"]["scale"][layer], eps)
    gate = h @ mp["gate_proj"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ mp["up_proj"])) @ mp["down_proj"]
  hidden = _np_rms(x, p["final_norm"]["scale"], eps)
  unembed = p["embedding"].T if config.tie_word_embeddings else p["lm_head"]
  return hidden, hidden @ unembed


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------


class TestForwardAgainstReference:

  @pytest.mark.parametrize(
      "config",
      [
          FULL,
          TINY,
          dataclasses.replace(FULL, attention_impl="xla"),
          dataclasses.replace(FULL, attention_impl="blockwise", attention_block_size=4),
      ],
      ids=["bias_qknorm_untied", "tiny", "dense", "blockwise_3_blocks"],
  )
  def test_matches_float64_reference_with_left_padding(self, config):
    model = _make(config)
    with np.errstate(invalid="ignore"):  # padding rows of the reference are all-masked
      tokens, positions, mask = _batch(config, np.random.default_rng(0), [0, 3, 7])
      ref_hidden, ref_logits = _np_forward(_params(model), config, tokens, positions, mask)
    hidden, logits = _forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    assert hidden.dtype == jnp.float32 and logits.dtype == jnp.float32
    assert logits.shape == (3, 12, config.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()  # padding positions included
    np.testing.assert_allclose(np.asarray(hidden)[mask], ref_hidden[mask], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[mask], ref_logits[mask], atol=5e-5, rtol=1e-5)

  def test_left_padding_does_not_change_valid_outputs(self):
    model = _make(FULL)
    pads = [0, 3, 7]
    tokens, positions, mask = _batch(FULL, np.random.default_rng(1), pads)
    _, logits = _forward(model, *map(jnp.asarray, (tokens, positions, mask)))
    logits = np.asarray(logits)
    for row, pad in enumerate(pads[1:], start=1):
      np.testing.assert_allclose(logits[row, pad:], logits[0, : 12 - pad], atol=2e-5)

  def test_llama3_rope_frequencies_match_reference(self):
    config = tfm.TransformerConfig.from_name("llama-3.2-1b")
    np.testing.assert_allclose(
        tfm.rope_inverse_frequencies(config), _np_inv_freq(config), rtol=1e-6
    )
    # The scaling really acts: low frequencies divided by 32, high ones untouched.
    plain = tfm.rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=None))
    scaled = tfm.rope_inverse_frequencies(config)
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 32, rtol=1e-6)
    linear = dataclasses.replace(config, rope_scaling=tfm.RopeScaling("linear", factor=4.0))
    np.testing.assert_allclose(tfm.rope_inverse_frequencies(linear), plain / 4, rtol=1e-6)

  def test_llama3_rope_forward_matches_reference(self):
    config = dataclasses.replace(
        TINY,
        head_dim=32,
        num_heads=2,
        num_kv_heads=1,
        rope_theta=10_000.0,
        rope_scaling=tfm.RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64),
    )
    model = _make(config)
    tokens, positions, mask = _batch(config, np.random.default_rng(2), [0, 2], length=9)
    positions = positions * 37  # large positions, where the scaled band matters
    with np.errstate(invalid="ignore"):
      _, ref_logits = _np_forward(_params(model), config, tokens, positions, mask)
    _, logits = _forward(model, *map(jnp.asarray, (tokens, positions, mask)))
    np.testing.assert_allclose(np.asarray(logits)[mask], ref_logits[mask], atol=1e-4, rtol=1e-5)


class TestKVCache:

  def test_init_cache_shapes(self):
    cache = tfm.init_cache(FULL, 3, 16)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 16, 10)
    assert cache.key_mask.shape == (3, 16) and not cache.key_mask.any()
    assert cache.index.dtype == jnp.int32 and int(cache.index) == 0
    assert tfm.init_cache(FULL, 1, 4, jnp.bfloat16).k.dtype == jnp.bfloat16
    # Default: the compute dtype on the CPU, bfloat16 for a float32 model on accelerators.
    assert (
        cache.k.dtype
        == tfm.default_cache_dtype(FULL)
        == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    )
    bf16 = dataclasses.replace(FULL, dtype="bfloat16")
    for backend, config, expected in [
        ("cpu", FULL, jnp.float32),
        ("gpu", FULL, jnp.bfloat16),
        ("tpu", FULL, jnp.bfloat16),
        ("cpu", bf16, jnp.bfloat16),
        ("cuda", bf16, jnp.bfloat16),
    ]:
      assert tfm.default_cache_dtype(config, backend) == expected, (backend, config.dtype)

  @pytest.mark.parametrize(
      "config",
      [
          FULL,
          dataclasses.replace(FULL, attention_impl="blockwise", attention_block_size=4),
      ],
      ids=["auto", "blockwise_prefill_at_cache_offsets"],
  )
  def test_prefill_then_decode_equals_full_forward(self, config):
    model = _make(config)
    tokens, positions, mask = _batch(FULL, np.random.default_rng(3), [0, 2, 5])
    # One row has a padding token in the middle of the decode (a finished sequence).
    mask[0, 9] = False
    positions = (np.cumsum(mask, 1) - 1).astype(np.int32)
    ref_hidden, ref_logits = _forward(model, *map(jnp.asarray, (tokens, positions, mask)))
    cache = tfm.init_cache(config, 3, 16, config.dtype)  # spare slots stay invalid
    pieces, logits_pieces = [], []
    for start, stop in [(0, 6), (6, 8)] + [(t, t + 1) for t in range(8, 12)]:
      sl = slice(start, stop)
      hidden, logits, cache = _extend(
          model,
          jnp.asarray(tokens[:, sl]),
          jnp.asarray(positions[:, sl]),
          jnp.asarray(mask[:, sl]),
          cache,
      )
      pieces.append(hidden)
      logits_pieces.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.key_mask[:, :12]), mask)
    assert not np.asarray(cache.key_mask[:, 12:]).any()
    hidden, logits = np.concatenate(pieces, 1), np.concatenate(logits_pieces, 1)
    np.testing.assert_allclose(hidden[mask], np.asarray(ref_hidden)[mask], atol=1e-5)
    np.testing.assert_allclose(logits[mask], np.asarray(ref_logits)[mask], atol=1e-5)

  def test_overflow_is_an_error(self):
    model = _make(TINY)
    cache = tfm.init_cache(TINY, 1, 4).replace(index=jnp.int32(2))
    ones = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"overflow: index 2 \+ 3 new tokens > 4 slots"):
      model(ones, ones, cache=cache)
    with pytest.raises(ValueError, match="cannot fit"):
      model(jnp.ones((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32), cache=cache)
    one = jnp.ones((1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"overflow: index 2 \+ 1 new tokens > 2 slots"):
      model(one, one, cache=cache, read_slots=2)
    with pytest.raises(ValueError, match=r"read_slots=5 must lie in \[1, 4\]"):
      model(one, one, cache=cache, read_slots=5)
    with pytest.raises(ValueError, match="read_slots applies to a call with a cache"):
      model(one, one, read_slots=1)

  def test_a_window_of_the_cache_gives_the_full_cache_result(self):
    """Slots past the window are never attended to (the causal mask), so a step reading only
    the first index + 1 slots equals one reading all of them: prefill then decode steps."""
    model = _make(FULL)
    rng = np.random.default_rng(0)
    batch, prompt, capacity = 3, 5, 12
    tokens = jnp.asarray(rng.integers(0, FULL.vocab_size, (batch, prompt + 3)), jnp.int32)
    mask = jnp.asarray(np.arange(prompt)[None, :] >= np.array([[0], [2], [4]]))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full = window = tfm.init_cache(FULL, batch, capacity)
    want, full = model(tokens[:, :prompt], positions, key_mask=mask, cache=full)
    got, window = model(
        tokens[:, :prompt], positions, key_mask=mask, cache=window, read_slots=prompt
    )
    # Padding queries attend to nothing: their (meaningless) rows spread over the slots read.
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-6, atol=1e-6)
    for step in range(3):
      position = positions[:, -1:] + 1 + step
      token = tokens[:, prompt + step][:, None]
      want, full = model(token, position, cache=full)
      got, window = model(token, position, cache=window, read_slots=prompt + step + 1)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    valid = np.asarray(full.key_mask)  # [B, S]; padding slots hold meaningless keys
    np.testing.assert_allclose(
        np.moveaxis(np.asarray(window.k), 3, 2)[:, valid],
        np.moveaxis(np.asarray(full.k), 3, 2)[:, valid],
        rtol=1e-5,
        atol=1e-5,
    )


class TestTrainingPath:

  def test_remat_and_layer_schedule_give_the_same_gradient(self):
    """Rematerialized blocks (every remat policy) and a layer scan of one layer per iteration
    give the gradient of the default schedule (on the CPU every layer unrolled)."""
    batch = map(jnp.asarray, _batch(FULL, np.random.default_rng(4), [0, 3, 7]))
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((3, 12, FULL.vocab_size)))

    def loss(model, tokens, positions, mask):
      hidden, _ = model(tokens, positions, key_mask=mask)
      return jnp.sum(model.logits(hidden) * weights * mask[..., None])

    @nnx.jit
    def all_grads(models, *batch):  # one compilation for all
      return [nnx.grad(loss)(model, *batch) for model in models]

    variants = [
        FULL,
        dataclasses.replace(FULL, remat="full"),
        dataclasses.replace(FULL, remat="projections"),
        dataclasses.replace(FULL, remat="projections", layer_unroll=1),
        dataclasses.replace(FULL, layer_unroll=1),
    ]
    grads = all_grads([_make(config) for config in variants], *batch)
    for other in grads[1:]:
      for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other)):
        assert np.isfinite(np.asarray(a)).all()
        # Recomputation may reorder float32 sums (on GPUs): tolerance relative to the scale.
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6 * float(np.abs(np.asarray(a)).max())
        )
    # Every parameter receives gradient (nothing is accidentally disconnected).
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[0]))

  def test_contract_is_the_einsum(self):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6, 7)).astype(np.float32)
    contract = functools.partial(tfm.contract, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(
        contract(x, w[0], axes=1), np.einsum("btnh,hk->btnk", x, w[0]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        contract(x, w, axes=2), np.einsum("btnh,nhk->btk", x, w), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(AssertionError):
      contract(x, w[:, :5], axes=2)

  def test_default_layer_unroll(self):
    assert tfm.default_layer_unroll("cpu", 4) == 4
    assert tfm.default_layer_unroll("cpu", tfm.CPU_UNROLLED_LAYERS + 1) == 1
    assert tfm.default_layer_unroll("gpu", 4) == tfm.default_layer_unroll("tpu", 4) == 1

  def test_blockwise_attention_gives_the_dense_gradient(self):
    """Logits (to 1e-5) and every parameter's gradient through blockwise attention (3 blocks
    of 4, left padding) equal those through the dense reference kernel."""
    batch = tuple(map(jnp.asarray, _batch(FULL, np.random.default_rng(7), [0, 3, 7])))
    weights = jnp.asarray(np.random.default_rng(8).standard_normal((3, 12, FULL.vocab_size)))

    def loss(model, tokens, positions, mask):
      hidden, _ = model(tokens, positions, key_mask=mask)
      return jnp.sum(model.logits(hidden) * weights * mask[..., None])

    params = nnx.state(_make(FULL), nnx.Param)
    grads, logits = [], []
    for impl in ("xla", "blockwise"):
      model = _make(dataclasses.replace(FULL, attention_impl=impl, attention_block_size=4))
      nnx.update(model, params)
      grads.append(nnx.jit(nnx.grad(loss))(model, *batch))
      logits.append(np.asarray(_forward(model, *batch)[1]))
    mask = np.asarray(batch[2])
    np.testing.assert_allclose(logits[1][mask], logits[0][mask], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      np.testing.assert_allclose(
          np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(a)).max())
      )

  def test_bfloat16_compute_is_close_and_logits_are_float32(self):
    model32 = _make(FULL)
    config16 = dataclasses.replace(FULL, param_dtype="bfloat16", dtype=jnp.bfloat16)
    model16 = _make(config16)
    nnx.update(
        model16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model32, nnx.Param))
    )
    batch = map(jnp.asarray, _batch(FULL, np.random.default_rng(6), [0, 2, 5]))
    tokens, positions, mask = batch
    hidden16, logits16 = _forward(model16, tokens, positions, mask)
    _, logits32 = _forward(model32, tokens, positions, mask)
    assert hidden16.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    err = np.abs(np.asarray(logits16) - np.asarray(logits32))[np.asarray(mask)]
    assert err.max() < 0.1 * np.abs(np.asarray(logits32)).max()


class TestConfig:

  # Parameter counts of the published checkpoints (tied embeddings counted once).
  @pytest.mark.parametrize(
      "name,count",
      [
          ("qwen2-0.5b", 494_032_768),
          ("qwen2.5-0.5b", 494_032_768),
          ("qwen2.5-1.5b", 1_543_714_304),
          ("qwen2.5-7b", 7_615_616_512),
          ("qwen3-0.6b", 596_049_920),
          ("llama-3.2-1b", 1_235_814_400),
      ],
  )
  def test_named_configs_have_the_published_size(self, name, count):
    config = tfm.TransformerConfig.from_name(name)
    abstract = nnx.eval_shape(lambda: tfm.Transformer(config, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == count

  # The settings a parameter count cannot see, as each model's config.json on the hub states them.
  @pytest.mark.parametrize(
      "name,theta,eps,bias,qk_norm,tied,context",
      [
          ("qwen2-0.5b", 1e6, 1e-6, True, False, True, 131_072),
          ("qwen2.5-0.5b", 1e6, 1e-6, True, False, True, 32_768),
          ("qwen2.5-7b", 1e6, 1e-6, True, False, False, 32_768),
          ("qwen3-0.6b", 1e6, 1e-6, False, True, True, 40_960),
          ("llama-3.2-1b", 5e5, 1e-5, False, False, True, 131_072),
      ],
  )
  def test_named_configs_have_the_published_settings(
      self, name, theta, eps, bias, qk_norm, tied, context
  ):
    config = tfm.TransformerConfig.from_name(name)
    assert (config.rope_theta, config.rms_norm_eps) == (theta, eps)
    assert (config.attention_bias, config.qk_norm) == (bias, qk_norm)
    assert (config.tie_word_embeddings, config.max_position_embeddings) == (tied, context)
    scaling = config.rope_scaling
    assert (scaling is not None) == name.startswith("llama")
    if scaling is not None:
      assert scaling == tfm.RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

  def test_llama_100m_and_tiny(self):
    config = tfm.TransformerConfig.from_name("llama-100m")
    abstract = nnx.eval_shape(lambda: tfm.Transformer(config, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 95e6 < count < 105e6
    assert TINY.vocab_size >= 99 and TINY.num_layers == 2 and TINY.num_kv_heads < TINY.num_heads
    with pytest.raises(ValueError, match="Unknown model name"):
      tfm.TransformerConfig.from_name("gpt-5")

  def test_from_hf_config_old_and_new_keys_agree(self):
    common = dict(
        model_type="llama",
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=131_072,
        hidden_act="silu",
    )
    scaling = dict(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    new = tfm.TransformerConfig.from_hf_config(
        {
            **common,
            "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, **scaling},
        }
    )
    old = tfm.TransformerConfig.from_hf_config(
        {
            **common,
            "torch_dtype": "bfloat16",
            "rope_theta": 500_000.0,
            "rope_scaling": {"rope_type": "llama3", **scaling},
        }
    )
    older = tfm.TransformerConfig.from_hf_config(
        {
            **common,
            "torch_dtype": "bfloat16",
            "rope_theta": 500_000.0,
            "rope_scaling": {"type": "llama3", **scaling},
        }
    )
    named = dataclasses.replace(
        tfm.TransformerConfig.from_name("llama-3.2-1b"), param_dtype="bfloat16", dtype="bfloat16"
    )
    assert new == old == older == named

  def test_from_hf_config_families_and_errors(self):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
    )
    qwen2 = tfm.TransformerConfig.from_hf_config({**base, "model_type": "qwen2"})
    qwen3 = tfm.TransformerConfig.from_hf_config({**base, "model_type": "qwen3", "head_dim": 16})
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.head_dim == 8
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 16
    assert qwen2.rope_theta == 1e6 and qwen2.param_dtype == jnp.float32
    for bad, match in [
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {
                "model_type": "llama",
                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
            },
            "dynamic",
        ),
        ({"model_type": "llama", "attention_bias": True}, "o_proj"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "Sliding"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "SiLU"),
    ]:
      with pytest.raises(ValueError, match=match):
        tfm.TransformerConfig.from_hf_config({**base, **bad})

  def test_invalid_configs_are_errors(self):
    with pytest.raises(ValueError, match="multiple"):
      dataclasses.replace(TINY, num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
      dataclasses.replace(TINY, dtype="int8")
    with pytest.raises(ValueError, match="positive"):
      dataclasses.replace(TINY, num_layers=0)
    with pytest.raises(ValueError, match="Unsupported RoPE"):
      tfm.RopeScaling("yarn", factor=2.0)
    with pytest.raises(ValueError, match="attention_impl"):
      dataclasses.replace(TINY, attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_size"):
      dataclasses.replace(TINY, attention_block_size=0)
    with pytest.raises(ValueError, match="layer_unroll"):
      dataclasses.replace(TINY, layer_unroll=0)
    with pytest.raises(ValueError, match="remat"):
      dataclasses.replace(TINY, remat=True)

  def test_config_is_hashable_and_dtypes_canonical(self):
    config = dataclasses.replace(TINY, dtype=jnp.bfloat16, param_dtype="bfloat16")
    assert hash(config) == hash(
        dataclasses.replace(TINY, dtype="bfloat16", param_dtype=jnp.bfloat16)
    )
    assert config.dtype == jnp.bfloat16 and config.dtype == "bfloat16"
    # float32 means float32 on accelerators too (their default matmul is TF32/bf16 passes).
    assert TINY.matmul_precision == jax.lax.Precision.HIGHEST
    assert config.matmul_precision == jax.lax.Precision.DEFAULT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_projection_value_and_gradient_use_the_model_precision(dtype):
  """`project_logits` and the chunked log-probs' backward run their matmuls at the model's
  precision (HIGHEST in float32), like every matmul of the transformer."""
  from gmpo_jax.models import logprobs  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(TINY, dtype=dtype)
  hidden = jnp.ones((2, 4, config.hidden_size), config.dtype)
  unembed = jnp.ones((config.hidden_size, config.vocab_size), jnp.float32)
  targets = jnp.zeros((2, 4), jnp.int32)

  def precisions(fn, *args):
    found = []

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
          found.append(eqn.params["precision"])
        for param in eqn.params.values():
          for sub in param if isinstance(param, (tuple, list)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
              walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found

  expected = config.matmul_precision
  project = precisions(logprobs.project_logits, hidden, unembed)
  grad = precisions(
      jax.grad(
          lambda h, w: jnp.sum(logprobs.token_logprobs(h, w, targets, chunk_size=2)), argnums=(0, 1)
      ),
      hidden,
      unembed,
  )
  assert len(project) == 1 and len(grad) >= 3  # forward chunk, two backward products
  for precision in project + grad:
    assert precision in ((expected, expected), expected), precision


def test_every_parameter_has_logical_axis_names():
  model = nnx.eval_shape(lambda: tfm.Transformer(FULL, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) == 17
  for path, variable in flat:
    names = variable.get_metadata()["out_sharding"]
    assert len(names) == len(variable.get_value().shape), path
    assert set(names) <= LOGICAL_AXES, path
    assert (names[0] == "layers") == (path[0] == "blocks"), path
  by_path = {"/".join(map(str, path)): v.get_metadata()["out_sharding"] for path, v in flat}
  assert by_path["embedding"] == ("vocab", "embed")
  assert by_path["lm_head"] == ("embed", "vocab")
  assert by_path["blocks/attn/k_proj"] == ("layers", "embed", "kv_heads", "head_dim")
  assert by_path["blocks/mlp/down_proj"] == ("layers", "mlp", "embed")


def test_static_checks_reject_bad_inputs():
  model = _make(TINY)
  tokens = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(AssertionError):
    model(tokens, jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(AssertionError):
    model(tokens.astype(jnp.float32), tokens)
  with pytest.raises(AssertionError):
    model(tokens, tokens, key_mask=jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 128\), got \[0, 128\]"):
    model(tokens.at[1, 2].set(128), tokens)
