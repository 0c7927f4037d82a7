"""A small Transformer whose predictions depend on the context, shared by the log-prob,
sampling and decode-loop tests."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models import logprobs as lp
from gmpo_jax.models import transformer as tfm

# A small model with random weights large enough that its predictions depend on the context.
CONTEXT_CONFIG = dataclasses.replace(
    tfm.TransformerConfig.from_name('tiny'), vocab_size=50, tie_word_embeddings=False
)


@functools.cache
def context_model():
  # Built abstractly and filled from NumPy: constructing it eagerly costs seconds of op
  # compilation on a CPU. Weights of scale 0.15 make predictions depend on the context.
  model = nnx.eval_shape(lambda: tfm.Transformer(CONTEXT_CONFIG, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  nnx.update(
      model,
      jax.tree.map(
          lambda x: jnp.asarray(
              0.15 * rng.standard_normal(x.shape)
              if len(x.shape) > 1
              else 1.0 + 0.2 * rng.standard_normal(x.shape),
              x.dtype,
          ),
          nnx.state(model, nnx.Param),
      ),
  )
  return model


@nnx.jit
def full_logits(model, tokens, key_mask):
  hidden, _ = model(tokens, lp.positions_from_mask(key_mask), key_mask=key_mask)
  return model.logits(hidden)
