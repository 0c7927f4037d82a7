"""Command line: `python -m gmpo_jax.export --workdir=W [--step=N] --out=DIR [--dtype=bfloat16]`.

Writes the policy of one step of a run's RL checkpoints (`W/checkpoints`, the latest by
default) as a Hugging Face checkpoint directory (`gmpo_jax.models.hf_export.export_hf`): the
weights, config.json, generation_config.json (greedy decoding, as the run measures pass@1, and
its completion length and stop tokens), the tokenizer the run used, and a README card naming
the run, the step and its evaluation.

Everything comes from the workdir: the config from the step's config record (the one a resume
checks), the parameters from the step itself. The step is verified against its integrity
manifest before anything is read, as a resume does; a damaged step is refused (exit 2), never
replaced by an older one, and nothing in the workdir is changed. The warm-start cache
(`W/warm_start`) is not exported.

A LoRA run (`config.model.lora`) checkpoints only its adapters: its base is rebuilt as the run
built it (the checkpoint of `model.hf_path`, the warm start cached in `W/warm_start`, or the
named model at random init), refused unless its fingerprint is the one the step records, and
the export is the merged model W + scale·A·B; with `--adapter`, the adapters alone in the PEFT
layout instead (`gmpo_jax.models.peft_export`), for a run whose base is a Hugging Face
checkpoint (`model.hf_path`, which adapter_config.json names).

User errors (no checkpoint, an unknown or damaged step, an existing output directory, a model
the exporter cannot express) print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from absl import app, flags
from flax import nnx

from gmpo_jax.config import ConfigError, ExperimentConfig, ModelConfig
from gmpo_jax.infra import checkpointing
from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.learner import precision
from gmpo_jax.models import hf_export, hf_import, lora, peft_export, tokenization
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.runner import build

logger = logging.getLogger(__name__)


class ExportError(Exception):
  """A user error: nothing exportable at the requested step, or nowhere to write it."""


def run_config(metadata: Mapping[str, Any], where: str) -> ExperimentConfig:
  """The typed config of the run that wrote a checkpoint, from its config record.

  The record holds the config flattened to dotted keys with JSON values
  (`checkpointing.config_record`); lists come back as the tuples the config files use.

  Raises:
    ExportError: the checkpoint holds no config record.
    ConfigError: the record does not make a valid config of this version of gmpo_jax.
  """
  record = metadata.get(checkpointing.CONFIG_METADATA_KEY)
  if not (isinstance(record, Mapping) and isinstance(record.get("fields"), Mapping)):
    raise ExportError(f"{where} holds no config record, so its model cannot be rebuilt.")
  nested: dict[str, Any] = {}
  for field, value in record["fields"].items():
    *parents, name = field.split(".")
    node = nested
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = tuple(value) if isinstance(value, list) else value
  return ExperimentConfig.from_config(nested)


def policy_config(model: ModelConfig, tokenizer: tokenization.Tokenizer) -> TransformerConfig:
  """The config `build.build_model` gives the policy, without reading or initialising weights."""
  if model.hf_path is not None:
    config = hf_import.read_config(model.hf_path)
    return dataclasses.replace(config, **build.model_dtypes(model, config.dtype))
  config = dataclasses.replace(
      TransformerConfig.from_name(model.name),
      vocab_size=tokenizer.vocab_size,
      **dict(model.overrides),
  )
  return dataclasses.replace(config, **build.model_dtypes(model, config.dtype))


class Restored(NamedTuple):
  """One step of a run: its parameters (`nnx.State`, of `graphdef`: for a LoRA run the base
  with the step's adapters), configs, tokenizer and metadata."""

  step: int
  params: Any
  graphdef: nnx.GraphDef
  config: ExperimentConfig
  model_config: TransformerConfig
  tokenizer: tokenization.Tokenizer
  metadata: Mapping[str, Any]


def _restore_target(
    optim: Any, model_config: TransformerConfig, params: Any = None
) -> checkpointing.CheckpointState:
  """Abstract arrays shaped like what the RL loop (`gmpo_jax.runner.loop`) or the warm start
  saves: parameters (`params`, or the whole model's), AdamW state of `optim`, key."""
  if params is None:
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  # The schedule's length changes no shape of the optimizer state.
  optimizer = build.make_optimizer(optim, 1, param_dtype=model_config.param_dtype)
  opt_state = jax.eval_shape(lambda p: optimizer.init(precision.float32_view(p)), params)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return checkpointing.CheckpointState(
      step=0, model=params, opt_state=opt_state, key=key, metadata={}
  )


def restore_step(workdir: str | pathlib.Path, step: int | None = None) -> Restored:
  """Restores one step of a run's RL checkpoints on this host's default device.

  One process, one device: the step's whole state (parameters and AdamW moments, three times
  the parameters' memory) is read unsharded.

  Args:
    workdir: the run's workdir.
    step: the RL step; None: the latest committed one.

  Returns:
    The step's parameters, the run's configs and the checkpoint's metadata.

  Raises:
    ExportError: no checkpoint, no such step, a damaged step (its files differ from its
      integrity manifest), a step without a config record, or a tokenizer that is gone.
    ConfigError: the recorded config is not valid for this version of gmpo_jax.
    checkpointing.CheckpointMismatchError: the stored arrays are not the recorded model's.
  """
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ExportError(f"{directory} does not exist: {workdir} holds no RL checkpoint.")
  with checkpointing.Checkpointer(directory) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise ExportError(f"{directory} holds no committed checkpoint.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ExportError(f"{directory} holds no checkpoint of step {step}; its steps: {steps}.")
    where = f"checkpoint step {step} in {directory}"
    try:
      metadata = ckpt.restore_metadata(step)
      config = run_config(metadata, where)
      try:
        tokenizer = build.build_tokenizer(config.model)
        model_config = policy_config(config.model, tokenizer)
      except (OSError, ValueError) as error:
        raise ExportError(f"the run's model or tokenizer cannot be read back: {error}") from error
      if config.model.lora is None:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
        restored = ckpt.restore(step, _restore_target(config.optim, model_config))
        params = restored.model
      else:
        base = _lora_base(pathlib.Path(workdir), config, model_config, tokenizer, metadata)
        graphdef, state = nnx.split(lora.apply_lora(base, config.model.lora, seed=config.seed))
        adapters, frozen = lora.split_adapters(state)
        restored = ckpt.restore(step, _restore_target(config.optim, model_config, adapters))
        params = nnx.merge_state(restored.model, frozen)
    except checkpointing.CorruptCheckpointError as error:
      others = [s for s in steps if s != step]
      raise ExportError(
          f"{where} is damaged, and a resume would not use it either: {error}. Other steps: "
          f"{others} (--step)."
      ) from error
  return Restored(
      step=step,
      params=params,
      graphdef=graphdef,
      config=config,
      model_config=model_config,
      tokenizer=tokenizer,
      metadata=metadata,
  )


def _lora_base(
    workdir: pathlib.Path,
    config: ExperimentConfig,
    model_config: TransformerConfig,
    tokenizer: tokenization.Tokenizer,
    metadata: Mapping[str, Any],
) -> Transformer:
  """A LoRA run's frozen base, rebuilt as the run built it, checked against its fingerprint.

  Raises:
    ExportError: the base cannot be rebuilt, or it is not the one the adapters were trained on.
  """
  if config.warm_start.steps > 0:
    directory = workdir / "warm_start"
    target = _restore_target(config.warm_start.optim, model_config)
    with checkpointing.Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      restored = ckpt.restore_latest(target)
    if restored is None:
      raise ExportError(f"the LoRA run's base is its warm start, and {directory} holds none.")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    base = nnx.merge(graphdef, restored.model)
  else:
    base = build.build_model(config.model, tokenizer, seed=config.seed)
  stored = metadata.get("lora_base") or {}
  fingerprint = lora.fingerprint(nnx.state(base))
  if stored.get("fingerprint") != fingerprint:
    raise ExportError(
        f"the base rebuilt from {workdir} (fingerprint {fingerprint}) is not the one the "
        f"adapters were trained on ({stored.get('path')!r}, fingerprint "
        f"{stored.get('fingerprint')})."
    )
  return base


def _number(value: Any) -> str:
  return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _with_interval(record: Mapping[str, Any], name: str) -> str:
  low, high = record.get(f"{name}/ci_low"), record.get(f"{name}/ci_high")
  interval = "" if low is None or high is None else f" [{_number(low)}, {_number(high)}]"
  return _number(record.get(name)) + interval


def run_card(workdir: str | pathlib.Path, restored: Restored) -> str:
  """The README section on the run: what it trained, this step's evaluation, its config."""
  workdir = pathlib.Path(workdir)
  config, step = restored.config, restored.step
  algo, model = config.algorithm, config.model
  start = f"`{model.name}` at random init" if model.hf_path is None else f"`{model.hf_path}`"
  if config.warm_start.steps:
    start += f", then up to {config.warm_start.steps} supervised warm-start steps"
  lines = [
      "## The run",
      "",
      f"RL step {step} of {config.num_steps} of the run in `{workdir}`, exported by "
      "`python -m gmpo_jax.export`.",
      "",
      f"- task: `{config.task.name}` {dict(config.task.kwargs)}",
      f"- starting policy: {start}",
      f"- advantage `{algo.advantage}`, objective `{algo.objective}`, {config.prompts_per_step} "
      f"prompts × {algo.num_generations} completions per step, seed {config.seed}",
  ]
  at_step = next((r for r in metrics_lib.read_metrics(workdir) if r["step"] == step), {})
  initial = restored.metadata.get("initial_eval") or {}
  # Each metric with its 95% interval (the `<name>/ci_low`, `<name>/ci_high` entries).
  names = sorted({k for k in [*at_step, *initial] if k.startswith("eval/") and "/ci_" not in k})
  lines += ["", "### Held-out evaluation", ""]
  if not any(k.startswith("eval/") for k in at_step):
    lines += [f"Step {step} was not evaluated (every {config.eval_every} steps and the last).", ""]
  if names:
    lines += [f"| metric (95% interval) | before RL | step {step} |", "|---|---|---|"]
    lines += [
        f"| {name} | {_with_interval(initial, name)} | {_with_interval(at_step, name)} |"
        for name in names
    ]
    lines += [
        "",
        f"Greedy pass@1 on the first {config.eval.num_examples} held-out prompts; "
        f"mean@{config.eval.num_samples}, pass@k and maj@k from samples at temperature "
        f"{config.eval.temperature} (top_p {config.sampling.top_p}, top_k "
        f"{config.sampling.top_k}), at most {config.sampling.max_new_tokens} new tokens.",
    ]
  summary_path = workdir / metrics_lib.SUMMARY_FILE
  try:
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
  except ValueError as error:  # a damaged summary costs the card a line, not the export
    logger.warning("%s is not JSON (%s); the card leaves it out", summary_path, error)
    summary = None
  if summary is not None:
    best = [
        f"{name} {_number(entry['value'])} at step {entry['step']}"
        for name, entry in (summary.get("best") or {}).items()
        if name.startswith("eval/") and entry
    ]
    lines += [
        "",
        f"`summary.json` (the run at step {summary.get('last_step')}): best "
        + ("; ".join(best) if best else "–")
        + ".",
    ]
  fields = restored.metadata[checkpointing.CONFIG_METADATA_KEY]["fields"]
  lines += ["", "### Config", "", "```json", json.dumps(fields, indent=1, sort_keys=True), "```"]
  return "\n".join(lines)


def export_run(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: int = hf_export.MAX_SHARD_SIZE,
    adapter: bool = False,
) -> pathlib.Path:
  """Exports one step of a run (see the module docstring); returns the export directory.

  `adapter`: a LoRA run's adapters alone, in the PEFT layout, instead of the merged model.

  Raises:
    ExportError: see `restore_step`; also a model the exporter cannot express and an `out`
      that exists and is not empty.
    ConfigError, checkpointing.CheckpointMismatchError: see `restore_step`.
  """
  try:
    hf_export.check_out_dir(out)
  except FileExistsError as error:
    raise ExportError(str(error)) from error
  restored = restore_step(workdir, step)
  config = restored.config
  model = config.model
  if adapter and model.lora is None:
    raise ExportError(f"{workdir} is a full-parameter run: it has no adapter to export.")
  policy = nnx.merge(restored.graphdef, restored.params)
  if adapter:
    if model.hf_path is None:
      raise ExportError(
          "the run's base is not a Hugging Face checkpoint (no model.hf_path), so "
          "PEFT would have nothing to load the adapter onto: export the merged "
          "model (without --adapter)."
      )
    return peft_export.export_peft(policy, model.lora, out, base_model=model.hf_path)
  params = restored.params if model.lora is None else nnx.state(lora.merge_adapters(policy))
  tokenizer = model.hf_path if model.tokenizer is None else model.tokenizer
  # The greedy decoding of the run's headline metric, pass@1, and its stop tokens.
  generation = {"do_sample": False, "max_new_tokens": config.sampling.max_new_tokens}
  if config.sampling.stop_ids:
    generation["eos_token_id"] = [restored.tokenizer.eos_id, *config.sampling.stop_ids]
  card = run_card(workdir, restored)
  try:
    return hf_export.export_hf(
        params,
        restored.model_config,
        out,
        dtype=dtype,
        tokenizer=tokenizer,
        generation=generation,
        card=card,
        max_shard_size=max_shard_size,
    )
  except (ValueError, FileExistsError) as error:
    raise ExportError(f"cannot export step {restored.step} of {workdir}: {error}") from error


def define_flags() -> None:
  """The command line's flags; defined only when it runs, as gmpo_jax.main has a --workdir too."""
  flags.DEFINE_string("workdir", None, "The run's workdir (gmpo_jax.main --workdir).")
  flags.DEFINE_integer("step", None, "The RL step to export; default the latest.")
  flags.DEFINE_string("out", None, "The directory to write; must not exist or be empty.")
  flags.DEFINE_enum(
      "dtype",
      None,
      ["float32", "bfloat16", "float16"],
      "Stored dtype; default the run's parameter dtype.",
  )
  flags.DEFINE_bool(
      "adapter",
      False,
      "A LoRA run's adapters alone, in the PEFT layout "
      "(adapter_config.json, adapter_model.safetensors), not the merged model.",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  logging.getLogger().setLevel(logging.INFO)
  # Orbax reports every file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    out = export_run(args.workdir, args.out, step=args.step, dtype=args.dtype, adapter=args.adapter)
  except (ExportError, ConfigError, checkpointing.CheckpointMismatchError) as error:
    # A user error, not a crash: one line naming what is wrong, no traceback.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"exported to {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
