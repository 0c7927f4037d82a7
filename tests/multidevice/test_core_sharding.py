"""Advantages and policy losses give the same numbers on 1 and 8 devices.

Three ways of spreading the work: `jax.vmap` over groups, `jax.pmap` across devices (data
parallel, global token/sequence counts via `psum`), and `jax.jit` over inputs placed with
`NamedSharding` on a `Mesh`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmpo_jax.algo import advantages as adv
from gmpo_jax.algo import losses

N_DEV = 8
B, G, T = 2, 4, 12  # B * G = 8 sequences: one group of sequences per device pair.

ESTIMATORS = sorted(adv.ADVANTAGE_ESTIMATORS)
OBJECTIVES = sorted(losses.POLICY_LOSSES)
# Hyperparameters without a default.
REQUIRED = {"power_mean": {"p": 0.5}}


def _rewards(seed, batch=N_DEV, group=G):
  rng = np.random.default_rng(seed)
  rewards = rng.lognormal(0.0, 2.0, size=(batch, group)).astype(np.float32)
  mask = rng.random((batch, group)) > 0.2
  mask[:, 0] = True
  return jnp.asarray(rewards), jnp.asarray(mask)


def _rollout_batch(seed, n=N_DEV * 2):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, size=(n, T)).astype(np.float32)
  logp = old + rng.normal(0.0, 0.3, size=(n, T)).astype(np.float32)
  ref = old + rng.normal(0.0, 0.2, size=(n, T)).astype(np.float32)
  lengths = rng.integers(1, T + 1, size=n)
  mask = np.arange(T)[None, :] < lengths[:, None]
  advantages = rng.normal(size=n).astype(np.float32)
  return tuple(map(jnp.asarray, (logp, old, ref, mask, advantages)))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_advantages_vmap_pmap_and_mesh_equal_single_device(name):
  fn = adv.get_advantage_fn(name, **REQUIRED.get(name, {}))
  rewards, mask = _rewards(seed=len(name))
  expected = np.asarray(jax.jit(fn)(rewards, mask))

  # vmap over groups: each call sees a [1, G] batch.
  per_group = jax.vmap(lambda r, m: fn(r[None], m[None])[0])(rewards, mask)
  if name != "batch_std":  # batch_std couples groups: only whole-batch placements apply.
    np.testing.assert_allclose(per_group, expected, rtol=1e-6, atol=1e-6)
    # pmap: one group per device.
    pmapped = jax.pmap(lambda r, m: fn(r[None], m[None])[0])(rewards, mask)
    np.testing.assert_allclose(pmapped, expected, rtol=1e-6, atol=1e-6)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data", None))
  sharded = jax.jit(fn, out_shardings=sharding)(
      jax.device_put(rewards, sharding), jax.device_put(mask, sharding)
  )
  assert sharded.sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_allclose(sharded, expected, rtol=1e-6, atol=1e-6)


def _loss_kwargs(name):
  kwargs = dict(ref_logp=None, beta=0.0)
  if name == "token_clip":
    kwargs.update(loss_agg_mode="token-mean")
  return kwargs


@pytest.mark.parametrize("name", OBJECTIVES)
def test_loss_and_grad_pmap_with_global_counts_equal_single_device(name):
  loss_fn = losses.get_policy_loss(name, **REQUIRED.get(name, {}))
  logp, old, ref, mask, advantages = _rollout_batch(seed=len(name))

  def loss(lp, o, r, m, a, **counts):
    value, _ = loss_fn(lp, o, a, m, ref_logp=r, beta=0.05, **counts)
    return value

  expected_loss, expected_grad = jax.jit(jax.value_and_grad(loss))(logp, old, ref, mask, advantages)

  def per_device(lp, o, r, m, a):
    counts = dict(
        num_sequences=jax.lax.psum(jnp.asarray(lp.shape[0], jnp.float32), "d"),
        num_tokens=jax.lax.psum(jnp.sum(m.astype(jnp.float32)), "d"),
    )
    value, grad = jax.value_and_grad(functools.partial(loss, **counts))(lp, o, r, m, a)
    return jax.lax.psum(value, "d"), grad

  split = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
  value, grad = jax.pmap(per_device, axis_name="d")(*map(split, (logp, old, ref, mask, advantages)))
  np.testing.assert_allclose(value[0], expected_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad.reshape(expected_grad.shape), expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_loss_under_mesh_sharding_equals_single_device(name):
  loss_fn = losses.get_policy_loss(name, **REQUIRED.get(name, {}))
  logp, old, ref, mask, advantages = _rollout_batch(seed=3 + len(name))

  def loss(lp, o, r, m, a):
    value, extras = loss_fn(lp, o, a, m, ref_logp=r, beta=0.05)
    return value, extras

  value_and_grad = jax.value_and_grad(loss, has_aux=True)
  (expected, expected_extras), expected_grad = jax.jit(value_and_grad)(
      logp, old, ref, mask, advantages
  )

  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  rows = NamedSharding(mesh, P("data", None))
  vec = NamedSharding(mesh, P("data"))
  placed = [jax.device_put(x, rows) for x in (logp, old, ref, mask)] + [
      jax.device_put(advantages, vec)
  ]
  (value, extras), grad = jax.jit(value_and_grad)(*placed)
  np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)
  for got, want in zip(extras, expected_extras):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
