"""Random learner batches of the tiny model, shared by the learner and LoRA tests."""

import jax.numpy as jnp
import numpy as np

from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.models.transformer import TransformerConfig

CONFIG = TransformerConfig.from_name("tiny")
N, T = 8, 10


def sequences(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (N, T)).astype(np.int32)
  prompt = rng.integers(2, 5, N)
  length = prompt + rng.integers(1, T - 4, N)
  cols = np.arange(T)[None]
  key_mask = cols < length[:, None]
  loss_mask = key_mask & (cols >= prompt[:, None])
  old = np.where(loss_mask, rng.normal(-4.0, 0.3, (N, T)), 0.0).astype(np.float32)
  return learner.Batch(
      tokens=jnp.asarray(tokens),
      positions=positions_from_mask(jnp.asarray(key_mask)),
      key_mask=jnp.asarray(key_mask),
      loss_mask=jnp.asarray(loss_mask),
      old_logp=jnp.asarray(old),
      ref_logp=jnp.asarray(old + 0.1),
      advantages=jnp.asarray(rng.normal(size=N), jnp.float32),
  )
