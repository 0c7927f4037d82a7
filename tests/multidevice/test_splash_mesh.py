"""Splash attention on a mesh: inside `shard_map`, rows over data x fsdp and heads over tensor.

A Mosaic kernel cannot be partitioned by XLA, so `attention.splash_attention` runs it per device
under `jax.shard_map` when traced under `jax.set_mesh`. On 8 simulated CPU devices, in the
Pallas interpreter, the sharded call must give blockwise attention's values on the real query
rows and its gradients, both where every dimension splits and where none divides (rows and heads
then replicated), and the program must really split q over the mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmpo_jax.infra import sharding
from gmpo_jax.models import attention as attn

HIGHEST = jax.lax.Precision.HIGHEST


def _case(batch, length, heads, kv_heads, dim, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
  k, v = (
      jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
      for _ in range(2)
  )
  # Left padding of different widths, an interior hole and right padding.
  key_mask = np.ones((batch, length), bool)
  key_mask[:, :1] = False
  key_mask[1 % batch, :9] = False
  key_mask[0, 12:15] = False
  key_mask[batch - 1, length - 3 :] = False
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * key_mask[:, :, None, None]
  return q, k, v, jnp.asarray(key_mask), weights


def _value_and_grads(kernel, q, k, v, key_mask, weights):
  loss = lambda *a: jnp.sum(kernel(*a, key_mask) * weights)
  return jax.jit(lambda *a: (kernel(*a, key_mask), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)


SPLASH = functools.partial(attn.splash_attention, block_size=128, interpret=True)
BLOCKWISE = functools.partial(attn.blockwise_attention, block_size=16, precision=HIGHEST)


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "mesh_shape,batch,heads,kv_heads,q_spec",
    [
        # Rows over data x fsdp = 4, the 2 KV heads (and 4 query heads) over tensor = 2.
        ((2, 2, 2), 4, 4, 2, '[{"data", "fsdp"}, {}, {"tensor"}, {}]'),
        # 2 rows on fsdp = 4 and one KV head on tensor = 2 divide neither: replicated.
        ((1, 4, 2), 2, 3, 1, None),
    ],
)
def test_sharded_splash_equals_blockwise(mesh_shape, batch, heads, kv_heads, q_spec):
  q, k, v, key_mask, weights = _case(batch, 29, heads, kv_heads, 8, seed=sum(mesh_shape))
  ref, ref_grads = _value_and_grads(BLOCKWISE, q, k, v, key_mask, weights)
  data, fsdp, tensor = mesh_shape
  with jax.set_mesh(sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)):
    out, grads = _value_and_grads(SPLASH, q, k, v, key_mask, weights)
    lowered = jax.jit(SPLASH).lower(q, k, v, key_mask).as_text()
  assert "sdy.manual_computation" in lowered
  if q_spec is not None:
    assert q_spec in lowered
  real = np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-4)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-4 * float(jnp.abs(r).max()), err_msg=name)
