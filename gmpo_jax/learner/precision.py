"""Mixed precision of the learner: float32 masters, stochastic rounding, the update's footprint.

The trained parameters are float32 by default (`ModelConfig.param_dtype`), and the model casts
each weight to its compute dtype (`ModelConfig.dtype`, bfloat16 on accelerators) where it is
used, so the forward and backward passes run in bfloat16 while the optimizer adds its step to
float32 values. Kept in bfloat16 instead, a weight cannot take a step below half its ulp:
|Δw| < 2⁻⁹·|w|. At the GMPO paper's lr 1e-6 an AdamW step is ~1e-6, so every weight with
|w| > ~5e-4 (nearly all of a model initialised at N(0, 0.02²)) keeps its value: training runs,
logs a loss and changes nothing.

Parameters stored in bfloat16 are trained only with stochastic rounding
(`bfloat16_stochastic_rounding`): the new value is the upper bfloat16 neighbour of the float32
result with probability equal to its distance from the lower one, so the step survives in
expectation, E[SR(w + Δw)] = w + Δw (Gupta et al. 2015, "Deep Learning with Limited Numerical
Precision", arXiv 1502.02551; Zamirai et al. 2020, "Revisiting BFloat16 Training",
arXiv 2010.06192).

`update_statistics` measures what a step did to the stored parameters, inside the jitted update:
‖Δθ‖/‖θ‖ and the fraction of steps rounded away, the symptom of the failure above.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

# bfloat16 is the top half of a float32: sign, 8 exponent bits, 7 mantissa bits.
_LOW_BITS = 16

logger = logging.getLogger(__name__)
_HIGH_MASK = 0xFFFF0000


def float32_view(tree: Any) -> Any:
  """Every leaf as float32 (a no-op on float32 leaves): the optimizer's view of the parameters,
  whatever dtype stores them, so its moments and arithmetic are float32."""
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Every floating leaf as `dtype`, others unchanged (the sampler's copy of the parameters)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def stochastic_round_to_bfloat16(x: jax.Array, key: jax.Array) -> jax.Array:
  """x -> one of its two bfloat16 neighbours, the upper with probability (x − lo)/(hi − lo).

  Adds 16 uniform random bits to the low half of x's float32 bits and truncates them, so
  E[result] = x exactly for every finite float32 x (round-to-nearest is the same with the
  constant 2¹⁵ instead). Signs are sign-magnitude, so a negative x is rounded away from or
  towards zero with the same probabilities as |x|. Infinities stay infinite.

  Args:
    x: float32 array, any shape.
    key: a PRNG key.

  Returns:
    bfloat16 array of x's shape; every value is exactly a float32 neighbour's bfloat16.
  """
  chex.assert_type(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> _LOW_BITS
  rounded = (bits + noise) & jnp.uint32(_HIGH_MASK)
  return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


class StochasticRoundingState(NamedTuple):
  """The next rounding key, as raw uint32 key data (saved and restored like any array), so a
  resumed run rounds as the uninterrupted one."""

  key: jax.Array


def bfloat16_stochastic_rounding(seed: int) -> optax.GradientTransformation:
  """The last transformation of the optimizer of bfloat16-stored parameters: u -> u' with
  w + u' = SR_bf16(w + u), so the stored parameters take their step in expectation.

  The learner runs the optimizer on the float32 view of the parameters (`float32_view`) and
  casts `w + u'` back to the stored dtype, exactly, since it already is a bfloat16 value
  (w and SR(w + u) are bfloat16 values within a factor 2¹⁶ of each other for any step of a
  sane learning rate, so their float32 difference u' is exact). A rounded-away step has
  u' = 0: it was drawn, not lost, so `update_statistics` does not count it as lost.

  Args:
    seed: the rounding keys derive from it, one per step (in the state) and one per leaf.

  Returns:
    An optax transformation whose `update` needs `params`: the float32 view of the stored
    bfloat16 parameters.
  """

  def init(params):
    del params
    return StochasticRoundingState(key=jax.random.key_data(jax.random.key(seed)))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("bfloat16_stochastic_rounding rounds params + updates: pass params")
    key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(step_key, len(leaves))))

    def round_leaf(u, w, k):
      return stochastic_round_to_bfloat16(w + u, k).astype(jnp.float32) - w

    rounded = jax.tree.map(round_leaf, updates, params, keys)
    return rounded, StochasticRoundingState(key=jax.random.key_data(key))

  return optax.GradientTransformation(init, update)


class UpdateStats(NamedTuple):
  """What one optimizer step did to the stored parameters (float32 scalars).

  Attributes:
    relative_change: ‖θ_new − θ_old‖ / ‖θ_old‖ over every parameter (0 for a zero θ_old).
    lost_fraction: of the entries that the step's gradient reached (g ≠ 0) and the optimizer
      moved (u ≠ 0), the fraction whose stored value did not change (θ_new = θ_old): the step
      was rounded away in the stored dtype. 0 when there are none.
  """

  relative_change: jax.Array
  lost_fraction: jax.Array


def update_statistics(old: Any, new: Any, updates: Any, grads: Any) -> UpdateStats:
  """`UpdateStats` of the step old -> new made of `updates` from `grads` (same trees).

  Entries without a gradient are left out of `lost_fraction`: their only update is AdamW's
  decoupled weight decay, lr·λ·w (1e-8·w at lr 1e-6, λ 0.01), which float32 cannot resolve
  either (its ulp is 1.2e-7·w), in this and in every float32 AdamW; counted, the rows of a
  151k-token vocabulary that a batch never uses would read as a quarter of a model lost.

  Args:
    old / new: the stored parameters before and after the step (any float dtype).
    updates: the optimizer's float32 updates (after stochastic rounding, if any).
    grads: the float32 gradients of the step.

  Returns:
    `UpdateStats`; reductions only, so a cheap part of the jitted update.
  """
  delta = jax.tree.map(lambda n, o: n.astype(jnp.float32) - o.astype(jnp.float32), new, old)
  old_norm = optax.tree.norm(float32_view(old))
  change = optax.tree.norm(delta)
  relative = jnp.where(old_norm > 0, change / jnp.where(old_norm > 0, old_norm, 1.0), 0.0)

  def total(tree):
    # Per-leaf int32 sums (a leaf has < 2³¹ entries), then float32 across leaves.
    return sum(jnp.sum(x, dtype=jnp.int32).astype(jnp.float32) for x in jax.tree.leaves(tree))

  moved_entries = jax.tree.map(lambda u, g: (u != 0) & (g != 0), updates, grads)
  moved = total(moved_entries)
  lost = total(jax.tree.map(lambda m, n, o: m & (n == o), moved_entries, new, old))
  return UpdateStats(
      relative_change=relative,
      lost_fraction=jnp.where(moved > 0, lost / jnp.maximum(moved, 1.0), 0.0),
  )


class LostUpdateWarning:
  """Logs one warning, the first time a step's `lost_fraction` exceeds `threshold`.

  Args:
    threshold: the fraction of rounded-away steps that is not noise (1%: float32 masters lose
      none at any learning rate a run uses; bfloat16 masters at lr 1e-6 lose ~99%).
  """

  def __init__(self, threshold: float = 0.01):
    self.threshold, self.warned = threshold, False

  def __call__(self, lost_fraction: float, *, step: int, where: str) -> None:
    if self.warned or not lost_fraction > self.threshold:
      return
    self.warned = True
    logger.warning(
        "%s step %d: update/lost_fraction = %.3g: the stored parameters kept their value in "
        "%.1f%% of the entries that the update moved (the step is below half their ulp); train "
        "float32 masters (model.param_dtype='float32') or set optim.stochastic_rounding=True. "
        "Warned once.",
        where,
        step,
        lost_fraction,
        100 * lost_fraction,
    )
