"""Per-device memory and step time of the learner update across (data, fsdp, tensor) meshes.

The update is the runner's: `learner.make_update_fn` with the GMPO policy loss, AdamW behind
global-norm clipping, parameters and optimizer state placed by `gmpo_jax.infra.sharding`'s logical
rules, the batch split over data x fsdp. Memory comes from XLA's compiled
`memory_analysis()` for one device (arguments = parameters + optimizer state + batch shard;
temporaries = activations, gradients and workspace; peak ≈ arguments + outputs − aliased
(donated) + temporaries). The time is the median wall-clock time of one step after warmup.

On simulated CPU devices (`--xla_force_host_platform_device_count`) every "device" is a
thread pool on the same cores: the memory per device is what a real device of that mesh would
need, but the times measure correctness plumbing and overheads, not scaling or speed.

    .venv/bin/python benchmarks/mesh_bench.py --devices 8
    .venv/bin/python benchmarks/mesh_bench.py --devices 8 --models tiny --time-models tiny

Models listed in --models but not in --time-models are compiled only (no parameters are
materialised), so the ~100M model costs compile time, not memory.
"""

import argparse
import datetime
import os
import pathlib
import shlex
import statistics
import sys
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--devices", type=int, default=8, help="simulated CPU devices (ignored on an accelerator)"
  )
  parser.add_argument("--models", nargs="+", default=["tiny", "llama-100m"])
  parser.add_argument(
      "--time-models", nargs="*", default=["tiny"], help="models whose update is executed and timed"
  )
  parser.add_argument(
      "--meshes",
      nargs="+",
      default=["1x1x1", "8x1x1", "2x4x1", "2x2x2"],
      help="data x fsdp x tensor; 1x1x1 runs on the first device only",
  )
  parser.add_argument("--batch", type=int, default=16, help="sequences per update")
  parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  return parser.parse_args()


ARGS = _parse()
# `configs/` is not an installed package: the runner's default optimizer settings live there.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Must precede JAX's initialisation.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from gmpo_jax.config import AlgorithmConfig  # noqa: E402
from gmpo_jax.infra import sharding  # noqa: E402
from gmpo_jax.learner import update as learner  # noqa: E402
from gmpo_jax.models.logprobs import positions_from_mask  # noqa: E402
from gmpo_jax.models.transformer import Transformer, TransformerConfig  # noqa: E402
from gmpo_jax.runner import build  # noqa: E402

MIB = 2**20


def _mesh(name):
  data, fsdp, tensor = (int(s) for s in name.split("x"))
  devices = jax.devices()[: data * fsdp * tensor] if name == "1x1x1" else None
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)


def _batch(config, rng):
  """A GMPO learner batch [M, b, T]: prompts of T/4 tokens, completions filling the rest."""
  n, t, m = ARGS.batch, ARGS.length, ARGS.microbatches
  tokens = rng.integers(0, config.vocab_size, (n, t)).astype(np.int32)
  key_mask = np.ones((n, t), bool)
  loss_mask = key_mask & (np.arange(t)[None] >= t // 4)
  old = np.where(loss_mask, rng.normal(-np.log(config.vocab_size), 0.3, (n, t)), 0.0)
  batch = learner.Batch(
      tokens=tokens,
      positions=np.asarray(positions_from_mask(jnp.asarray(key_mask))),
      key_mask=key_mask,
      loss_mask=loss_mask,
      old_logp=old.astype(np.float32),
      ref_logp=old.astype(np.float32),
      advantages=rng.normal(size=n).astype(np.float32),
  )
  return jax.tree.map(lambda x: x.reshape((m, n // m) + x.shape[1:]), batch)


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def measure(model_name, mesh_name, timed):
  config = TransformerConfig.from_name(model_name)
  mesh = _mesh(mesh_name)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  )
  optimizer = build.make_optimizer(default.get_config().optim, total_updates=100)
  param_shardings = sharding.state_shardings(abstract_params, mesh)
  opt_shardings = sharding.opt_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  algo = AlgorithmConfig(
      advantage="gmpo", objective="geometric", num_microbatches=ARGS.microbatches
  )
  update = learner.make_update_fn(
      graphdef,
      optimizer,
      build.policy_loss(algo, temperature=1.0, chunk_size=64, max_length=ARGS.length),
      param_shardings=param_shardings,
      opt_shardings=opt_shardings,
  )
  batch = _batch(config, np.random.default_rng(0))
  batch_shardings = jax.tree.map(
      lambda x: sharding.batch_sharding(mesh, ndim=x.ndim, batch_axis=1), batch
  )
  start = time.perf_counter()
  # As in the runner: under the mesh, so the model's activation constraints apply.
  with jax.set_mesh(mesh):
    compiled = update.lower(
        _abstract(abstract_params, param_shardings),
        _abstract(jax.eval_shape(optimizer.init, abstract_params), opt_shardings),
        _abstract(batch, batch_shardings),
    ).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  row = dict(
      model=model_name,
      mesh=mesh_name,
      devices=mesh.size,
      params_m=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)) / 1e6,
      args_mib=memory.argument_size_in_bytes / MIB,
      temp_mib=memory.temp_size_in_bytes / MIB,
      peak_mib=(
          memory.argument_size_in_bytes
          + memory.output_size_in_bytes
          - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes
      )
      / MIB,
      compile_s=compile_s,
      step_ms=None,
  )
  if timed:
    params = jax.device_put(nnx.split(Transformer(config, rngs=nnx.Rngs(0)))[1], param_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    placed = jax.device_put(batch, batch_shardings)
    times = []
    for i in range(ARGS.warmup + ARGS.repeats):
      start = time.perf_counter()
      params, opt_state, out = compiled(params, opt_state, placed)
      jax.block_until_ready(out.loss)
      if i >= ARGS.warmup:
        times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * statistics.median(times)
  return row


def main():
  rows = [
      measure(model, mesh, model in ARGS.time_models)
      for model in ARGS.models
      for mesh in ARGS.meshes
  ]
  device = jax.devices()[0]
  simulated = device.platform == "cpu"
  note = " (simulated CPU devices: memory is per device; times are NOT speed)" if simulated else ""
  print(
      f"# mesh_bench — {datetime.date.today()}, {len(jax.devices())} x {device.device_kind}"
      f"{note}"
  )
  print(f"# command: {shlex.join([sys.executable.split('/')[-1]] + sys.argv)}")
  print(
      f"# batch {ARGS.batch} x {ARGS.length} tokens, {ARGS.microbatches} micro-batch(es), "
      "GMPO loss, AdamW, float32\n"
  )
  print(
      "| model | params | mesh (d×f×t) | devices | args MiB/dev | temp MiB/dev | peak MiB/dev "
      "| compile s | step ms |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    step = "—" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
    print(
        f"| {r['model']} | {r['params_m']:.1f}M | {r['mesh']} | {r['devices']} "
        f"| {r['args_mib']:.1f} | {r['temp_mib']:.1f} | {r['peak_mib']:.1f} "
        f"| {r['compile_s']:.1f} | {step} |"
    )


if __name__ == "__main__":
  main()
