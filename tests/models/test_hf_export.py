"""The Hugging Face export, checked against its consumers: transformers (PyTorch, CPU) loads it
and computes the JAX logits, `load_hf_checkpoint` reads back the exported parameters bit for
bit, and the command line exports a run's checkpoint."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

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
from safetensors import safe_open  # noqa: E402

from configs import smoke  # noqa: E402
from gmpo_jax import export  # noqa: E402
from gmpo_jax.config import ExperimentConfig  # noqa: E402
from gmpo_jax.infra import checkpointing  # noqa: E402
from gmpo_jax.infra import metrics as metrics_lib  # noqa: E402
from gmpo_jax.models import (
    hf_export,  # noqa: E402
    hf_import,  # noqa: E402
    tokenization,  # noqa: E402
)
from gmpo_jax.models.transformer import (
    Transformer,  # noqa: E402
    TransformerConfig,  # noqa: E402
)
from gmpo_jax.runner import build  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[2]


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
      "README.md",
      "config.json",
      "generation_config.json",
      "model.safetensors",
  ]
  stored = _stored_tensors(out)
  assert ("lm_head.weight" in stored) == (not config.tie_word_embeddings)
  assert len(stored) == len(hf_import.hf_tensor_targets(config))
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["model_type"] == family.split("_")[0]
  assert hf_config["rope_theta"] == config.rope_theta
  assert hf_config["dtype"] == hf_config["torch_dtype"] == "float32"

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  assert torch_model.config.tie_word_embeddings == config.tie_word_embeddings
  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  expected = hf_fixtures.torch_logits(torch_model, tokens, positions, mask)
  logits = np.asarray(
      hf_fixtures.jax_logits(
          nnx.merge(graphdef, state), *map(jnp.asarray, (tokens, positions, mask))
      )
  )
  scale = np.abs(expected[mask]).max()
  assert np.abs(logits[mask] - expected[mask]).max() <= 1e-5 * scale
  # The policy left its initial logits far behind: the export is not the fixture's files.
  initial_logits = hf_fixtures.torch_logits(initial, tokens, positions, mask)
  assert (
      np.abs(initial_logits[mask] - expected[mask]).max()
      > 1e3 * np.abs(logits[mask] - expected[mask]).max()
  )

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
  assert index["metadata"]["total_size"] == 4 * sum(x.size for x in jax.tree.leaves(state))
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
      out, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  tokens, positions, mask = hf_fixtures.left_padded_batch(config.vocab_size)
  np.testing.assert_allclose(
      hf_fixtures.torch_logits(torch_model, tokens, positions, mask)[mask],
      np.asarray(
          hf_fixtures.jax_logits(
              nnx.merge(graphdef, state), *map(jnp.asarray, (tokens, positions, mask))
          )
      )[mask],
      rtol=1e-5,
      atol=1e-5,
  )


def test_bfloat16_export_rounds_each_parameter_once(tmp_path):
  _, state, config, _ = _trained_policy("qwen2_bias_tied", tmp_path)
  out = hf_export.export_hf(state, config, tmp_path / "export", dtype="bfloat16")
  assert set(_stored_tensors(out).values()) == {"BF16"}
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["dtype"] == hf_config["torch_dtype"] == "bfloat16"
  reimported, reimported_config = hf_import.load_hf_checkpoint(out)
  assert reimported_config == dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16")
  _assert_same_params(nnx.state(reimported), jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))


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
  with pytest.raises(
      ValueError,
      match=r"blocks.mlp.down_proj has shape \(2, 128, 64\), the " r"config's model \(2, 96, 64\)",
  ):
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
  out = hf_export.export_hf(
      params, config, tmp_path / "export", tokenizer="char", generation={"temperature": 0.7}
  )

  char = tokenization.CharTokenizer()
  text = "12 + 34 =\n 46 ~{}!"
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tokenizer(text)["input_ids"] == [char.bos_id] + char.encode(text)
  assert (
      hf_tokenizer.decode(
          [char.bos_id] + char.encode(text) + [char.eos_id], skip_special_tokens=True
      )
      == text
  )
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


# --- The command line on a run's workdir ------------------------------------------------------


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory):
  """A workdir as `configs/smoke.py` leaves it after RL steps 1 and 2, written through the
  runner's Checkpointer with the runner's metadata (a real run takes over a minute here).

  Returns (workdir, {step: the policy's nnx.State}, the policy's config).
  """
  workdir = tmp_path_factory.mktemp("run")
  config_dict = smoke.get_config()
  config = ExperimentConfig.from_config(config_dict)
  model = build.build_model(config.model, build.build_tokenizer(config.model), seed=config.seed)
  _, params = nnx.split(model)
  opt_state = build.make_optimizer(config.optim, config.num_steps).init(params)
  record = checkpointing.config_record(json.loads(config_dict.to_json()))
  initial_eval = {"eval/pass@1": 0.25, "eval/pass@1/ci_low": 0.125, "eval/pass@1/ci_high": 0.5}
  saved = {}
  with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    for step in (1, 2):
      params = jax.tree.map(lambda x: x + 0.01, params)  # what an update would do: move them
      saved[step] = params
      ckpt.save(
          checkpointing.CheckpointState(
              step=step,
              model=params,
              opt_state=opt_state,
              key=jax.random.key(0),
              metadata={
                  checkpointing.CONFIG_METADATA_KEY: record,
                  "initial_eval": initial_eval,
                  "data_position": 4 * step,
                  "skipped_updates": 0,
              },
          )
      )
  lines = [
      {"step": 0, **initial_eval},
      {"step": 1, "loss": 0.5},
      {"step": 2, "eval/pass@1": 0.375, "eval/pass@1/ci_low": 0.25, "eval/pass@1/ci_high": 0.625},
  ]
  (workdir / metrics_lib.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
  (workdir / metrics_lib.SUMMARY_FILE).write_text(
      json.dumps({"last_step": 2, "best": {"eval/pass@1": {"value": 0.375, "step": 2}}})
  )
  return workdir, saved, model.config


def _export_command(*args):
  return subprocess.run(
      [sys.executable, "-m", "gmpo_jax.export", *args],
      capture_output=True,
      text=True,
      cwd=_REPO,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO)),
  )


def test_command_line_exports_the_latest_step(run_workdir, tmp_path):
  workdir, saved, config = run_workdir
  result = _export_command(f"--workdir={workdir}", f"--out={tmp_path / 'export'}")
  assert result.returncode == 0, result.stderr[-3000:]

  out = tmp_path / "export"
  reimported, reimported_config = hf_import.load_hf_checkpoint(out)
  assert reimported_config == config
  _assert_same_params(nnx.state(reimported), saved[2])
  char = tokenization.CharTokenizer()
  assert transformers.AutoTokenizer.from_pretrained(out)("1+2=")["input_ids"] == [
      char.bos_id
  ] + char.encode("1+2=")
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["do_sample"] is False
  assert generation["max_new_tokens"] == smoke.get_config().sampling.max_new_tokens
  card = (out / "README.md").read_text()
  assert f"RL step 2 of {smoke.get_config().num_steps} of the run in `{workdir}`" in card
  assert "| eval/pass@1 | 0.25 [0.125, 0.5] | 0.375 [0.25, 0.625] |" in card
  assert '"algorithm.objective": "geometric"' in card


def test_an_earlier_step_in_bfloat16(run_workdir, tmp_path):
  workdir, saved, config = run_workdir
  out = export.export_run(workdir, tmp_path / "export", step=1, dtype="bfloat16")
  reimported, reimported_config = hf_import.load_hf_checkpoint(out)
  assert reimported_config == dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16")
  _assert_same_params(
      nnx.state(reimported), jax.tree.map(lambda x: x.astype(jnp.bfloat16), saved[1])
  )
  assert "Step 1 was not evaluated" in (out / "README.md").read_text()


def test_a_damaged_step_is_refused_and_left_in_place(run_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run_workdir[0], workdir)
  data = max(
      (p for p in (workdir / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
      key=lambda p: p.stat().st_size,
  )
  damaged = bytearray(data.read_bytes())
  damaged[-1] ^= 0xFF
  data.write_bytes(bytes(damaged))

  result = _export_command(f"--workdir={workdir}", f"--out={tmp_path / 'export'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.fullmatch(
      r"error: checkpoint step 2 in .*/checkpoints is damaged, and a resume would not use it "
      r"either: .*\. Other steps: \[1\] \(--step\)\.",
      result.stderr.strip().splitlines()[-1],
  )
  assert not (tmp_path / "export").exists()
  assert (workdir / "checkpoints" / "2").is_dir()
  assert not (workdir / "checkpoints" / checkpointing.CORRUPTED_DIR).exists()

  with pytest.raises(export.ExportError, match=r"no checkpoint of step 7; its steps: \[1, 2\]"):
    export.export_run(workdir, tmp_path / "export", step=7)
  with pytest.raises(export.ExportError, match="holds no RL checkpoint"):
    export.export_run(tmp_path / "nowhere", tmp_path / "export")
  with pytest.raises(export.ExportError, match="is not an empty directory"):
    export.export_run(workdir, workdir, step=1)
