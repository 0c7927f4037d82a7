"""The learner update reduces the gradient over `data` once per step, not per micro-batch.

The compiled update (`learner.make_update_fn`, the runner's shardings, 4 micro-batches) is read
as optimized HLO: the collectives inside a `while` body (the micro-batch scan and the loops it
contains) run once per iteration, those outside once per step. On a data-parallel mesh
(8,1,1) none is left inside; the one gradient all-reduce outside carries every parameter.
Left to the SPMD partitioner (`learner.update_step` under plain `jax.jit`), the same step
all-reduces the whole gradient inside the scan: the test can fail.
"""

import re

import jax
import learner_setup as setup
import numpy as np

from gmpo_jax.infra import compilation, sharding
from gmpo_jax.learner import update as learner

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
NUM_MICROBATCHES = 4


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the entry computation's name."""
  computations, name, entry = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(2)
      computations[name] = []
      entry = name if header.group(1) else entry
    elif name and line.startswith(" "):
      computations[name].append(line)
  return computations, entry


def _opcode(line: str) -> str | None:
  match = re.search(r" ([a-z][\w\-]*)\((?:%|\))", line)
  return match.group(1) if match else None


def _collectives(computations, name, in_loop=False, found=None):
  """[(opcode, bytes of its result, whether a while body encloses it)] reachable from `name`."""
  found = [] if found is None else found
  for line in computations[name]:
    op = _opcode(line)
    if op is None or op.endswith("-done"):
      continue
    if op.replace("-start", "") in COLLECTIVES:
      shapes = re.findall(r"(f32|s32|pred)\[([\d,]*)\]", line.split(op + "(")[0])
      size = sum(
          {"f32": 4, "s32": 4, "pred": 1}[dtype]
          * int(np.prod([int(d) for d in dims.split(",") if d]))
          for dtype, dims in shapes
      )
      found.append((op.replace("-start", ""), size, in_loop))
      continue
    for attribute, callee in re.findall(r"(body|condition|calls|to_apply)=%?([\w.\-]+)", line):
      if callee in computations:
        _collectives(computations, callee, in_loop or attribute == "body", found)
  return found


def _update_hlo(defer: bool) -> tuple[str, int]:
  """The optimized HLO of the update on an (8,1,1) mesh, and the parameters' bytes."""
  mesh = sharding.make_mesh(data=8)
  graphdef, params = setup.model()
  optimizer = setup.optimizer()
  param_shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  opt_state = learner.init_opt_state(optimizer, params, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  if defer:
    update = learner.make_update_fn(
        graphdef,
        optimizer,
        setup.micro_loss(),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
  else:
    shardings = (param_shardings, opt_shardings, None)
    update = jax.jit(
        learner.update_step(graphdef, optimizer, setup.micro_loss()),
        in_shardings=shardings,
        out_shardings=shardings,
        compiler_options=compilation.learner_compiler_options(),
    )
  batch = learner.place_batch(setup.learner_batch(setup.rollout(seed=0), NUM_MICROBATCHES), mesh)
  hlo = update.lower(params, opt_state, batch).compile().as_text()
  return hlo, sum(x.size * 4 for x in jax.tree.leaves(params))


def test_the_gradient_is_all_reduced_once_after_the_micro_batch_scan():
  hlo, param_bytes = _update_hlo(defer=True)
  found = _collectives(*_computations(hlo))
  assert not [c for c in found if c[2]], [c for c in found if c[2]]
  # Every parameter's gradient crosses the devices once (the loss rides along).
  reduced = sum(size for op, size, _ in found if op == "all-reduce")
  assert param_bytes <= reduced < param_bytes + 1024, (reduced, param_bytes)


def test_left_to_the_partitioner_the_gradient_is_all_reduced_per_micro_batch():
  hlo, param_bytes = _update_hlo(defer=False)
  in_loop = sum(
      size
      for op, size, inside in _collectives(*_computations(hlo))
      if op == "all-reduce" and inside
  )
  assert in_loop >= param_bytes, (in_loop, param_bytes)
