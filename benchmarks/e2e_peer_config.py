"""The work of `benchmarks/e2e_peer.py` as a gmpo_jax experiment config.

8 prompts x 8 completions of at most 32 tokens at temperature 1, the token-clip objective with
token-mean aggregation, beta = 0, one AdamW step per RL step (1 epoch, 1 minibatch, its gradient
accumulated over 4 micro-batches of 16 sequences: the same step to float rounding, with 71
instead of 275 MiB of scratch memory and no slower), no warm start, and an initial evaluation
of 8 prompts (the runner always evaluates before RL). The
model is the benchmark's Hugging Face checkpoint, passed as `--config=e2e_peer_config.py:<dir>`;
without one, a random Llama of the same shape with the char tokenizer.
"""

from configs import default


def get_config(hf_path: str | None = None):
  config = default.get_config()
  config.num_steps = 30
  config.prompts_per_step = 8
  config.eval_every = 10_000
  config.progress = False
  config.model.overrides = {
      "hidden_size": 256,
      "intermediate_size": 768,
      "num_layers": 4,
      "num_heads": 8,
      "num_kv_heads": 4,
      "head_dim": 32,
      "tie_word_embeddings": False,
  }
  if hf_path:
    config.model.name = None
    config.model.hf_path = hf_path
    config.model.tokenizer = None
    config.model.overrides = {}
  config.sampling.max_new_tokens = 32
  config.sampling.temperature = 1.0
  # Prompts are at most 5 tokens (BOS + "57+80="): a bucket of 8 pads them less than the
  # default 16 (T = 40 instead of 48 for the learner).
  config.sampling.min_prompt_bucket = 8
  config.algorithm.advantage = "grpo"
  config.algorithm.advantage_kwargs = {}
  config.algorithm.objective = "token_clip"
  config.algorithm.objective_kwargs = {"epsilon_low": 0.2, "epsilon_high": 0.2}
  config.algorithm.loss_agg_mode = "token-mean"
  config.algorithm.num_epochs = 1
  config.algorithm.num_minibatches = 1
  config.algorithm.num_microbatches = 4
  config.optim.warmup_steps = 0
  config.warm_start.steps = 0
  config.eval.num_examples = 8
  config.eval.num_samples = 1
  config.eval.k = (1,)
  config.checkpoint.every = 10_000
  config.checkpoint.best_metric = None
  return config
