"""The RL step's programs compile for a TPU: the tiny model on a v5e:2x2 topology, from this host.

With libtpu installed, `jax.experimental.topologies` describes a TPU slice without one, and
`jax.jit(...).lower(abstract inputs).compile()` runs the TPU compiler on the project's own
programs: the learner's update (`learner.make_update_fn`), its log-prob rescoring
(`learner.logprob_program`) and the sampler's program (the prefill and decode loop that
`sampling.generate` compiles), traced under `jax.set_mesh` over the topology's 4 chips
(data 2 x fsdp 2), as the runner traces them. Nothing runs. The learner's programs must hold
the splash kernel (a `tpu_custom_call`, reachable on 4 chips only inside `shard_map`), which
also shows that the model picked its kernel for the mesh's platform and not for this host's
CPU. Per-layer remat must cut the update's temporary memory.

Skipped where libtpu is not installed.
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.infra import sharding
from gmpo_jax.learner import update as learner
from gmpo_jax.models.logprobs import sequence_logprobs
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout import sampling
from gmpo_jax.runner import build

pytest.importorskip(
    "libtpu",
    reason="compiling for a TPU topology needs libtpu "
    "(pip install libtpu==0.0.42.1, in the 'test' extra)",
)

TOPOLOGY = "v5e:2x2"
V5E_HBM_BYTES = 16 * 2**30
KERNEL = "tpu_custom_call"
# bfloat16 compute as on a TPU; 'auto' attention, so the model must choose splash itself.
MODEL = dataclasses.replace(TransformerConfig.from_name("tiny"), dtype="bfloat16")
M, B, T = 2, 4, 128  # micro-batches x rows (a multiple of data x fsdp) x tokens
PROMPT, NEW_TOKENS = 32, 16
READ_BUCKET = 8  # the sampler's cache windows: 40 and 48 slots


pytestmark = pytest.mark.usefixtures("no_persistent_cache")


@pytest.fixture(scope="module")
def mesh():
  # Another process (an xdist worker, a second test run) may hold libtpu already; describing
  # a topology takes no chip, so sharing it is safe.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  topology = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
  return sharding.make_mesh(data=2, fsdp=2, tensor=1, devices=topology.devices)


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


@pytest.fixture(scope="module")
def model(mesh):
  """(graphdef, abstract parameters placed on the mesh, their shardings)."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(MODEL, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(params, mesh)
  return graphdef, _abstract(params, shardings), shardings


def _rows(mesh, shape, dtype, batch_axis=0):
  return jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, ndim=len(shape), batch_axis=batch_axis)
  )


def _compile(mesh, fn, *args, **static):
  """The TPU executable of `fn(*args, **static)`, traced under the mesh as the runner does."""
  with jax.set_mesh(mesh):
    return fn.lower(*args, **static).compile()


def _check_fits(compiled):
  memory = compiled.memory_analysis()
  used = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
  )
  assert 0 < used < V5E_HBM_BYTES


def test_the_mesh_targets_tpu(mesh):
  """Whatever this host's backend, code traced under the TPU mesh targets the TPU."""
  with jax.set_mesh(mesh):
    assert sharding.target_platform() == "tpu"
  assert sharding.target_platform() == jax.default_backend()


def test_update_compiles_with_splash(mesh, model):
  graphdef, params, param_shardings = model
  optimizer = build.make_optimizer(
      ml_collections.ConfigDict(
          dict(
              learning_rate=1e-6,
              warmup_steps=1,
              end_lr_fraction=0.1,
              max_grad_norm=1.0,
              b1=0.9,
              b2=0.99,
              weight_decay=0.01,
          )
      ),
      total_updates=10,
  )
  opt_shardings = sharding.opt_state_shardings(optimizer, params, param_shardings, mesh)
  opt_state = _abstract(jax.eval_shape(optimizer.init, params), opt_shardings)
  algo = AlgorithmConfig(advantage="gmpo", objective="geometric", num_microbatches=M)
  update = learner.make_update_fn(
      graphdef,
      optimizer,
      build.policy_loss(algo, temperature=1.0, chunk_size=64, max_length=NEW_TOKENS),
      param_shardings=param_shardings,
      opt_shardings=opt_shardings,
  )
  sequences = lambda dtype: _rows(mesh, (M, B, T), dtype, batch_axis=1)
  batch = learner.Batch(
      tokens=sequences(jnp.int32),
      positions=sequences(jnp.int32),
      key_mask=sequences(bool),
      loss_mask=sequences(bool),
      old_logp=sequences(jnp.float32),
      ref_logp=sequences(jnp.float32),
      advantages=_rows(mesh, (M, B), jnp.float32, 1),
  )
  compiled = _compile(mesh, update, params, opt_state, batch)
  assert KERNEL in compiled.as_text()
  _check_fits(compiled)


def test_logprobs_compile_with_splash(mesh, model):
  graphdef, params, param_shardings = model
  logprobs = learner.logprob_program(
      graphdef, param_shardings, mesh, temperature=1.0, chunk_size=64
  )
  compiled = _compile(
      mesh, logprobs, params, _rows(mesh, (B, T), jnp.int32), _rows(mesh, (B, T), bool)
  )
  assert KERNEL in compiled.as_text()
  _check_fits(compiled)


def test_sampler_compiles(mesh, model):
  """The sampler's program: prefill (blockwise: splash cannot extend a cache) and the decode
  loop (the dense kernel), with the KV-cache dtype the TPU target gets by default.

  `sampling.generate` is host code (it reads the prompts to bucket them), so the program it
  compiles for a bucket is lowered directly, with abstract prompts and sampling knobs."""
  graphdef, params, _ = model
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  knobs = sampling._Knobs(  # pylint: disable=protected-access
      inverse_temperature=scalar(jnp.float32),
      greedy=scalar(bool),
      top_k=scalar(jnp.int32),
      top_p=scalar(jnp.float32),
      is_stop=jax.ShapeDtypeStruct((MODEL.vocab_size,), bool),
      pad_id=scalar(jnp.int32),
  )
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = _compile(
      mesh,
      sampling._generate_bucketed,  # pylint: disable=protected-access
      graphdef,
      params,
      _rows(mesh, (B, PROMPT), jnp.int32),
      _rows(mesh, (B, PROMPT), bool),
      key,
      knobs,
      max_new_tokens=NEW_TOKENS,
      cache_dtype=None,
      steps_per_check=sampling.default_steps_per_check("tpu"),
      cache_read_bucket=READ_BUCKET,
  )
  hlo = compiled.as_text()
  assert KERNEL not in hlo and "while" in hlo
  _check_fits(compiled)
  # The decode kernel reads the cache in place: no copy of a layer's K or V (any window).
  windows = sampling.read_windows(PROMPT, NEW_TOKENS, READ_BUCKET)
  assert len(windows) > 1
  shapes = [
      tuple(int(d) for d in dims.split(","))
      for dims in re.findall(r"= bf16\[([\d,]+)\][^ ]* copy\(", hlo)
  ]
  assert not [s for s in shapes if s[-1] == MODEL.head_dim and set(s) & set(windows)], shapes


@pytest.mark.slow  # three compiles of a larger program: ~35 s of CPU each
def test_remat_cuts_the_backward_memory(mesh):
  """Temporary HBM of the policy gradient's backward pass on v5e, per remat policy: keeping
  only the projections' outputs must need less than keeping everything, and keeping only
  each layer's input (recomputing the block) less still. 4 layers and 8 x 512 tokens per
  chip, so that the saved activations dominate the temporaries."""
  batch, length = 32, 512
  rows = lambda dtype: _rows(mesh, (batch, length), dtype)
  temp = {}
  for remat in ("none", "projections", "full"):
    config = dataclasses.replace(MODEL, num_layers=4, remat=remat)
    graphdef, params = nnx.split(nnx.eval_shape(lambda c=config: Transformer(c, rngs=nnx.Rngs(0))))
    params = _abstract(params, sharding.state_shardings(params, mesh))

    def loss(params, tokens, positions, key_mask, graphdef=graphdef):
      model = nnx.merge(graphdef, params)
      return jnp.sum(sequence_logprobs(model, tokens, positions, key_mask, chunk_size=256))

    compiled = _compile(
        mesh, jax.jit(jax.grad(loss)), params, rows(jnp.int32), rows(jnp.int32), rows(bool)
    )
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["projections"] < temp["none"], temp
