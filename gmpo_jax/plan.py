"""Command line: `python -m gmpo_jax.plan --config=configs/X.py --topology=v5p:2x2x1 [--json=PATH]`.

Compiles every program of one RL step of the config (rollout prefill and decode, π_old / π_ref
log-probs, the update) for a TPU topology on this host, without a TPU, weights, tokenizer or
dataset, and prints per program its HBM per chip against the chip's, compiler FLOPs against
model FLOPs, the compiler-estimated time, MFU (or decode's share of HBM bandwidth), the attention
kernel and the collectives in its HLO, then the whole step (`gmpo_jax.runner.tpu_plan`). Needs
libtpu (`pip install libtpu==0.0.42.1`, the version jax[tpu] 0.10.2 pins).

The model is the config's: with `model.hf_path`, the checkpoint's config.json alone is read;
`--model=qwen2.5-7b` plans a named architecture instead (its published vocabulary, the config's
dtypes and run-time overrides such as `model.overrides.remat`). Prompts are `--prompt_length`
tokens (256 by default; a run's prompts come from its data), completions
`sampling.max_new_tokens`. Config fields are overridden as for `gmpo_jax.main`, e.g.
`--config.sampling.max_new_tokens=2048`. With `model.lora` (`configs/lora.py:RANK[,BASE]`) it
plans the adapted policy the runner trains: the frozen base in `lora.base_dtype`, the optimizer
state and the update over the adapters alone (docs/tpu.md, "LoRA").

Exit status 2 with one line on stderr for a program that does not fit (naming it, what it needs
and the first change that fits) or a config error; the JSON is written first in the former case.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from gmpo_jax.config import CHECKPOINT_OVERRIDES, ConfigError, ExperimentConfig
from gmpo_jax.models.transformer import TransformerConfig
from gmpo_jax.runner.plan_report import format_plan

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2 or v5p:2x2x1.")
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this path.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 256, "Prompt tokens per row.")
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Plan this named architecture " "(TransformerConfig.from_name) instead of the config's model.",
)
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "Plan against this HBM per chip (GiB) instead " "of the chip's capacity."
)
_FIT_ONLY = flags.DEFINE_bool(
    "fit_only",
    False,
    "Only judge whether each program fits (one compile each; no costing, a few times faster).",
)
flags.mark_flags_as_required(["config", "topology"])


def _model(config_dict) -> tuple[ExperimentConfig, TransformerConfig]:
  """The typed config and the architecture to plan: `--model` (its published vocabulary, the
  config's dtypes and run-time overrides), else the config's own model."""
  from gmpo_jax.runner import abstract_step  # pylint: disable=g-import-not-at-top

  vocab_size = None
  if _MODEL.value is not None:
    try:
      vocab_size = TransformerConfig.from_name(_MODEL.value).vocab_size
    except ValueError as error:
      raise ConfigError(f"--model: {error}") from error
    config_dict.model.name, config_dict.model.hf_path = _MODEL.value, None
    config_dict.model.tokenizer = config_dict.model.tokenizer or "char"
    # How the model runs (kernel, remat) still comes from the config; its shape does not.
    config_dict.model.overrides = {
        k: v for k, v in config_dict.model.overrides.items() if k in CHECKPOINT_OVERRIDES
    }
  config = ExperimentConfig.from_config(config_dict)
  try:
    return config, abstract_step.model_config(config.model, vocab_size=vocab_size)
  except (ValueError, FileNotFoundError) as error:
    raise ConfigError(f"config.model: {error}") from error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.WARNING)
  # One line per compile (they take minutes for a 7B model on a few cores).
  logging.getLogger("gmpo_jax.runner.tpu_plan").setLevel(logging.INFO)
  # Only compiles here: a TPU VM's training process may hold libtpu's lockfile meanwhile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from gmpo_jax.runner import tpu_plan  # pylint: disable=g-import-not-at-top

  try:
    config, model = _model(_CONFIG.value)
    target = tpu_plan.tpu_target(_TOPOLOGY.value, hbm_gib=_HBM_GIB.value)
    plan = tpu_plan.plan(
        config, model, target, prompt_length=_PROMPT_LENGTH.value, fit_only=_FIT_ONLY.value
    )
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(format_plan(plan, fit_only=_FIT_ONLY.value))
  if _JSON.value is not None:
    with open(_JSON.value, "w") as f:
      json.dump(plan.to_json(), f, indent=1, default=str)
  if plan.refusal is not None:
    print(f"error: {plan.refusal}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
