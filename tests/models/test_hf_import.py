"""Parity of gmpo_jax's Transformer with Hugging Face transformers (PyTorch, CPU) on tiny
random checkpoints, and the importer's error handling."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip(
    "torch", reason="PyTorch is needed for the Hugging Face parity tests (extra 'parity')."
)
transformers = pytest.importorskip(
    "transformers", reason="transformers is needed for the Hugging Face parity tests."
)

import hf_fixtures  # noqa: E402
from hf_fixtures import FAMILIES  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from gmpo_jax.models import hf_import  # noqa: E402


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
  torch_model = hf_fixtures.torch_model(family)
  single = hf_fixtures.save(torch_model, tmp_path / "single", sharded=False)
  sharded = hf_fixtures.save(torch_model, tmp_path / "sharded", sharded=True)
  assert os.path.isfile(sharded / hf_import.WEIGHTS_INDEX_FILE)
  assert len(list(sharded.glob("*.safetensors"))) > 2

  model, config = hf_import.load_hf_checkpoint(single)
  sharded_model, sharded_config = hf_import.load_hf_checkpoint(sharded)
  assert config == sharded_config
  assert config.tie_word_embeddings == FAMILIES[family][1]["tie_word_embeddings"]
  assert config.attention_bias == family.startswith("qwen2")
  assert config.qk_norm == family.startswith("qwen3")
  assert config.param_dtype == jnp.float32 and config.dtype == jnp.float32
  jax.tree.map(
      np.testing.assert_array_equal,
      nnx.to_pure_dict(nnx.state(model)),
      nnx.to_pure_dict(nnx.state(sharded_model)),
  )

  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  expected = hf_fixtures.torch_logits(torch_model, tokens, positions, mask)
  logits = np.asarray(hf_fixtures.jax_logits(model, *map(jnp.asarray, (tokens, positions, mask))))
  np.testing.assert_allclose(logits[mask], expected[mask], atol=1e-4, rtol=1e-4)
  # The unpadded row is compared at every position, and the logits are not trivial.
  assert np.abs(expected[0]).std() > 0.5


def test_bfloat16_checkpoint(tmp_path):
  torch_model = hf_fixtures.torch_model("qwen2_bias_tied").to(torch.bfloat16)
  directory = hf_fixtures.save(torch_model, tmp_path / "bf16", sharded=False)
  model, config = hf_import.load_hf_checkpoint(directory)
  assert config.param_dtype == jnp.bfloat16 and config.dtype == jnp.bfloat16
  embedding = torch_model.model.embed_tokens.weight.detach().float().numpy()
  assert model.embedding[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(model.embedding[...], np.float32), embedding)
  # Upcast on load: values are exactly the bfloat16 ones, computed in float32.
  model32, config32 = hf_import.load_hf_checkpoint(directory, param_dtype="float32")
  assert config32.dtype == jnp.float32 and model32.embedding[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(model32.embedding[...]), embedding)
  mixed, mixed_config = hf_import.load_hf_checkpoint(
      directory, param_dtype="float32", dtype="bfloat16"
  )
  assert mixed_config.param_dtype == jnp.float32 and mixed_config.dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny untied Llama checkpoint to corrupt in the error tests."""
  directory = tmp_path_factory.mktemp("ckpt")
  hf_fixtures.save(hf_fixtures.torch_model("llama_llama3rope_untied"), directory, sharded=False)
  return directory


def _copy(checkpoint, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(checkpoint, target)
  return target


def _edit_tensors(directory, edit):
  path = directory / hf_import.WEIGHTS_FILE
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_missing_files_name_the_path(checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_import.load_hf_checkpoint(tmp_path)
  broken = _copy(checkpoint, tmp_path)
  os.remove(broken / hf_import.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_import.load_hf_checkpoint(broken)
  (broken / hf_import.WEIGHTS_INDEX_FILE).write_text(
      json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
    hf_import.load_hf_checkpoint(broken)


def test_truncated_or_corrupt_shard_names_the_file(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  weights = broken / hf_import.WEIGHTS_FILE
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])  # The header survives, the tensors do not.
  with pytest.raises(
      ValueError,
      match=r"Checkpoint shard '.*/copy/model\.safetensors' cannot be "
      r"read: .*incomplete metadata",
  ) as caught:
    hf_import.load_hf_checkpoint(broken)
  assert type(caught.value.__cause__).__name__ == "SafetensorError"
  weights.write_bytes(b"\x07\x00")  # Not even a header length.
  with pytest.raises(ValueError, match=r"model\.safetensors' cannot be read: .*header"):
    hf_import.load_hf_checkpoint(broken)


def test_missing_tensor(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  _edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.up_proj"):
    hf_import.load_hf_checkpoint(broken)


def test_unexpected_tensor(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  _edit_tensors(
      broken, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
  )
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf_import.load_hf_checkpoint(broken)


def test_shape_mismatch(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  config = json.loads((broken / "config.json").read_text())
  config["intermediate_size"] = 64
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"mlp\..*shape \((56, 32|32, 56)\), expected"):
    hf_import.load_hf_checkpoint(broken)


def test_tied_embeddings_with_a_different_lm_head(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  config = json.loads((broken / "config.json").read_text())
  config["tie_word_embeddings"] = True
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    hf_import.load_hf_checkpoint(broken)
  # A stored lm_head equal to the embedding is accepted (some checkpoints keep both).
  _edit_tensors(
      broken, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()})
  )
  model, config = hf_import.load_hf_checkpoint(broken)
  assert config.tie_word_embeddings and not hasattr(model, "lm_head")


def test_unsupported_rope_scaling_is_a_clear_error(checkpoint, tmp_path):
  broken = _copy(checkpoint, tmp_path)
  config = json.loads((broken / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="Unsupported RoPE scaling type 'yarn'"):
    hf_import.load_hf_checkpoint(broken)


def test_targets_cover_every_parameter():
  config = dataclasses.replace(
      hf_import.TransformerConfig.from_name("tiny"),
      attention_bias=True,
      qk_norm=True,
      tie_word_embeddings=False,
  )
  abstract = nnx.eval_shape(lambda: hf_import.Transformer(config, rngs=nnx.Rngs(0)))
  paths = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  targets = hf_import.hf_tensor_targets(config)
  assert {t.path for t in targets.values()} == paths
  per_layer = sum(t.layer == 0 for t in targets.values())
  assert len(targets) == 3 + config.num_layers * per_layer and per_layer == 14
