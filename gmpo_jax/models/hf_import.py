"""Load a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory into a `Transformer`.

Reads ``config.json`` and the weights from ``model.safetensors`` or a sharded
``model.safetensors.index.json``, from local files only (no hub access). Every tensor is
mapped onto the NNX model; PyTorch ``nn.Linear`` stores weights as [out, in], so kernels
are transposed and split into heads. The checkpoint must match the config exactly: a
missing tensor, an unexpected tensor or a wrong shape is an error, never a silent skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp

# bfloat16 safetensors are read through NumPy, which needs ml_dtypes' bfloat16 registered.
import ml_dtypes  # noqa: F401
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from gmpo_jax.models.transformer import Transformer, TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Non-persistent RoPE buffers that some older checkpoints saved anyway; recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class TensorTarget(NamedTuple):
  """Where one Hugging Face tensor goes.

  Attributes:
    path: the parameter's path in the NNX state, e.g. ('blocks', 'attn', 'q_proj').
    layer: index on the stacked `layers` axis, or None for unstacked parameters.
    hf_shape: the shape the checkpoint must store.
    to_model: HF layout → ours (transposes [out, in] and splits heads).
  """

  path: tuple[str, ...]
  layer: int | None
  hf_shape: tuple[int, ...]
  to_model: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def hf_tensor_targets(config: TransformerConfig) -> dict[str, TensorTarget]:
  """The Hugging Face tensor names a checkpoint of this config holds, and their targets.

  Args:
    config: the model config.

  Returns:
    {hf_name: TensorTarget}; ``lm_head.weight`` only when embeddings are untied.
    Example: ``model.layers.3.self_attn.k_proj.weight`` [K·head_dim, D] → blocks.attn.k_proj
    [L, D, K, head_dim] at layer 3.
  """
  d, h, k, hd, f, v = (
      config.hidden_size,
      config.num_heads,
      config.num_kv_heads,
      config.head_dim,
      config.intermediate_size,
      config.vocab_size,
  )

  def heads_in(n):  # [n*hd, D] -> [D, n, hd]
    return lambda w: w.T.reshape(d, n, hd)

  targets = {
      "model.embed_tokens.weight": TensorTarget(("embedding",), None, (v, d), _identity),
      "model.norm.weight": TensorTarget(("final_norm", "scale"), None, (d,), _identity),
  }
  if not config.tie_word_embeddings:
    targets["lm_head.weight"] = TensorTarget(("lm_head",), None, (v, d), _transpose)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    layer = {
        "input_layernorm.weight": (("attn_norm", "scale"), (d,), _identity),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), (d,), _identity),
        "self_attn.q_proj.weight": (("attn", "q_proj"), (h * hd, d), heads_in(h)),
        "self_attn.k_proj.weight": (("attn", "k_proj"), (k * hd, d), heads_in(k)),
        "self_attn.v_proj.weight": (("attn", "v_proj"), (k * hd, d), heads_in(k)),
        # [D, H*hd] -> [H, hd, D]
        "self_attn.o_proj.weight": (
            ("attn", "o_proj"),
            (d, h * hd),
            lambda w: w.T.reshape(h, hd, d),
        ),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), (f, d), _transpose),
        "mlp.up_proj.weight": (("mlp", "up_proj"), (f, d), _transpose),
        "mlp.down_proj.weight": (("mlp", "down_proj"), (d, f), _transpose),
    }
    if config.attention_bias:
      layer["self_attn.q_proj.bias"] = (("attn", "q_bias"), (h * hd,), lambda b: b.reshape(h, hd))
      layer["self_attn.k_proj.bias"] = (("attn", "k_bias"), (k * hd,), lambda b: b.reshape(k, hd))
      layer["self_attn.v_proj.bias"] = (("attn", "v_bias"), (k * hd,), lambda b: b.reshape(k, hd))
    if config.qk_norm:
      layer["self_attn.q_norm.weight"] = (("attn", "q_norm", "scale"), (hd,), _identity)
      layer["self_attn.k_norm.weight"] = (("attn", "k_norm", "scale"), (hd,), _identity)
    for name, (path, shape, fn) in layer.items():
      targets[p + name] = TensorTarget(("blocks",) + path, i, shape, fn)
  return targets


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (one file, or the index's shards)."""
  index_path = os.path.join(path, WEIGHTS_INDEX_FILE)
  single_path = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  elif os.path.isfile(single_path):
    files = [single_path]
  else:
    raise FileNotFoundError(
        f"No weights in {path!r}: expected {WEIGHTS_FILE!r} or {WEIGHTS_INDEX_FILE!r}."
    )
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"Checkpoint shard {file!r} (listed in the index) does not exist.")
  return files


@contextlib.contextmanager
def _open_shard(file: str) -> Iterator[Any]:
  """`safe_open(file)`; a truncated or corrupt file raises a ValueError that names it.

  safetensors' own error ("incomplete metadata, file not fully covered") does not say which
  file; it is chained as the cause.
  """
  try:
    with safe_open(file, framework="np") as reader:
      yield reader
  except SafetensorError as error:
    raise ValueError(f"Checkpoint shard {file!r} cannot be read: {error}") from error


def read_config(path: str | os.PathLike) -> TransformerConfig:
  """The `TransformerConfig` of a checkpoint directory's config.json (its dtype as
  `param_dtype` and `dtype`), without reading weights.

  Raises:
    FileNotFoundError: no config.json (the path is named).
  """
  config_path = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No Hugging Face config at {config_path!r}.")
  with open(config_path) as f:
    return TransformerConfig.from_hf_config(json.load(f))


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    param_dtype: Any = None,
    dtype: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Transformer, TransformerConfig]:
  """Builds a `Transformer` holding the weights of a local Hugging Face checkpoint.

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json with its shards).
    param_dtype: storage dtype of the parameters; default the checkpoint's dtype.
    dtype: compute dtype; default the resolved param_dtype.
    overrides: `TransformerConfig` fields set on the checkpoint's config last (the attention
      kernel, remat, ...; `gmpo_jax.config.CHECKPOINT_OVERRIDES` lists those a run may set).
      One that changes a weight's shape fails as a shape mismatch.

  Returns:
    (model, config). Weights are converted with [out, in] → [in, out] transposes; the
    model reproduces the Hugging Face logits (tests/models/test_hf_import.py).

  Raises:
    FileNotFoundError: config.json, the weights or a shard is missing (the path is named).
    ValueError: an unsupported config, a missing or unexpected tensor, a shape mismatch,
      tied embeddings whose stored lm_head.weight differs from the embedding, or a
      truncated or corrupt safetensors file ("Checkpoint shard '<file>' cannot be read: ...").
  """
  path = os.fspath(path)
  config = read_config(path)
  param_dtype = config.param_dtype if param_dtype is None else param_dtype
  config = dataclasses.replace(
      config,
      **{
          "param_dtype": param_dtype,
          "dtype": param_dtype if dtype is None else dtype,
          **(overrides or {}),
      },
  )

  targets = hf_tensor_targets(config)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  values = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), nnx.to_pure_dict(state))

  seen: set[str] = set()
  unexpected: list[str] = []
  stored_lm_head = None
  for file in _weight_files(path):
    with _open_shard(file) as reader:
      for name in reader.keys():
        if name.endswith(_IGNORED_SUFFIXES):
          continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
          stored_lm_head = reader.get_tensor(name)
          continue
        if name not in targets:
          unexpected.append(name)
          continue
        target = targets[name]
        shape = tuple(reader.get_slice(name).get_shape())
        if shape != target.hf_shape:
          raise ValueError(
              f"Tensor {name!r} in {file!r} has shape {shape}, expected {target.hf_shape} "
              "for this config.json."
          )
        node = values
        for key in target.path[:-1]:
          node = node[key]
        converted = target.to_model(reader.get_tensor(name)).astype(config.param_dtype)
        if target.layer is None:
          node[target.path[-1]] = converted
        else:
          node[target.path[-1]][target.layer] = converted
        seen.add(name)
  if unexpected:
    raise ValueError(
        f"Checkpoint {path!r} has {len(unexpected)} tensors this model does not use: "
        f"{sorted(unexpected)[:10]}."
    )
  missing = sorted(set(targets) - seen)
  if missing:
    raise ValueError(f"Checkpoint {path!r} is missing {len(missing)} tensors: {missing[:10]}.")
  if stored_lm_head is not None and not np.array_equal(
      stored_lm_head.astype(config.param_dtype), values["embedding"]
  ):
    raise ValueError(
        f"{path!r}: tie_word_embeddings=True but the stored lm_head.weight differs from "
        "model.embed_tokens.weight."
    )

  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, values))
  return nnx.merge(graphdef, state), config
