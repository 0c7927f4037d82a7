"""Write a `Transformer`'s parameters as a Hugging Face Llama / Qwen2 / Qwen3 checkpoint.

The inverse of `gmpo_jax.models.hf_import`: the same tensor names, shapes and targets
(`hf_import.hf_tensor_targets`), each parameter turned back into PyTorch's ``nn.Linear``
[out, in] layout, so that ``load_hf_checkpoint`` of an export gives back the exported
parameters bit for bit and ``transformers.AutoModelForCausalLM`` computes the same logits
(tests/models/test_hf_export.py). The family follows from the config: q/k/v biases are Qwen2, per-head
q/k RMSNorm is Qwen3, neither is Llama.

An export directory holds::

    config.json                      transformers-5 keys, plus the older rope_theta,
                                     rope_scaling and torch_dtype for older readers
    generation_config.json           special token ids (and the sampling settings given)
    model.safetensors                or model-0000i-of-0000n.safetensors shards of at most
    model.safetensors.index.json       `max_shard_size` bytes, with their index
    tokenizer files                  when a tokenizer is given (see `export_hf`)
    README.md                        a model card: architecture, tokenizer, the caller's notes

Tied embeddings stay tied: no ``lm_head.weight`` is written, ``tie_word_embeddings`` is true.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# bfloat16 arrays are cast and written through NumPy, which needs ml_dtypes' bfloat16.
import ml_dtypes  # noqa: F401
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers, processors

from gmpo_jax.models import tokenization
from gmpo_jax.models.hf_import import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    hf_tensor_targets,
)
from gmpo_jax.models.transformer import Transformer, TransformerConfig

GENERATION_CONFIG_FILE = "generation_config.json"
CARD_FILE = "README.md"
MAX_SHARD_SIZE = 5 * 10**9
"""Largest shard in bytes by default: the 5 GB of transformers' ``save_pretrained``."""

# The files of a Hugging Face tokenizer directory that are copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# The special tokens of the tokenizer.json written for `CharTokenizer` (ids 0, 1, 2).
CHAR_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")

_FAMILIES = {  # (attention_bias, qk_norm) -> (model_type, architecture)
    (False, False): ("llama", "LlamaForCausalLM"),
    (True, False): ("qwen2", "Qwen2ForCausalLM"),
    (False, True): ("qwen3", "Qwen3ForCausalLM"),
}


class SpecialTokens(NamedTuple):
  """The ids config.json and generation_config.json name; None where unknown."""

  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None


def hf_family(config: TransformerConfig) -> tuple[str, str]:
  """(model_type, architecture) of a config: 'llama', 'qwen2' (q/k/v bias) or 'qwen3' (q/k norm).

  Raises:
    ValueError: q/k/v biases together with q/k norm, which no supported family has.
  """
  family = _FAMILIES.get((config.attention_bias, config.qk_norm))
  if family is None:
    raise ValueError(
        "Cannot export a model with both attention_bias=True and qk_norm=True: Qwen2 has q/k/v "
        "biases without q/k norm, Qwen3 q/k norm without biases, and Llama neither."
    )
  return family


def hf_config(
    config: TransformerConfig, *, dtype: Any = None, special_tokens: SpecialTokens = SpecialTokens()
) -> dict[str, Any]:
  """The config.json of an export, which `TransformerConfig.from_hf_config` reads back.

  Args:
    config: the model config.
    dtype: the stored dtype ('float32', 'bfloat16', 'float16'); default `config.param_dtype`.
    special_tokens: the tokenizer's ids (None where unknown).

  Returns:
    A JSON-serializable dict with both the transformers-5 keys (``rope_parameters``,
    ``dtype``) and the older ``rope_theta``, ``rope_scaling`` and ``torch_dtype``.

  Raises:
    ValueError: a config no supported family expresses (see `hf_family`).
  """
  model_type, architecture = hf_family(config)
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype).name
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  scaling = None
  if config.rope_scaling is not None:
    s = config.rope_scaling
    scaling = {"rope_type": s.rope_type, "factor": s.factor}
    if s.rope_type == "llama3":
      scaling.update(
          low_freq_factor=s.low_freq_factor,
          high_freq_factor=s.high_freq_factor,
          original_max_position_embeddings=s.original_max_position_embeddings,
      )
    rope.update(scaling)
  out = {
      "architectures": [architecture],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "rope_parameters": rope,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "dtype": dtype,
      "torch_dtype": dtype,
      "bos_token_id": special_tokens.bos_id,
      "eos_token_id": special_tokens.eos_id,
      "pad_token_id": special_tokens.pad_id,
  }
  if model_type == "llama":
    # Llama's `attention_bias` would add an o_proj bias too; this model has none.
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3":
      out["attention_bias"] = False
  return out


def _from_model(name: str, hf_shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """Ours → the HF layout of tensor `name`: the inverse of `hf_import`'s `to_model`.

  A linear layer's kernel is stored [in..., out...] here (heads split: q/k/v [D, n, hd], o
  [H, hd, D]) and [out, in] by PyTorch; the embedding ([V, D] in both), norm scales and biases
  only change shape.
  """
  if len(hf_shape) == 2 and name != "model.embed_tokens.weight":
    return lambda x: x.reshape(hf_shape[::-1]).T
  return lambda x: x.reshape(hf_shape)


def _flat_params(params: Any) -> dict[tuple[str, ...], Any]:
  """{path: array} of a Transformer, its `nnx.State`, or the state's pure dict."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(prefix + (str(key),), value)
    else:
      flat[prefix] = node

  visit((), params)
  return flat


def _checked_params(params: Any, config: TransformerConfig) -> dict[tuple[str, ...], Any]:
  """The flat parameters, checked to be exactly those of a `Transformer(config)`.

  Raises:
    ValueError: a parameter this config's checkpoint has no tensor for (an adapter, say),
      a missing parameter, or a shape other than the config's.
  """
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  expected = {
      tuple(map(str, path)): leaf.shape
      for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }
  flat = _flat_params(params)
  extra = sorted(".".join(p) for p in set(flat) - set(expected))
  if extra:
    raise ValueError(
        f"Cannot export parameters {extra[:10]}: a Hugging Face {hf_family(config)[0]} "
        "checkpoint of this config has no tensor for them."
    )
  missing = sorted(".".join(p) for p in set(expected) - set(flat))
  if missing:
    raise ValueError(f"The parameters lack {missing[:10]}, which this config's model has.")
  for path, shape in sorted(expected.items()):
    if tuple(np.shape(flat[path])) != tuple(shape):
      raise ValueError(
          f"Parameter {'.'.join(path)} has shape {tuple(np.shape(flat[path]))}, "
          f"the config's model {tuple(shape)}."
      )
  return flat


def check_out_dir(out_dir: str | os.PathLike) -> None:
  """Raises FileExistsError unless `out_dir` is absent or an empty directory."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"{out_dir} exists and is not an empty directory; export elsewhere.")


@contextlib.contextmanager
def staged_directory(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
  """A new directory beside `out_dir` to write an export into, renamed to `out_dir` when the
  block ends, removed if it raises: a reader never sees a half-written export.

  `out_dir` must not exist or be empty (`check_out_dir`). The files get the modes the umask
  gives (mkdtemp and safetensors create owner-only entries).
  """
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    yield staging
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.iterdir():
      path.chmod(0o666 & ~umask)
    staging.chmod(0o777 & ~umask)
    if out_dir.exists():
      out_dir.rmdir()  # empty (checked); os.replace would also replace it on POSIX only
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
  """Consecutive tensors into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
  shards: list[list[str]] = []
  used = 0
  for name, size in sizes.items():
    if not shards or used + size > max_shard_size:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  return shards


def char_tokenizer() -> tokenizers.Tokenizer:
  """A Hugging Face tokenizer with `tokenization.CharTokenizer`'s ids, BOS added like the runner.

  One token per character (``'\\n'`` → 3, ``' '`` .. ``'~'`` → 4 .. 98), the special tokens
  `CHAR_SPECIAL_TOKENS` at ids 0 (pad), 1 (bos), 2 (eos), and a post-processor that puts BOS
  first, as `gmpo_jax.train.encode_batch` does. Decoding joins the characters. It differs from
  `CharTokenizer` only on text that contains a special token's string (one id here, its
  characters there) and on characters outside the vocabulary (an error in both, worded apart).
  """
  vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS)}
  offset = len(vocab)
  vocab.update({c: offset + i for i, c in enumerate(tokenization.CharTokenizer.CHARACTERS)})
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIAL_TOKENS]
  )
  bos = CHAR_SPECIAL_TOKENS[tokenization.CharTokenizer.BOS]
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A",
      pair=f"{bos} $A {bos} $B",
      special_tokens=[(bos, tokenization.CharTokenizer.BOS)],
  )
  return tokenizer


def _write_tokenizer(
    tokenizer: str | os.PathLike, directory: pathlib.Path, max_length: int
) -> tuple[SpecialTokens, str]:
  """Writes the tokenizer files into `directory`; returns its ids and a line for the card."""
  if tokenizer == "char":
    char_tokenizer().save(str(directory / "tokenizer.json"))
    pad, bos, eos = CHAR_SPECIAL_TOKENS
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "model_max_length": max_length,
            # Spaces are characters here; transformers must not "clean them up" when decoding.
            "clean_up_tokenization_spaces": False,
        },
    )
    char = tokenization.CharTokenizer()
    note = (
        "`tokenizer.json` was generated to reproduce gmpo_jax's `CharTokenizer` (one id per "
        f"character; `{pad}`, `{bos}`, `{eos}` at ids 0, 1, 2; BOS is added in front)."
    )
    return SpecialTokens(char.bos_id, char.eos_id, char.pad_id), note
  source = pathlib.Path(tokenizer)
  source_dir = source if source.is_dir() else source.parent
  loaded = tokenization.load_tokenizer(source)  # its errors name a missing tokenizer.json
  for name in TOKENIZER_FILES:
    if (source_dir / name).is_file():
      shutil.copyfile(source_dir / name, directory / name)
  return (
      SpecialTokens(loaded.bos_id, loaded.eos_id, loaded.pad_id),
      f"The tokenizer files are copies of those in `{source_dir}`.",
  )


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def _card(
    config: TransformerConfig,
    dtype: np.dtype,
    num_params: int,
    tokenizer_note: str,
    notes: str | None,
) -> str:
  model_type, architecture = hf_family(config)
  lines = [
      "---",
      "library_name: transformers",
      "tags:",
      "- gmpo_jax",
      "---",
      "",
      f"# A {model_type} policy exported from gmpo_jax",
      "",
      f"`{architecture}`, {num_params:,} parameters stored as {dtype.name}: "
      f"{config.num_layers} layer(s), hidden size {config.hidden_size}, {config.num_heads} query / "
      f"{config.num_kv_heads} key-value heads of width {config.head_dim}, MLP width "
      f"{config.intermediate_size}, vocabulary {config.vocab_size}, "
      f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings. Written by "
      "`gmpo_jax.export_hf`; `gmpo_jax.models.load_hf_checkpoint` reads it back.",
      "",
      tokenizer_note,
  ]
  if notes:
    lines += ["", notes.strip()]
  return "\n".join(lines) + "\n"


def export_hf(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    tokenizer: str | os.PathLike | None = None,
    generation: Mapping[str, Any] | None = None,
    card: str | None = None,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> pathlib.Path:
  """Writes a Hugging Face checkpoint directory of a policy (see the module docstring).

  The directory is assembled beside `out_dir` and renamed into place at the end, so an
  interrupted export leaves no partial checkpoint at `out_dir`. Tensors are fetched from the
  devices and written one shard at a time: host memory holds one shard, not the model.

  Args:
    params: the policy's parameters: a `Transformer`, its `nnx.State` (what the runner's
      checkpoints hold) or that state's `nnx.to_pure_dict`; arrays on the devices of this
      process, or NumPy arrays.
    config: the policy's config; its `param_dtype` is the default stored dtype.
    out_dir: the directory to create; it must not exist or be empty.
    dtype: the stored dtype, 'float32', 'bfloat16' or 'float16' (rounded to nearest even);
      default `config.param_dtype`.
    tokenizer: what the run tokenized with (`ModelConfig.tokenizer`): 'char', for which a
      tokenizer.json with `CharTokenizer`'s ids is generated (`char_tokenizer`); a
      tokenizer.json or its directory, whose tokenizer files (`TOKENIZER_FILES`) are copied;
      None: no tokenizer files, no special token ids.
    generation: extra generation_config.json entries (e.g. ``temperature``, ``top_p``).
    card: Markdown appended to README.md (what run, which step, its evaluation).
    max_shard_size: the largest shard in bytes; a single tensor larger than this is a shard
      of its own. One shard is written as model.safetensors, several with an index.

  Returns:
    The export directory.

  Raises:
    ValueError: a model no supported family expresses (q/k/v biases with q/k norm);
      parameters that are not exactly the config's model's (an adapter, a missing tensor, a
      shape); an unsupported dtype; a max_shard_size < 1.
    FileExistsError: `out_dir` exists and is not empty.
  """
  out_dir = pathlib.Path(out_dir)
  hf_family(config)
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  if dtype.name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype.name!r}: export as float32, bfloat16 or float16.")
  if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
    raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}.")
  check_out_dir(out_dir)
  flat = _checked_params(params, config)
  targets = hf_tensor_targets(config)

  with staged_directory(out_dir) as staging:
    special_tokens, tokenizer_note = SpecialTokens(), "No tokenizer was exported."
    if tokenizer is not None:
      special_tokens, tokenizer_note = _write_tokenizer(
          tokenizer, staging, config.max_position_embeddings
      )
    _write_json(
        staging / CONFIG_FILE, hf_config(config, dtype=dtype, special_tokens=special_tokens)
    )
    _write_json(
        staging / GENERATION_CONFIG_FILE,
        {
            "bos_token_id": special_tokens.bos_id,
            "eos_token_id": special_tokens.eos_id,
            "pad_token_id": special_tokens.pad_id,
            **(generation or {}),
        },
    )

    sizes = {name: math.prod(t.hf_shape) * dtype.itemsize for name, t in targets.items()}
    shards = _plan_shards(sizes, max_shard_size)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):
      tensors = {}
      for name in shard:
        target = targets[name]
        leaf = flat[target.path]
        # One layer's slice at a time: the stacked [L, ...] array never comes to the host whole.
        value = np.asarray(jax.device_get(leaf if target.layer is None else leaf[target.layer]))
        tensors[name] = np.ascontiguousarray(
            _from_model(name, target.hf_shape)(value.astype(dtype))
        )
        weight_map[name] = file
      save_file(tensors, staging / file, metadata={"format": "pt"})
    if len(shards) > 1:
      _write_json(
          staging / WEIGHTS_INDEX_FILE,
          {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
      )

    num_params = sum(math.prod(t.hf_shape) for t in targets.values())
    (staging / CARD_FILE).write_text(_card(config, dtype, num_params, tokenizer_note, card))
  return out_dir
