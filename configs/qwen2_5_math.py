r"""GMPO on MATH from a local Qwen2.5-0.5B/1.5B-Instruct checkpoint (accelerator run).

    python -m gmpo_jax.main --config=configs/qwen2_5_math.py --workdir=workdirs/qwen_math \
        --config.model.hf_path=/path/to/Qwen2.5-1.5B-Instruct \
        --config.task.kwargs.manual_dir=/path/to/math_jsonl

The checkpoint directory is a Hugging Face snapshot (config.json, model.safetensors or a sharded
index, tokenizer.json, tokenizer_config.json: its eos token, <|im_end|>, ends a turn). The MATH
directory holds train.jsonl and test.jsonl, one JSON object per line with "problem" and
"solution" and/or "answer" (e.g. MATH's training problems for train.jsonl and MATH-500's
test.jsonl for test.jsonl; see gmpo_jax/tasks/competition_math.py). Nothing is downloaded; the
built dataset is cached in <workdir>/data/gmpo_math, whatever manual_dir is.

The model and the rest of the run are those of configs/qwen2_5_0_5b.py (float32 master
parameters and Adam moments, bf16 compute and sampler copy, log-probs reduced in float32). The prompt is Qwen's chat format with the problem and the
instruction to end with \boxed{}; the reward is 1 for a last \boxed{} answer that math-verify
finds equivalent to the reference (1/2, 0.5 and \frac{1}{2} alike), plus `min_reward` = 0.01
for every completion, the positive floor the log-reward baseline needs on binary rewards.

Hyperparameters of the GMPO paper (Zhao et al. 2025, "Geometric-Mean Policy Optimization",
arXiv 2507.20673):
  * learning rate 1e-6                          (optim.learning_rate)
  * G = 8 completions per prompt                (algorithm.num_generations)
  * token-level clipping of the importance ratio to (e^-0.4, e^0.4), i.e. epsilon 0.4 on the
    log-ratio                                   (algorithm.objective_kwargs)
  * no KL penalty, beta = 0                     (algorithm.beta)
Chosen here, not from the paper: max_new_tokens = 2048 (MATH solutions of these models are
mostly under 1000 tokens; a completion cut off before its \boxed{} earns only the floor), 32
prompts a step, 300 steps, evaluation on 500 test problems every 25 steps.
"""

import ml_collections

from configs import qwen2_5_0_5b

QWEN_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{problem}\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def get_config() -> ml_collections.ConfigDict:
  config = qwen2_5_0_5b.get_config()
  config.num_steps = 300
  config.eval_every = 25

  config.task.name = "math"
  config.task.kwargs = {
      "manual_dir": ml_collections.FieldReference(None, field_type=str),  # required
      "prompt_template": QWEN_CHAT_TEMPLATE,
      "min_reward": 0.01,
  }
  config.task.train_split = "train"
  config.task.eval_split = "test"

  config.sampling.max_new_tokens = 2048
  config.sampling.temperature = 1.0

  config.algorithm.advantage = "gmpo"
  config.algorithm.objective = "geometric"
  config.algorithm.objective_kwargs = {"epsilon_low": 0.4, "epsilon_high": 0.4}
  config.algorithm.num_generations = 8
  config.algorithm.beta = 0.0

  config.optim.learning_rate = 1e-6

  config.eval.num_examples = 500
  return config
