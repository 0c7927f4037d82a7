"""Write a LoRA policy's adapters alone, in the layout of Hugging Face PEFT.

An adapter directory holds ``adapter_config.json`` (peft_type LORA, r, lora_alpha, the target
module names, the base's name or path) and ``adapter_model.safetensors``, one pair of tensors
per adapted projection of every layer::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

PEFT adds (lora_alpha / r) · x·Aᵀ·Bᵀ to the base layer's output, which is this codebase's
scale · (x·A)·B with A [in..., r] flattened and transposed, B [r, out...] likewise; the head
axes flatten in the order the Hugging Face weights use (`hf_import.hf_tensor_targets`). Loaded
with ``peft.PeftModel.from_pretrained`` onto the base (the checkpoint the run started from, or
`hf_export.export_hf` of the base), it computes the adapted policy's logits
(tests/models/test_lora.py). For a single merged checkpoint, export `lora.merge_adapters(model)` with
`hf_export.export_hf` instead.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from safetensors.numpy import save_file

from gmpo_jax.models import hf_export
from gmpo_jax.models.lora import PROJECTIONS, LoRA, LoRAConfig
from gmpo_jax.models.transformer import Transformer

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# Our module path -> the Hugging Face module under model.layers.{i}.
_HF_MODULES = {
    "blocks/attn/q_proj": "self_attn.q_proj",
    "blocks/attn/k_proj": "self_attn.k_proj",
    "blocks/attn/v_proj": "self_attn.v_proj",
    "blocks/attn/o_proj": "self_attn.o_proj",
    "blocks/mlp/gate_proj": "mlp.gate_proj",
    "blocks/mlp/up_proj": "mlp.up_proj",
    "blocks/mlp/down_proj": "mlp.down_proj",
}


def _adapters(model: Transformer) -> dict[str, LoRA]:
  found = {}
  for path in PROJECTIONS:
    *parents, name = path.split("/")
    owner = model
    for parent in parents:
      owner = getattr(owner, parent)
    adapter = getattr(owner, f"{name}_lora", None)
    if adapter is not None:
      found[path] = adapter
  return found


def export_peft(
    model: Transformer, lora_config: LoRAConfig, out_dir: str | os.PathLike, *, base_model: str
) -> pathlib.Path:
  """Writes the adapters of `model` as a PEFT LoRA adapter directory (module docstring).

  Args:
    model: a policy with adapters attached (`lora.apply_lora`).
    lora_config: its adapters' config (rank and alpha go to adapter_config.json).
    out_dir: the directory to create; it must not exist or be empty.
    base_model: `base_model_name_or_path`: the Hugging Face checkpoint PEFT loads them onto.

  Returns:
    The adapter directory.

  Raises:
    ValueError: `model` carries no adapter.
    FileExistsError: `out_dir` exists and is not empty.
  """
  out_dir = pathlib.Path(out_dir)
  adapters = _adapters(model)
  if not adapters:
    raise ValueError("the model carries no LoRA adapter to export")
  hf_export.hf_family(model.config)
  hf_export.check_out_dir(out_dir)
  tensors = {}
  for path, adapter in adapters.items():
    a, b = np.asarray(jax.device_get(adapter.a[...])), np.asarray(jax.device_get(adapter.b[...]))
    for layer in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULES[path]}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
          a[layer].reshape(-1, a.shape[-1]).T.astype(np.float32)
      )
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
          b[layer].reshape(b.shape[1], -1).T.astype(np.float32)
      )
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": lora_config.rank,
      "lora_alpha": lora_config.alpha,
      "lora_dropout": 0.0,
      "target_modules": sorted(_HF_MODULES[p].split(".")[-1] for p in adapters),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }
  with hf_export.staged_directory(out_dir) as staging:
    (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(tensors, staging / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
  return out_dir
