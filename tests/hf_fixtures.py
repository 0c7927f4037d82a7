"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Qwen3) built locally with transformers,
and the helpers that compare their logits with gmpo_jax's, for the import and export tests.

Import it after `pytest.importorskip("torch")` and `pytest.importorskip("transformers")`.
"""

import numpy as np
import torch
import transformers
from flax import nnx

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)
# Each family with the features that distinguish it; tied and untied embeddings both covered.
FAMILIES = {
    "llama_llama3rope_untied": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "llama_tied": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=500.0)),
    ),
    "qwen2_bias_tied": (
        transformers.Qwen2Config,
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    "qwen3_qknorm_untied": (
        transformers.Qwen3Config,
        dict(
            tie_word_embeddings=False,
            head_dim=16,
            rope_parameters=dict(rope_type="default", rope_theta=1e6),
        ),
    ),
}


@nnx.jit
def jax_logits(model, tokens, positions, key_mask):
  hidden, _ = model(tokens, positions, key_mask=key_mask)
  return model.logits(hidden)


def torch_model(family, seed=0):
  """A tiny HF model with every weight, norm scale and bias set to random non-defaults."""
  config_cls, extra = FAMILIES[family]
  config = config_cls(**_COMMON, **extra)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif name.endswith("bias"):
        param.copy_(0.3 * torch.randn_like(param))
      else:
        param.copy_(0.15 * torch.randn_like(param))
  return model


def save(model, directory, sharded):
  # 4KB shards split this ~60k-parameter model into many files.
  model.save_pretrained(directory, max_shard_size="4KB" if sharded else "50GB")
  return directory


def left_padded_batch(vocab_size):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (3, 10)).astype(np.int32)
  mask = np.arange(10)[None, :] >= np.array([0, 4, 7])[:, None]
  positions = (np.cumsum(mask, axis=1) - 1).astype(np.int32)
  return tokens, positions, mask


def torch_logits(model, tokens, positions, mask):
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        # HF's generate convention: padding positions set to 1 (never attended).
        position_ids=torch.tensor(np.where(mask, positions, 1), dtype=torch.long),
    )
  return out.logits.float().numpy()
