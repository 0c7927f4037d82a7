"""LoRA and QLoRA (`gmpo_jax.models.lora`, `gmpo_jax.models.quantization`): the adapted model,
its update, its checkpoints and its exports (merged, and PEFT against `peft` + transformers)."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from learner_fixtures import N, T
from learner_fixtures import sequences as _sequences

from configs import smoke
from gmpo_jax import export
from gmpo_jax.config import AlgorithmConfig, ConfigError, ExperimentConfig
from gmpo_jax.infra import checkpointing
from gmpo_jax.learner import update as learner
from gmpo_jax.models import hf_import, lora, quantization
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.runner import build, loop
from gmpo_jax.runner.state import LoRABaseMismatchError

CONFIG = dataclasses.replace(TransformerConfig.from_name("tiny"), attention_bias=True)


@nnx.jit
def _logits(model, tokens, positions, key_mask):
  hidden, _ = model(tokens, positions, key_mask=key_mask)
  return model.logits(hidden)


def _inputs():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (3, T)), jnp.int32)
  mask = jnp.asarray(np.arange(T)[None] >= np.array([0, 3, 6])[:, None])
  return tokens, positions_from_mask(mask), mask


def _base():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _adapted(config=lora.LoRAConfig(rank=4, alpha=8.0), *, perturb=True, model=None):
  """A LoRA policy; with `perturb`, B (zero at init) and A moved to random values."""
  model = lora.apply_lora(_base() if model is None else model, config, seed=1)
  if perturb:
    graphdef, params = nnx.split(model)
    adapters, base = lora.split_adapters(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, moved), base)
  return model


def test_adapters_at_init_leave_the_logits_unchanged():
  inputs = _inputs()
  want = np.asarray(_logits(_base(), *inputs))
  adapted = _adapted(perturb=False)
  got = np.asarray(_logits(adapted, *inputs))
  np.testing.assert_array_equal(got, want)
  # Not a vacuous check: the same model with B moved computes other logits.
  assert np.abs(np.asarray(_logits(_adapted(), *inputs)) - want).max() > 1e-3


def test_targets_select_the_adapted_projections_and_bad_configs_are_clear_errors():
  model = _adapted(lora.LoRAConfig(rank=2, targets="blocks/attn/[qv]_proj"), perturb=False)
  adapters, _ = lora.split_adapters(nnx.state(model))
  assert sorted(nnx.to_pure_dict(adapters)["blocks"]["attn"]) == ["q_proj_lora", "v_proj_lora"]
  a = model.blocks.attn.q_proj_lora.a
  assert a.shape == (CONFIG.num_layers, CONFIG.hidden_size, 2)
  assert model.blocks.attn.q_proj_lora.b.shape == (
      CONFIG.num_layers,
      2,
      CONFIG.num_heads,
      CONFIG.head_dim,
  )

  def config_with(**lora_fields):
    config = smoke.get_config()
    config.model.lora = ml_collections.ConfigDict(
        {
            "rank": 4,
            "alpha": 8.0,
            "dropout": 0.0,
            "targets": ".*",
            "base_dtype": None,
            **lora_fields,
        }
    )
    return config

  cases = [
      ({"targets": "blocks/attn/x_proj"}, "matches none"),
      ({"rank": 0}, "rank=0"),
      ({"rank": -3}, "rank=-3"),
      ({"alpha": 0.0}, "alpha"),
      ({"dropout": 0.1}, "dropout"),
      ({"targets": "("}, "not a regex"),
      ({"base_dtype": "int4"}, "base_dtype"),
  ]
  for fields, message in cases:
    with pytest.raises(ConfigError, match=rf"config\.model\.lora: .*{message}"):
      ExperimentConfig.from_config(config_with(**fields))
  config = config_with()
  config.model.param_dtype = "bfloat16"
  config.optim.stochastic_rounding = config.warm_start.optim.stochastic_rounding = True
  with pytest.raises(ConfigError, match="with lora: the adapters are trained as float32"):
    ExperimentConfig.from_config(config)
  config = config_with()
  config.parallelism = "pmap"
  with pytest.raises(ConfigError, match="with model.lora: the pmap update"):
    ExperimentConfig.from_config(config)
  assert ExperimentConfig.from_config(config_with()).model.lora.scale == 2.0


def test_merged_weights_equal_base_plus_scale_a_b_in_float64():
  config = lora.LoRAConfig(rank=3, alpha=7.0)
  base = nnx.to_pure_dict(nnx.state(_base()))
  model = _adapted(config)
  merged = nnx.to_pure_dict(nnx.state(lora.merge_adapters(model)))
  for path, axes in lora.PROJECTIONS.items():
    *parents, name = path.split("/")
    owner, want, got = model, base, merged
    for parent in parents:
      owner, want, got = getattr(owner, parent), want[parent], got[parent]
    adapter = getattr(owner, f"{name}_lora")
    a = np.asarray(adapter.a[...], np.float64)
    b = np.asarray(adapter.b[...], np.float64)
    w = np.asarray(want[name], np.float64)
    layers = w.shape[0]
    delta = np.einsum(
        "lir,lro->lio", a.reshape(layers, -1, config.rank), b.reshape(layers, config.rank, -1)
    ).reshape(w.shape)
    assert np.abs(delta).max() > 1e-4  # B was perturbed: the merge has something to add
    np.testing.assert_allclose(
        np.asarray(got[name], np.float64), w + (7.0 / 3) * delta, rtol=1e-6, atol=1e-7
    )
  np.testing.assert_array_equal(merged["embedding"], base["embedding"])
  # The merged plain model computes the adapted model's logits.
  inputs = _inputs()
  np.testing.assert_allclose(
      _logits(lora.merge_adapters(model), *inputs), _logits(model, *inputs), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("kind", quantization.QUANTIZED_DTYPES)
def test_quantized_base_dequantizes_within_the_documented_error(kind):
  w = jax.random.normal(jax.random.key(0), (2, 64, 4, 16)) * 0.02
  codes, scales = quantization.quantize(w, kind)
  assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
  assert codes.size == (w.size if kind == "int8" else w.size // 2)
  error = np.abs(np.asarray(quantization.dequantize(codes, scales, kind, jnp.float32) - w))
  bound = np.repeat(np.asarray(quantization.max_abs_error(scales, kind)), 16, axis=-1)
  assert (error <= bound * (1 + 1e-6)).all()
  # The bound is close to attained: a loose bound would pass a broken quantizer too.
  assert (error / bound).max() > 0.5
  # Each block's largest weight is a level (±1 in both codebooks): exact up to float rounding.
  blocks = np.asarray(w).reshape(-1, 16)
  top = np.argmax(np.abs(blocks), axis=1)
  np.testing.assert_allclose(error.reshape(-1, 16)[np.arange(len(top)), top], 0, atol=1e-9)


@pytest.mark.parametrize("kind", quantization.QUANTIZED_DTYPES)
def test_qlora_model_computes_with_its_dequantized_base(kind):
  model = _adapted(lora.LoRAConfig(rank=4, alpha=8.0, base_dtype=kind))
  assert isinstance(model.blocks.mlp.up_proj, quantization.QuantizedWeight)
  reference = lora.merge_adapters(model)  # dequantized base + scale·A·B, float32
  inputs = _inputs()
  np.testing.assert_allclose(
      _logits(model, *inputs), _logits(reference, *inputs), rtol=1e-5, atol=1e-5
  )


def _update_fn(graphdef):
  algo = AlgorithmConfig(objective="geometric")
  return learner.make_update_fn(
      graphdef,
      optax.adam(1e-2),
      build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T),
      trainable=lora.LoRAParam,
  )


@pytest.mark.parametrize("base_dtype", [None, "nf4"])
def test_update_trains_only_the_adapters_and_keeps_the_base_arrays(base_dtype):
  graphdef, params = nnx.split(_adapted(lora.LoRAConfig(rank=4, alpha=8.0, base_dtype=base_dtype)))
  adapters, base = lora.split_adapters(params)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(adapters)
  # The optimizer holds the adapters' moments, nothing of the base.
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * lora.adapter_count(params) + 1
  before_adapters = jax.tree.map(np.asarray, adapters)
  base_buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(base)]
  base_values = jax.tree.map(np.asarray, base)
  new, _, out = _update_fn(graphdef)(
      params, opt_state, jax.tree.map(lambda x: x[None], _sequences(seed=3))
  )
  assert float(out.grad_norm) > 0 and int(out.skipped) == 0
  new_adapters, new_base = lora.split_adapters(new)
  # Every adapter matrix moved; the base is the caller's own arrays, neither copied nor changed.
  for was, now in zip(jax.tree.leaves(before_adapters), jax.tree.leaves(new_adapters)):
    assert np.abs(np.asarray(now) - was).min() > 0
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new_base)] == base_buffers
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_base), base_values)


def test_lora_update_does_not_depend_on_the_micro_batch_split():
  graphdef, params = nnx.split(_adapted())
  update = learner.make_update_fn(
      graphdef,
      optax.sgd(1.0),
      build.policy_loss(
          AlgorithmConfig(objective="geometric"), temperature=1.0, chunk_size=4, max_length=T
      ),
      donate=False,
      trainable=lora.LoRAParam,
  )
  opt_state = optax.sgd(1.0).init(lora.split_adapters(params)[0])
  batch = _sequences(seed=3)
  results = [
      update(
          params,
          opt_state,
          jax.tree.map(lambda x, m=m: x.reshape((m, N // m) + x.shape[1:]), batch),
      )
      for m in (1, 2, 4)
  ]
  p1, _, o1 = results[0]
  assert float(o1.grad_norm) > 0
  for p, _, o in results[1:]:
    np.testing.assert_allclose(o.loss, o1.loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(o.grad_norm, o1.grad_norm, rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        lora.split_adapters(p)[0],
        lora.split_adapters(p1)[0],
    )


def test_fingerprint_sees_one_changed_bit_and_not_the_tree_object():
  params = nnx.state(_base())
  same = jax.tree.map(jnp.copy, params)
  assert lora.fingerprint(params) == lora.fingerprint(same)
  leaves, treedef = jax.tree.flatten(params)
  bits = np.asarray(leaves[0]).copy().view(np.uint32)
  bits.flat[5] ^= 1
  leaves[0] = jnp.asarray(bits.view(np.float32))
  assert lora.fingerprint(jax.tree.unflatten(treedef, leaves)) != lora.fingerprint(params)


def _lora_smoke(**changes):
  config = smoke.get_config()
  config.num_steps = 2
  config.warm_start.steps = 0  # the base is the named model at random init, seeded
  config.model.lora = ml_collections.ConfigDict(
      {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ".*", "base_dtype": "int8"}
  )
  for name, value in changes.items():
    config[name] = value
  return config


def test_lora_smoke_run_checkpoints_adapters_and_refuses_another_base(tmp_path):
  summary = loop.train_and_evaluate(_lora_smoke(), tmp_path)
  assert summary["last_step"] == 2
  with checkpointing.Checkpointer(tmp_path / "checkpoints") as ckpt:
    metadata = ckpt.restore_metadata(2)
  assert metadata["lora_base"]["path"].startswith("tiny at random init (seed 0)")
  # The state item's tree (Orbax's metadata): the adapters and their moments, no base weight.
  tree = json.loads((tmp_path / "checkpoints" / "2" / "state" / "_METADATA").read_text())
  names = list(tree["tree_metadata"])
  assert any("q_proj_lora" in name for name in names)
  assert not any(w in name for name in names for w in ("embedding", "'up_proj'", "scale"))
  # The export rebuilds the int8 base, checks its fingerprint and writes the merged model.
  restored = export.restore_step(tmp_path)
  policy = nnx.merge(restored.graphdef, restored.params)
  assert isinstance(policy.blocks.attn.q_proj, quantization.QuantizedWeight)
  out = export.export_run(tmp_path, tmp_path / "merged")
  reimported, _ = hf_import.load_hf_checkpoint(out)
  jax.tree.map(
      np.testing.assert_array_equal,
      nnx.to_pure_dict(nnx.state(reimported)),
      nnx.to_pure_dict(nnx.state(lora.merge_adapters(policy))),
  )
  with pytest.raises(export.ExportError, match="not a Hugging Face checkpoint"):
    export.export_run(tmp_path, tmp_path / "adapter", adapter=True)
  # Resumed on another base (another seed's random init), with config changes allowed: refused.
  with pytest.raises(
      LoRABaseMismatchError,
      match="trained on the base 'tiny at random init " r"\(seed 0\)'.*fingerprint",
  ):
    loop.train_and_evaluate(_lora_smoke(seed=1, num_steps=3, resume_with_changes=True), tmp_path)


torch = pytest.importorskip("torch", reason="PyTorch is needed for the PEFT parity test.")
transformers = pytest.importorskip("transformers", reason="transformers is needed for PEFT.")
peft = pytest.importorskip("peft", reason="peft is needed for the PEFT parity test.")

import hf_fixtures  # noqa: E402

from gmpo_jax.models import hf_export, peft_export  # noqa: E402


@pytest.mark.parametrize("family", ["qwen2_bias_tied", "llama_llama3rope_untied"])
def test_peft_loads_the_adapter_onto_the_transformers_base_and_computes_the_logits(
    family, tmp_path: pathlib.Path
):
  base_dir = hf_fixtures.save(hf_fixtures.torch_model(family), tmp_path / "base", sharded=False)
  model, config = hf_import.load_hf_checkpoint(base_dir)
  lora_config = lora.LoRAConfig(rank=4, alpha=12.0, targets="blocks/(attn/[qo]|mlp/down)_proj")
  model = _adapted(lora_config, model=model)
  out = peft_export.export_peft(model, lora_config, tmp_path / "adapter", base_model=str(base_dir))
  assert sorted(p.name for p in out.iterdir()) == [
      "adapter_config.json",
      "adapter_model.safetensors",
  ]
  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  want = np.asarray(hf_fixtures.jax_logits(model, *map(jnp.asarray, (tokens, positions, mask))))
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(
      base_dir, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  base_logits = hf_fixtures.torch_logits(torch_base, tokens, positions, mask)
  adapted = peft.PeftModel.from_pretrained(torch_base, out).eval()
  got = hf_fixtures.torch_logits(adapted, tokens, positions, mask)
  scale = np.abs(want[mask]).max()
  assert np.abs(got[mask] - want[mask]).max() <= 1e-5 * scale
  # The adapters matter: the base alone is far from the adapted logits.
  assert np.abs(base_logits[mask] - want[mask]).max() > 1e3 * np.abs(got[mask] - want[mask]).max()
  # The merged export through the plain exporter: transformers computes the same logits.
  merged = hf_export.export_hf(nnx.state(lora.merge_adapters(model)), config, tmp_path / "merged")
  merged_model = transformers.AutoModelForCausalLM.from_pretrained(
      merged, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  merged_logits = hf_fixtures.torch_logits(merged_model, tokens, positions, mask)
  assert np.abs(merged_logits[mask] - want[mask]).max() <= 1e-5 * scale
