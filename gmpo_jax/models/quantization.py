"""Frozen weights stored in int8 or NF4 for QLoRA, dequantized where they are used.

Blockwise absmax quantization: the last axis of a weight is cut into blocks of `block_size`
elements (64, or the largest power of two that divides a shorter last axis), and each block is
stored as codes q with one float32 scale s = max |w| over the block.

- 'int8': w ≈ s · q / 127, q = round(127 · w / s) in [−127, 127]. Error ≤ s / 254 per element
  (half a step).
- 'nf4': w ≈ s · NF4[q], q the index of the nearest of the 16 NormalFloat levels (Dettmers et
  al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, Appendix E: the
  quantiles of N(0, 1) rescaled to [−1, 1], with an exact zero), two codes packed per byte.
  Error ≤ s · NF4_MAX_HALF_GAP = s · 0.1385 per element (half the widest gap between levels,
  0.7230 → 1.0).

Only the frozen base of a LoRA policy is stored this way (`gmpo_jax.models.lora.quantize_base`);
the model reads any weight through `weight_value`, which dequantizes a `QuantizedWeight` to the
compute dtype inside the program, one layer at a time under the layer scan, so a full-precision
copy of the whole base never exists.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QUANTIZED_DTYPES = ("int8", "nf4")
BLOCK_SIZE = 64

# The 16 NF4 levels of QLoRA (bitsandbytes' `nf4` table), increasing.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)


def block_size_for(last: int) -> int:
  """`BLOCK_SIZE`, or the largest power of two dividing `last` when that is smaller."""
  return math.gcd(BLOCK_SIZE, last)


def max_abs_error(scales: jax.Array, kind: str) -> jax.Array:
  """The documented bound on |w − dequantize(quantize(w))| of each block (`scales` [..., nb])."""
  return scales * (1.0 / 254.0 if kind == "int8" else NF4_MAX_HALF_GAP)


def quantize(w: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
  """(codes, scales) of `w` [..., n]: int8 codes [..., n] or NF4 bytes [..., n/2] (uint8, low
  nibble first), float32 scales [..., n / block]."""
  if kind not in QUANTIZED_DTYPES:
    raise ValueError(f"unknown quantization {kind!r}; use one of {QUANTIZED_DTYPES}")
  n = w.shape[-1]
  if kind == "nf4" and n % 2:
    raise ValueError(f"NF4 packs two codes per byte: the last axis ({n}) must be even")
  block = block_size_for(n)
  blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], n // block, block)
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  # An all-zero block keeps scale 0 and dequantizes to 0; divide by 1 there instead.
  normalized = blocks / jnp.where(scales == 0, 1.0, scales)[..., None]
  if kind == "int8":
    codes = jnp.round(normalized * 127.0).astype(jnp.int8).reshape(w.shape)
    return codes, scales
  levels = jnp.asarray(NF4_LEVELS)
  index = jnp.argmin(jnp.abs(normalized[..., None] - levels), axis=-1).astype(jnp.uint8)
  index = index.reshape(*w.shape[:-1], n // 2, 2)
  return index[..., 0] | (index[..., 1] << 4), scales


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, dtype: Any) -> jax.Array:
  """The inverse of `quantize`, in `dtype`."""
  if kind == "int8":
    values = codes.astype(jnp.float32) / 127.0
  else:
    low, high = codes & 0xF, codes >> 4
    index = jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    values = jnp.asarray(NF4_LEVELS)[index]
  n = values.shape[-1]
  block = block_size_for(n)
  values = values.reshape(*values.shape[:-1], n // block, block) * scales[..., None]
  return values.reshape(*values.shape[:-2], n).astype(dtype)


class QuantizedWeight(nnx.Module):
  """A frozen weight as int8 / NF4 codes and float32 block scales (see the module docstring).

  Both keep the weight's logical axis names (the last axis shorter), so the sharding rules
  place them like the weight they replace.
  """

  def __init__(self, weight: nnx.Param, kind: str):
    codes, scales = quantize(weight[...], kind)
    axes = weight.get_metadata().get("out_sharding")
    self.kind = kind
    self.codes = nnx.Param(codes, out_sharding=axes, eager_sharding=False)
    self.scales = nnx.Param(scales, out_sharding=axes, eager_sharding=False)

  def dequantize(self, dtype: Any) -> jax.Array:
    return dequantize(self.codes[...], self.scales[...], self.kind, dtype)


def weight_value(weight: nnx.Param | QuantizedWeight, dtype: Any) -> jax.Array:
  """A weight in the compute dtype, whether stored as a parameter or quantized."""
  if isinstance(weight, QuantizedWeight):
    return weight.dequantize(dtype)
  return weight[...].astype(dtype)
