"""LoRA and QLoRA adapters on the transformer's projections.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685):
a frozen weight W [in..., out...] is used as W + (α/r)·A·B with A [in..., r] and B [r, out...]
trained; B starts at zero, so the adapted model starts as the base. QLoRA (Dettmers et al. 2023,
arXiv 2305.14314): the frozen base is stored quantized (`gmpo_jax.models.quantization`).

Why our own adapters and not qwix or `nnx.LoRA`: the projections here are raw parameters with
head-split shapes (q/k/v [D, H, hd], o [H, hd, D]) contracted by `transformer.contract` inside a
`lax.scan` over layers stacked on a leading axis, not `nnx.Linear` layers. qwix's LoRA provider
intercepts `nnx.Linear` / einsum / dot_general calls by module path at trace time, and
`nnx.LoRA` wraps a 2-D kernel; either would need the model rewritten around them. An adapter
here is an `nnx.Module` attached beside the weight it adapts (`<name>_lora`), stacked over
layers like it, which the forward adds as scale·(x·A)·B (`transformer.linear`), so every program
that runs the model (learner, sampler, evaluation) runs the adapted model unchanged.

Module paths, the names `LoRAConfig.targets` matches in full: 'blocks/attn/q_proj',
'blocks/attn/k_proj', 'blocks/attn/v_proj', 'blocks/attn/o_proj', 'blocks/mlp/gate_proj',
'blocks/mlp/up_proj', 'blocks/mlp/down_proj'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmpo_jax.models import quantization
from gmpo_jax.models.transformer import Transformer, contract

# Each adaptable projection: its module path and the number of leading (input) axes of W.
PROJECTIONS: dict[str, int] = {
    "blocks/attn/q_proj": 1,
    "blocks/attn/k_proj": 1,
    "blocks/attn/v_proj": 1,
    "blocks/attn/o_proj": 2,
    "blocks/mlp/gate_proj": 1,
    "blocks/mlp/up_proj": 1,
    "blocks/mlp/down_proj": 1,
}
BASE_DTYPES = ("float32", "bfloat16", "float16") + quantization.QUANTIZED_DTYPES


class LoRAParam(nnx.Param):
  """An adapter matrix: the only parameters a LoRA run trains (the update's filter)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """`config.model.lora`: low-rank adapters on the projections, the base frozen.

  Attributes:
    rank: r, the inner dimension of A·B (> 0).
    alpha: α; the update is scaled by α / r (PEFT's default convention, not rsLoRA's).
    dropout: only 0.0. A dropped-out forward pass is another policy than the one that sampled
      the rollout: the importance ratio at unchanged parameters would not be 1, and the clip of
      GMPO / PPO would bind on dropout noise.
    targets: a regex matched in full against the module paths in `PROJECTIONS`; it must match
      at least one.
    base_dtype: how the frozen base is stored: 'float32', 'bfloat16', 'float16', or quantized,
      'int8' or 'nf4' (QLoRA); None: the model's compute dtype. The embedding and norms, which
      carry no adapter, are cast, never quantized.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = ".*"
  base_dtype: str | None = None

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f"rank={self.rank!r} must be an int > 0")
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"alpha={self.alpha!r} must be a finite number > 0")
    if self.dropout != 0.0:
      raise ValueError(
          f"dropout={self.dropout!r}: only 0.0 is supported; a dropped-out forward is another "
          "policy than the sampler's, so the importance ratio would clip on dropout noise"
      )
    try:
      pattern = re.compile(self.targets)
    except (re.error, TypeError) as error:
      raise ValueError(f"targets={self.targets!r} is not a regex: {error}") from error
    if not any(pattern.fullmatch(path) for path in PROJECTIONS):
      raise ValueError(
          f"targets={self.targets!r} matches none of the adaptable module paths "
          f"{list(PROJECTIONS)}"
      )
    if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"base_dtype={self.base_dtype!r} is not one of {BASE_DTYPES} or None")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def target_paths(self) -> tuple[str, ...]:
    pattern = re.compile(self.targets)
    return tuple(path for path in PROJECTIONS if pattern.fullmatch(path))


class LoRA(nnx.Module):
  """scale · (x · A) · B for a weight with `axes` input axes, stacked over layers like it.

  A [L, in..., r] starts uniform in ±1/√(fan-in) (PEFT's Kaiming-uniform with a = √5), B
  [L, r, out...] at zero. Both keep the weight's logical axis names (the rank axis unnamed, so
  replicated), so they shard like the weight.
  """

  def __init__(
      self,
      weight_shape: tuple[int, ...],
      weight_axes: tuple[Any, ...],
      *,
      axes: int,
      rank: int,
      scale: float,
      key: jax.Array,
  ):
    layers, inputs, outputs = weight_shape[:1], weight_shape[1 : 1 + axes], weight_shape[1 + axes :]
    bound = 1.0 / math.sqrt(math.prod(inputs))
    a = jax.random.uniform(key, (*layers, *inputs, rank), jnp.float32, -bound, bound)
    self.a = LoRAParam(a, out_sharding=(*weight_axes[: 1 + axes], None), eager_sharding=False)
    self.b = LoRAParam(
        jnp.zeros((*layers, rank, *outputs), jnp.float32),
        out_sharding=(weight_axes[0], None, *weight_axes[1 + axes :]),
        eager_sharding=False,
    )
    self.axes, self.scale = axes, scale

  def __call__(self, x: jax.Array, *, dtype: Any, precision: jax.lax.Precision) -> jax.Array:
    low = contract(x, self.a[...].astype(dtype), axes=self.axes, precision=precision)
    return self.scale * contract(low, self.b[...].astype(dtype), axes=1, precision=precision)

  def delta(self) -> jax.Array:
    """scale · A·B in the weight's shape [L, in..., out...], float32."""
    a, b = self.a[...], self.b[...]
    a2 = a.reshape(a.shape[0], -1, a.shape[-1])
    b2 = b.reshape(b.shape[0], b.shape[1], -1)
    delta = jnp.einsum("lir,lro->lio", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return self.scale * delta.reshape(a.shape[:-1] + b.shape[2:])


def _owner(model: Transformer, path: str) -> tuple[nnx.Module, str]:
  *parents, name = path.split("/")
  node = model
  for parent in parents:
    node = getattr(node, parent)
  return node, name


def apply_lora(model: Transformer, config: LoRAConfig, *, seed: int) -> Transformer:
  """Stores `model`'s frozen base as `config.base_dtype` and attaches adapters to the targets.

  In place; returns `model`. With a quantized `base_dtype` all seven projections of every layer
  are quantized (QLoRA quantizes every linear layer, adapted or not), from their values before
  any cast; the embedding and the norm scales are stored in the compute dtype. The adapters are
  float32 (the trained masters); their A draws from `seed`, one key per target in the order of
  `PROJECTIONS`.
  """
  base_dtype = config.base_dtype or model.config.dtype.name
  quantized = base_dtype in quantization.QUANTIZED_DTYPES
  replaced = {}
  keys = jax.random.split(jax.random.key(seed), len(PROJECTIONS))
  for key, (path, axes) in zip(keys, PROJECTIONS.items()):
    owner, name = _owner(model, path)
    weight = getattr(owner, name)
    if quantized:
      replaced[(owner, name)] = quantization.QuantizedWeight(weight, base_dtype)
    if path in config.target_paths:
      replaced[(owner, f"{name}_lora")] = LoRA(
          weight.shape,
          weight.get_metadata().get("out_sharding"),
          axes=axes,
          rank=config.rank,
          scale=config.scale,
          key=key,
      )
  float_dtype = model.config.dtype if quantized else jnp.dtype(base_dtype)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      node.set_value(node[...].astype(float_dtype))
  for (owner, name), module in replaced.items():
    setattr(owner, name, module)
  return model


def split_adapters(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(the adapters, the frozen base) of an adapted model's state."""
  return nnx.split_state(params, LoRAParam, ...)


def merge_adapters(model: Transformer) -> Transformer:
  """A plain `Transformer` (no adapters, every weight in `model.config.param_dtype`) holding
  W + scale·A·B for every adapted weight, the quantized ones dequantized first; the
  checkpoint `hf_export.export_hf` writes for a LoRA policy."""
  config = model.config
  merged = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  for path, variable in nnx.iter_graph(merged):
    if not isinstance(variable, nnx.Param):
      continue
    names = [str(p) for p in path]
    owner, name = _owner(model, "/".join(names))
    stored = getattr(owner, name)
    value = quantization.weight_value(stored, jnp.float32)
    adapter = getattr(owner, f"{name}_lora", None)
    if adapter is not None:
      value = value + adapter.delta()
    variable.set_value(value.astype(config.param_dtype))
  return merged


def fingerprint(params: Any) -> str:
  """A short hex digest of a parameter tree's values, shapes, dtypes and paths.

  Each leaf is reduced on its devices to a position-weighted sum of its bits (integer
  arithmetic modulo 2^32, so the sharding and the reduction order change nothing), and the
  host hashes the sums with the leaves' paths, shapes and dtypes: one changed bit anywhere
  changes the digest, and no leaf is copied to the host.
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(
      nnx.to_flat_state(params)
      if isinstance(params, nnx.State)
      else jax.tree_util.tree_flatten_with_path(params)[0],
      key=lambda item: str(item[0]),
  ):
    value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
    digest.update(f"{path}|{value.shape}|{value.dtype}|".encode())
    digest.update(int(_bits_checksum(value)).to_bytes(4, "little"))
  return digest.hexdigest()[:16]


@jax.jit
def _bits_checksum(x: jax.Array) -> jax.Array:
  bits = x.reshape(-1)
  if bits.dtype.itemsize == 1:
    bits = bits.view(jnp.uint8).astype(jnp.uint32)
  elif bits.dtype.itemsize == 2:
    bits = bits.view(jnp.uint16).astype(jnp.uint32)
  else:
    bits = bits.view(jnp.uint32)
  # Odd multipliers per position (Knuth's multiplicative hash), so a permutation changes it.
  weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def adapter_count(params: nnx.State) -> int:
  """The number of trained (adapter) parameters."""
  adapters, _ = split_adapters(params)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))
