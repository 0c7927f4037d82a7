"""The Hugging Face export, checked against its consumers: transformers (PyTorch, CPU) loads it
and computes the JAX logits, `load_hf_checkpoint` reads back the exported parameters bit for
bit, and the command line exports a run's checkpoint."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip(
    "torch", reason="PyTorch is needed for the Hugging Face parity tests (extra 'parity').")
transformers = pytest.importorskip(
    "transformers", reason="transformers is needed for the Hugging Face parity tests.")

from safetensors import safe_open  # noqa: E402

import hf_fixtures  # noqa: E402
from gmpo_jax import tokenization  # noqa: E402
from gmpo_jax.models import hf_export  # noqa: E402
from gmpo_jax.models import hf_import  # noqa: E402
from gmpo_jax.models.transformer import Transformer  # noqa: E402
from gmpo_jax.models.transformer import TransformerConfig  # noqa: E402
from hf_fixtures import FAMILIES  # noqa: E402


def _trained_policy(family, tmp_path):
  """A fixture checkpoint imported, then every parameter moved: a policy no file holds yet.

  Returns (graphdef, the moved state, config, the fixture's PyTorch model).
  """
  initial = hf_fixtures.torch_model(family)
  directory = hf_fixtures.save(initial, tmp_path / "initial", sharded=False)
  model, config = hf_import.load_hf_checkpoint(directory)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  moved = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(treedef, moved), config, initial


def _pure(state):
  return nnx.to_pure_dict(state)


def _assert_same_params(got, want):
  jax.tree.map(np.testing.assert_array_equal, _pure(got), _pure(want))


def _stored_tensors(directory):
  names = {}
  for file in sorted(directory.glob("*.safetensors")):
    with safe_open(file, framework="np") as reader:
      names.update({name: reader.get_slice(name).get_dtype() for name in reader.keys()})
  return names


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_computes_the_exported_policys_logits(family, tmp_path):
  graphdef, state, config, initial = _trained_policy(family, tmp_path)
  out = hf_export.export_hf(state, config, tmp_path / "export")

  assert sorted(p.name for p in out.iterdir()) == [
      "README.md", "config.json", "generation_config.json", "model.safetensors"]
  stored = _stored_tensors(out)
  assert ("lm_head.weight" in stored) == (not config.tie_word_embeddings)
  assert len(stored) == len(hf_import.hf_tensor_targets(config))
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["model_type"] == family.split("_")[0]
  assert hf_config["rope_theta"] == config.rope_theta
  assert hf_config["dtype"] == hf_config["torch_dtype"] == "float32"

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  assert torch_model.config.tie_word_embeddings == config.tie_word_embeddings
  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  expected = hf_fixtures.torch_logits(torch_model, tokens, positions, mask)
  logits = np.asarray(hf_fixtures.jax_logits(nnx.merge(graphdef, state),
                                             *map(jnp.asarray, (tokens, positions, mask))))
  scale = np.abs(expected[mask]).max()
  assert np.abs(logits[mask] - expected[mask]).max() <= 1e-5 * scale
  # The policy left its initial logits far behind: the export is not the fixture's files.
  initial_logits = hf_fixtures.torch_logits(initial, tokens, positions, mask)
  assert np.abs(initial_logits[mask] - expected[mask]).max() > 1e3 * np.abs(
      logits[mask] - expected[mask]).max()

  reimported, reimported_config = hf_import.load_hf_checkpoint(out)
  assert reimported_config == config
  _assert_same_params(nnx.state(reimported), state)


def test_sharded_export_round_trips(tmp_path):
  graphdef, state, config, _ = _trained_policy("qwen3_qknorm_untied", tmp_path)
  limit = 8 << 10
  out = hf_export.export_hf(state, config, tmp_path / "export", max_shard_size=limit)

  assert not (out / hf_import.WEIGHTS_FILE).exists()
  index = json.loads((out / hf_import.WEIGHTS_INDEX_FILE).read_text())
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
  assert index["metadata"]["total_size"] == 4 * sum(
      x.size for x in jax.tree.leaves(state))
  sizes = {}
  for shard in shards:
    with safe_open(shard, framework="np") as reader:
      sizes[shard.name] = [reader.get_tensor(n).nbytes for n in reader.keys()]
  # Only a tensor larger than the limit (the embedding, 12 KiB) makes a shard exceed it.
  assert all(sum(s) <= limit or len(s) == 1 for s in sizes.values())
  assert any(len(s) > 1 for s in sizes.values())

  reimported, _ = hf_import.load_hf_checkpoint(out)
  _assert_same_params(nnx.state(reimported), state)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  np.testing.assert_allclose(
      hf_fixtures.torch_logits(torch_model, tokens, positions, mask)[mask],
      np.asarray(hf_fixtures.jax_logits(nnx.merge(graphdef, state),
                                        *map(jnp.asarray, (tokens, positions, mask))))[mask],
      rtol=1e-5, atol=1e-5)


def test_bfloat16_export_rounds_each_parameter_once(tmp_path):
  _, state, config, _ = _trained_policy("qwen2_bias_tied", tmp_path)
  out = hf_export.export_hf(state, config, tmp_path / "export", dtype="bfloat16")
  assert set(_stored_tensors(out).values()) == {"BF16"}
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["dtype"] == hf_config["torch_dtype"] == "bfloat16"
  reimported, reimported_config = hf_import.load_hf_checkpoint(out)
  assert reimported_config == dataclasses.replace(config, param_dtype="bfloat16",
                                                  dtype="bfloat16")
  _assert_same_params(nnx.state(reimported),
                      jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))


def _tiny(**changes):
  config = dataclasses.replace(TransformerConfig.from_name("tiny"), **changes)
  return config, nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def test_what_the_exporter_cannot_express_is_a_clear_error(tmp_path):
  out = tmp_path / "export"
  config, state = _tiny(attention_bias=True, qk_norm=True)
  with pytest.raises(ValueError, match="both attention_bias=True and qk_norm=True"):
    hf_export.export_hf(state, config, out)

  config, state = _tiny()
  params = _pure(state)
  params["blocks"]["attn"]["q_lora_a"] = np.zeros((2, 64, 8), np.float32)
  with pytest.raises(ValueError, match=r"Cannot export parameters \['blocks.attn.q_lora_a'\]"):
    hf_export.export_hf(params, config, out)
  del params["blocks"]["attn"]["q_lora_a"]
  with pytest.raises(ValueError, match=r"blocks.mlp.down_proj has shape \(2, 128, 64\), the "
                     r"config's model \(2, 96, 64\)"):
    hf_export.export_hf(params, dataclasses.replace(config, intermediate_size=96), out)
  with pytest.raises(ValueError, match="lack.*lm_head"):
    hf_export.export_hf(params, dataclasses.replace(config, tie_word_embeddings=False), out)
  with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
    hf_export.export_hf(params, config, out, dtype="int8")
  (out / "stale").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="not an empty directory"):
    hf_export.export_hf(params, config, out)
  # Nothing was written, not even a staging directory.
  assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_char_tokenizer_export_has_the_runs_ids(tmp_path):
  config, _ = _tiny(vocab_size=tokenization.CharTokenizer().vocab_size)
  params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)))
  out = hf_export.export_hf(params, config, tmp_path / "export", tokenizer="char",
                            generation={"temperature": 0.7})

  char = tokenization.CharTokenizer()
  text = "12 + 34 =\n 46 ~{}!"
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tokenizer(text)["input_ids"] == [char.bos_id] + char.encode(text)
  assert hf_tokenizer.decode([char.bos_id] + char.encode(text) + [char.eos_id],
                             skip_special_tokens=True) == text
  ours = tokenization.load_tokenizer(out)
  assert ours.encode(text) == char.encode(text) and ours.decode(char.encode(text)) == text
  assert (ours.pad_id, ours.bos_id, ours.eos_id) == (char.pad_id, char.bos_id, char.eos_id)
  hf_config = json.loads((out / "config.json").read_text())
  generation = json.loads((out / "generation_config.json").read_text())
  for ids in (hf_config, generation):
    assert (ids["pad_token_id"], ids["bos_token_id"], ids["eos_token_id"]) == (0, 1, 2)
  assert generation["temperature"] == 0.7
  assert "CharTokenizer" in (out / "README.md").read_text()

  # A Hugging Face tokenizer's files are copied as they are.
  again = hf_export.export_hf(params, config, tmp_path / "again", tokenizer=out / "tokenizer.json")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (again / name).read_bytes() == (out / name).read_bytes()
