"""The typed experiment config: every section validated, one error naming the bad field."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import ablation_default, default, lora, qwen2_5_0_5b, smoke
from gmpo_jax import main
from gmpo_jax.config import ConfigError, ExperimentConfig, ModelConfig, OptimConfig
from gmpo_jax.models import hf_import
from gmpo_jax.models.transformer import TransformerConfig
from gmpo_jax.runner import build, loop


def test_the_shipped_configs_are_valid():
  typed = ExperimentConfig.from_config(default.get_config())
  assert typed.model.name == "tiny" and typed.model.hf_path is None
  assert typed.task.data_dir is None and typed.eval.k == (4, 8)
  assert typed.warm_start.optim == OptimConfig(**default.get_config().warm_start.optim)
  assert ExperimentConfig.from_config(smoke.get_config()).rollout.backend == "jax"
  config = qwen2_5_0_5b.get_config()
  with pytest.raises(ConfigError, match="config.model: .*hf_path=None"):  # set at launch
    ExperimentConfig.from_config(config)
  config.model.hf_path = "/models/qwen"
  assert ExperimentConfig.from_config(config).model.tokenizer is None


@pytest.mark.parametrize("spec, base", [("32", default), ("8,ablation_default", ablation_default)])
def test_the_lora_config_adapts_its_base_and_only_that(spec, base):
  config, reference = lora.get_config(spec), base.get_config()
  typed = ExperimentConfig.from_config(config)
  assert typed.model.lora.rank == int(spec.partition(",")[0])
  assert config.optim.learning_rate == 10 * reference.optim.learning_rate
  config.optim.learning_rate = reference.optim.learning_rate
  adapted = config.to_dict()
  del adapted["model"]["lora"]
  assert adapted == reference.to_dict()
  with pytest.raises(ModuleNotFoundError, match="configs.ablation"):
    lora.get_config("8,ablation")


def test_the_lora_config_puts_adapters_on_the_default_run_or_on_a_named_config():
  rank8 = ExperimentConfig.from_config(lora.get_config("8"))
  assert rank8.model.lora.rank == 8 and rank8.model.name == "tiny"
  assert rank8.optim.learning_rate == 10 * default.get_config().optim.learning_rate
  config = lora.get_config("16,qwen2_5_0_5b")
  config.model.hf_path = "/models/qwen"
  on_qwen = ExperimentConfig.from_config(config)
  assert on_qwen.model.lora.rank == 16 and on_qwen.model.dtype == "bfloat16"
  assert on_qwen.optim.learning_rate == 10 * qwen2_5_0_5b.get_config().optim.learning_rate
  # The accelerator config's overrides hold the key the plan's remat advice sets.
  assert "remat" in config.model.overrides


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompts_per_step", 0, r"config: prompts_per_step=0 must be >= 1"),
        ("num_steps", -1, r"config: num_steps=-1"),
        ("eval.k", (0,), r"config.eval: eval.k=\(0,\)"),
        ("eval.num_samples", 0, r"config.eval: .*num_samples=0"),
        ("algorithm.objective_kwargs.epsilon_low", -1.0, r"config.algorithm: .*epsilon_low=-1"),
        ("algorithm.num_generations", 1, r"config.algorithm: num_generations=1"),
        ("optim.b1", 1.5, r"config.optim: b1=1.5 must lie in \[0, 1\)"),
        ("warm_start.optim.learning_rate", 0.0, r"config.warm_start.optim: learning_rate=0.0"),
        ("warm_start.batch_size", 0, r"config.warm_start: batch_size=0"),
        ("sampling.top_p", 2.0, r"config.sampling: top_p must lie in \(0, 1\]"),
        ("checkpoint.keep", 0, r"config.checkpoint: keep=0"),
        ("mesh.fsdp", 0, r"config.mesh: fsdp=0 must be >= 1 or -1"),
        (
            "rollout.backend",
            "vllm",
            r"config.rollout: backend='vllm' is not one of \['jax', 'mock'\]",
        ),
        ("model.dtype", "float33", r"config.model: dtype='float33' is not a dtype"),
        ("model.name", "gpt5", r"config.model: Unknown model name 'gpt5'"),
        ("model.tokenizer", None, r"config.model: tokenizer=None is needed without an hf_path"),
        ("algorithm.is_correction", "tis", r"config.algorithm: is_correction='tis' is not one of"),
        ("algorithm.is_cap", 1.0, r"config.algorithm: is_cap=1.0 must be > 1"),
        ("parallelism", "shard_map", r"config: parallelism='shard_map' is not one of"),
    ],
)
def test_a_bad_value_is_one_error_naming_its_field(field, value, message):
  config = smoke.get_config()
  *parents, name = field.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  section[name] = value
  with pytest.raises(ConfigError, match=message):
    ExperimentConfig.from_config(config)


def test_pmap_refuses_sharded_parameters():
  config = smoke.get_config()
  config.parallelism, config.mesh.tensor = "pmap", 2
  with pytest.raises(
      ConfigError,
      match=r"config: parallelism='pmap' replicates the parameters: "
      r"it needs mesh.fsdp = mesh.tensor = 1, got fsdp=1 tensor=2",
  ):
    ExperimentConfig.from_config(config)
  config.mesh.tensor = 1
  assert ExperimentConfig.from_config(config).parallelism == "pmap"


def test_unknown_fields_are_named_with_what_the_section_accepts():
  config = smoke.get_config().to_dict()
  config["eval"]["ks"] = (2,)
  with pytest.raises(
      ConfigError,
      match=r"config.eval: unknown field\(s\) \['ks'\]; accepted: "
      r"\['num_examples', 'temperature', 'num_samples', 'k'\]",
  ):
    ExperimentConfig.from_config(config)
  del config["eval"]["ks"], config["rollout"]
  with pytest.raises(ConfigError, match=r"config: missing field\(s\) \['rollout'\]"):
    ExperimentConfig.from_config(config)


def test_bad_values_fail_before_any_dataset_is_built(tmp_path):
  config = smoke.get_config()
  config.algorithm.objective_kwargs.epsilon_low = -1.0
  with pytest.raises(ConfigError, match="epsilon_low"):
    loop.train_and_evaluate(config, tmp_path)
  config = smoke.get_config()
  config.prompts_per_step = 3  # 3 x 4 completions do not split into 2 minibatches of 8 devices
  config.algorithm.num_minibatches = 8
  with pytest.raises(ConfigError, match="prompts_per_step x algorithm.num_generations = 12"):
    loop.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "data").exists()


def test_an_unknown_override_names_the_field_and_what_its_section_accepts():
  path = os.path.join(os.path.dirname(smoke.__file__), "smoke.py")
  argv = ["main", f"--config={path}", "--workdir=/tmp/w"]
  assert main.unknown_override(argv + ["--config.seed=3"]) is None
  assert main.unknown_override(argv + ["--config.algorithm.advantage_kwargs.offset=1"]) == (
      "unknown config field config.algorithm.advantage_kwargs.offset; "
      "config.algorithm.advantage_kwargs accepts: normalize"
  )
  assert main.unknown_override(argv + ["--config.seed.x=1"]) == (
      "config.seed is a value, not a section: config.seed.x cannot be set"
  )


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "gmpo_jax.main",
          "--config=configs/smoke.py",
          f"--workdir={tmp_path}",
          "--config.algorithm.advantage_kwargs.offset=1",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=os.path.dirname(os.path.dirname(smoke.__file__)),
  )
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
      "error: unknown config field config.algorithm.advantage_kwargs.offset; "
      "config.algorithm.advantage_kwargs accepts: normalize"
  ]
  assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def _checkpoint_config(**model):
  config = qwen2_5_0_5b.get_config()
  config.model.hf_path = "/models/qwen"
  config.model.update(model)
  return config


def test_a_checkpoint_takes_how_it_runs_from_overrides_but_not_its_architecture():
  overrides = {"attention_impl": "splash", "remat": "projections", "attention_block_size": 256}
  typed = ExperimentConfig.from_config(_checkpoint_config(overrides=overrides))
  assert dict(typed.model.overrides) == overrides
  with pytest.raises(
      ConfigError,
      match=r"config.model: overrides=\['num_layers', 'qk_norm'\] "
      r"would change the architecture of the checkpoint",
  ):
    ExperimentConfig.from_config(
        _checkpoint_config(overrides={"remat": "full", "num_layers": 2, "qk_norm": True})
    )
  # The dtypes have fields of their own (`model.param_dtype`, `model.dtype`), never overrides.
  with pytest.raises(ConfigError, match=r"overrides=\['dtype'\] are set as model.param_dtype"):
    ExperimentConfig.from_config(_checkpoint_config(overrides={"dtype": "float32"}))


def test_build_model_applies_the_overrides_to_a_checkpoint(tmp_path):
  """A checkpoint of zeros in the Hugging Face layout (`hf_import.hf_tensor_targets`) loads
  with the overridden kernel and remat and the configured compute dtype, and computes in it."""
  hf_config = dict(
      model_type="qwen2",
      vocab_size=64,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      tie_word_embeddings=True,
      torch_dtype="float32",
  )
  (tmp_path / hf_import.CONFIG_FILE).write_text(json.dumps(hf_config))
  targets = hf_import.hf_tensor_targets(TransformerConfig.from_hf_config(hf_config))
  save_file(
      {name: np.zeros(t.hf_shape, np.float32) for name, t in targets.items()},
      str(tmp_path / hf_import.WEIGHTS_FILE),
  )
  overrides = (("attention_impl", "xla"), ("remat", "full"))
  model = build.build_model(
      ModelConfig(hf_path=str(tmp_path), overrides=overrides, dtype="bfloat16"),
      tokenizer=None,
      seed=0,
  )
  assert (model.config.attention_impl, model.config.remat) == ("xla", "full")
  assert model.config.param_dtype == np.float32 and model.config.dtype == jnp.bfloat16
  tokens = jnp.zeros((1, 4), jnp.int32)
  hidden, _ = model(tokens, tokens)
  assert hidden.dtype == jnp.bfloat16
