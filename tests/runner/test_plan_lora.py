"""The TPU plan of a LoRA policy: the programs the runner would run, compiled for v5e:2x2.

`configs/smoke.py`'s one-layer model with `configs/lora.py`'s adapters (rank 2, every
projection) on an int8 base, planned in this process (`gmpo_jax.runner.tpu_plan`). The update
must hold, donate and return the adapters and their Adam state alone, with the frozen base an
input; gradients exist for the adapters only. The full-parameter plan is checked beside it
on the same shapes, and by `test_plan.py` end to end.

Skipped where libtpu is not installed.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import pytest
from flax import nnx

from configs import lora as lora_configs
from configs import smoke
from gmpo_jax.config import ExperimentConfig
from gmpo_jax.infra import sharding
from gmpo_jax.models import lora as lora_lib
from gmpo_jax.models.quantization import QuantizedWeight
from gmpo_jax.runner import abstract_step, plan_report, tpu_plan

pytest.importorskip(
    "libtpu",
    reason="compiling for a TPU topology needs libtpu "
    "(pip install libtpu==0.0.42.1, in the 'test' extra)",
)

RANK = 2
PROMPT = 16
pytestmark = pytest.mark.usefixtures("no_persistent_cache")


@pytest.fixture(scope="module")
def v5e() -> tpu_plan.Target:
  # Another process may hold libtpu already; describing a topology takes no chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return tpu_plan.tpu_target("v5e:2x2")


def _config(*, lora: bool, dtype: str | None = None) -> ExperimentConfig:
  """configs/smoke.py, with configs/lora.py's adapters of rank `RANK` on an int8 base."""
  config = smoke.get_config()
  config.model.dtype = dtype
  if lora:
    config.model.lora = lora_configs.get_config(str(RANK)).model.lora
    config.model.lora.base_dtype = "int8"
  return ExperimentConfig.from_config(config)


def _float32_bytes(tree) -> int:
  return sum(x.size * 4 for x in jax.tree.leaves(tree))


def _moment_bytes(opt_state) -> int:
  """Bytes of the optimizer state's arrays (Adam's moments); its scalars are counts."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if x.ndim)


def _variables(state) -> list[nnx.Variable]:
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_the_lora_update_trains_donates_and_returns_the_adapters_alone(v5e):
  full_config, lora_config = _config(lora=False), _config(lora=True)
  model = abstract_step.model_config(full_config.model)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1, devices=v5e.devices)
  shape = abstract_step.step_shape(full_config, prompt_length=PROMPT)
  full_policy = abstract_step.abstract_policy(model, mesh)
  policy = abstract_step.abstract_policy(model, mesh, lora=lora_config.model.lora, seed=0)
  chunk = full_config.chunk_size
  full = abstract_step.update_program(full_config, full_policy, mesh, shape, chunk_size=chunk)
  update = abstract_step.update_program(lora_config, policy, mesh, shape, chunk_size=chunk)

  params, full_state, _ = full.args
  adapters, state, _, base = update.args
  # r·(fan-in + fan-out) per adapted weight: q, k, v, o, then gate, up, down, per layer.
  d, hd, f = model.hidden_size, model.head_dim, model.intermediate_size
  q, kv = model.num_heads * hd, model.num_kv_heads * hd
  per_layer = (d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f)
  assert sum(x.size for x in jax.tree.leaves(adapters)) == RANK * model.num_layers * per_layer
  assert all(isinstance(v, lora_lib.LoRAParam) for v in _variables(adapters))
  assert not any(isinstance(v, lora_lib.LoRAParam) for v in _variables(base))
  assert {str(x.dtype) for x in jax.tree.leaves(adapters)} == {"float32"}
  # QLoRA: every projection of the base quantized (int8 codes beside float32 block scales).
  blocks = nnx.merge(policy.graphdef, policy.params).blocks
  for owner, name in [(blocks.attn, "q_proj"), (blocks.mlp, "down_proj")]:
    weight = getattr(owner, name)
    assert isinstance(weight, QuantizedWeight) and str(weight.codes.dtype) == "int8"
  # Adam's two float32 moments cover exactly what is trained: every parameter without LoRA,
  # the adapters alone with it.
  assert _moment_bytes(full_state) == 2 * _float32_bytes(params)
  assert _moment_bytes(state) == 2 * _float32_bytes(adapters)
  assert _float32_bytes(adapters) * 4 < _float32_bytes(params)

  lowered = update.lower(mesh)
  donated = jax.tree.map(lambda info: info.donated, lowered.args_info[0])
  assert all(jax.tree.leaves((donated[0], donated[1])))  # adapters and their state
  assert not any(jax.tree.leaves((donated[2], donated[3])))  # the batch and the frozen base
  new_adapters, new_state, _ = lowered.out_info
  assert jax.tree.structure(new_adapters) == jax.tree.structure(adapters)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # The full-parameter update still donates and returns every parameter.
  full_lowered = full.lower(mesh)
  assert all(jax.tree.leaves(jax.tree.map(lambda i: i.donated, full_lowered.args_info[0][:2])))
  assert jax.tree.structure(full_lowered.out_info[0]) == jax.tree.structure(params)

  # The micro-batch gradient (the update's loop body) is taken for the adapters only: one
  # float32 array per adapter, stacked over the `data` replicas.
  gradient = abstract_step.gradient_program(lora_config, policy, mesh, shape, chunk_size=chunk)
  _, grads = gradient.lower(mesh).out_info
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for grad, adapter in zip(jax.tree.leaves(grads), jax.tree.leaves(adapters)):
    assert grad.shape == (mesh.shape["data"],) + adapter.shape and str(grad.dtype) == "float32"


def test_a_lora_plan_compiles_every_program_within_the_chip(v5e):
  # bfloat16 compute: the sampler reads a bfloat16 copy of the float32 adapters.
  config = _config(lora=True, dtype="bfloat16")
  model = abstract_step.model_config(config.model)
  plan = tpu_plan.plan(config, model, v5e, prompt_length=PROMPT)
  assert plan.refusal is None, plan.refusal
  programs = {p.name: p for p in plan.programs}
  assert list(programs) == ["prefill", "decode", "logprob", "update"]
  assert all(p.fits and p.estimated_seconds > 0 for p in plan.programs)
  lora = plan.to_json()["model"]["lora"]
  assert lora["rank"] == RANK and lora["base_dtype"] == "int8" and len(lora["targets"]) == 7
  assert "LoRA: rank 2" in plan_report.format_plan(plan)

  mesh = plan.setup.mesh(v5e)
  policy = abstract_step.abstract_policy(model, mesh, lora=config.model.lora, seed=config.seed)
  optimizer = abstract_step.optimizer_for(config, model)
  opt_state = abstract_step.abstract_opt_state(optimizer, policy, mesh)
  adapters, base = policy.split(policy.params)
  gib = tpu_plan.GIB

  def held(name):
    return programs[name].memory["held"] * gib

  # While sampling, the learner holds its float32 adapters and their Adam state (the sampler
  # reads the base itself); while learning, the sampler's bfloat16 copy of the adapters.
  assert held("prefill") == held("decode") == tpu_plan.shard_bytes((adapters, opt_state))
  assert held("update") == tpu_plan.shard_bytes(abstract_step.sampler_copy(policy))
  # What the update returns beyond its donated buffers (the step's scalars) is less than the
  # frozen base: the base is neither donated nor returned.
  memory = programs["update"].memory
  assert (memory["outputs"] - memory["aliased"]) * gib < tpu_plan.shard_bytes(base)
