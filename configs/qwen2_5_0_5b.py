"""GMPO on GSM8K from a local Qwen2.5-0.5B(-Instruct) checkpoint (accelerator run).

    python -m gmpo_jax.main --config=configs/qwen2_5_0_5b.py --workdir=workdirs/qwen \
        --config.model.hf_path=/path/to/Qwen2.5-0.5B-Instruct \
        --config.task.kwargs.manual_dir=/path/to/gsm8k_jsonl

The checkpoint directory is a Hugging Face snapshot (config.json, model.safetensors or a sharded
index, tokenizer.json); the GSM8K directory holds train.jsonl and test.jsonl in the standard
format. Nothing is downloaded. GSM8K rewards are binary, so the log-reward baseline needs a
positive floor: `min_reward` gives every completion 0.01 (with normalization the log-reward
baseline then equals GRPO on binary rewards — see docs/reward_study.md). The trained parameters
and Adam moments are float32 (the bf16 checkpoint's values, exactly), the forward and backward
passes and the sampler's copy bf16, log-probs are reduced in float32. Expected: about a minute
per step on one H100.
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  config.num_steps = 200
  config.prompts_per_step = 32
  config.eval_every = 25
  config.chunk_size = 256
  # A second run of the same shapes reads its programs instead of compiling them (the usual
  # practice on GPU/TPU; only the CPU's cached programs were measured slower, BENCHMARKS.md).
  config.compilation_cache_dir = "~/.cache/gmpo_jax/compiled"

  config.task.name = "gsm8k"
  config.task.kwargs = {
      "manual_dir": ml_collections.FieldReference(None, field_type=str),
      "min_reward": 0.01,
  }

  config.model.name = None  # the architecture comes from hf_path
  config.model.hf_path = None  # required: a local checkpoint directory
  config.model.tokenizer = None  # the tokenizer.json next to the weights
  # The architecture is the checkpoint's; how it runs can change, e.g.
  # --config.model.overrides.remat=projections when `python -m gmpo_jax.plan` says so.
  config.model.overrides = {"remat": "none", "attention_impl": "auto"}
  # float32 master weights and Adam moments, bf16 compute and sampler copy: at lr 1e-6 a
  # bf16-stored weight keeps its value under nearly every step (README, "Mixed precision").
  config.model.param_dtype = "float32"
  config.model.dtype = "bfloat16"

  config.sampling.max_new_tokens = 512
  config.sampling.temperature = 1.0

  config.algorithm.num_generations = 8
  config.algorithm.num_epochs = 1
  config.algorithm.num_minibatches = 4
  config.algorithm.num_microbatches = 4
  config.algorithm.beta = 0.0

  config.optim.learning_rate = 1e-6
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.01

  config.warm_start.steps = 0  # an instruction-tuned checkpoint already succeeds sometimes

  config.eval.num_examples = 256
  config.eval.num_samples = 4
  config.eval.k = (4,)
  return config
