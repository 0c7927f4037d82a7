"""A seconds-long version of the default run, for tests: the real loop on tiny shapes."""

from configs import default


def get_config():
  config = default.get_config()
  config.num_steps = 4
  config.prompts_per_step = 4
  config.eval_every = 2
  config.progress = False
  config.task.kwargs = {"num_digits": 1, "operations": ("+",), "num_train": 60, "num_test": 20}
  config.model.overrides = {
      "hidden_size": 32,
      "intermediate_size": 64,
      "num_layers": 1,
      "num_heads": 2,
      "num_kv_heads": 1,
      "head_dim": 16,
  }
  config.sampling.max_new_tokens = 3
  config.algorithm.num_generations = 4
  config.algorithm.num_epochs = 1
  config.algorithm.num_minibatches = 2
  config.warm_start.steps = 4
  # Any pass rate reaches 0: the probe runs, and the warm start stops at step 3.
  config.warm_start.target_train_pass_rate = 0.0
  config.warm_start.probe_every = 3
  config.warm_start.probe_size = 8
  config.warm_start.batch_size = 8
  config.eval.num_examples = 8
  config.eval.num_samples = 2
  config.eval.k = (2,)
  config.checkpoint.every = 1
  return config
