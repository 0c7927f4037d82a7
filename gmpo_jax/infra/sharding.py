"""The device mesh and the rules that place parameters, optimizer state and batches on it.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `layers`; see `gmpo_jax.models.transformer`). `LOGICAL_RULES` maps them onto the
mesh axes `data`, `fsdp` and `tensor`:

- `data`: pure data parallelism; parameters are replicated along it.
- `fsdp`: data parallelism with parameters (and so optimizer state) sharded along `embed`
  (ZeRO-3 style: XLA all-gathers a layer's weights where it is used).
- `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

Batches are split over `data` x `fsdp`, and so are the model's hidden states when it is traced
under `jax.set_mesh` (`constrain_to_batch_axes`). A parameter dimension that the mesh axes do not divide
evenly is replicated instead (a KV-head count of 2 on a tensor axis of 4, say), so every
model runs on every mesh. The optimizer state mirrors the parameters: every moment tree is
placed like the parameter tree it belongs to (`opt_state_shardings`), its step counters are
replicated.

The mesh spans every device of every process (`jax.devices()`), so the same code runs on one
CPU, on a multi-GPU host and, after `gmpo_jax.infra.distributed.initialize`, on a TPU pod slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmpo_jax.infra import hbm

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(
    *, data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left.

  Raises:
    ValueError: the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
        f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(
          f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} " f"tensor={tensor}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices) or min(sizes) < 1:
    raise ValueError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} does not match "
        f"{len(devices)} devices"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the mesh axes of every dimension they do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """`NamedSharding`s for an `nnx.State` (or a pytree of Variables) from its logical names."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda x, spec: NamedSharding(mesh, _fit(spec, x.shape, mesh)), state, specs)


def replicated_over(shardings: Any, axis: str) -> Any:
  """`shardings` with the mesh axis `axis` removed from every spec: each array replicated
  over it, split as before over the other axes."""

  def drop(named: NamedSharding) -> NamedSharding:
    entries = []
    for entry in named.spec:
      names = (entry,) if isinstance(entry, str) else tuple(entry or ())
      kept = tuple(n for n in names if n != axis)
      entries.append(kept[0] if len(kept) == 1 else (kept or None))
    return NamedSharding(named.mesh, P(*entries))

  return jax.tree.map(drop, shardings)


def sampler_copy_shardings(
    param_shardings: Any, mesh: Mesh, *, copy_bytes: int, hbm_bytes: float | None
) -> Any:
  """The shardings of the sampler's compute-dtype copy of the parameters on the learner's mesh:
  `param_shardings` replicated over fsdp when the copy fits (`hbm.sampler_replicates`), so a
  decode step gathers no weight; `param_shardings` itself otherwise.

  Args:
    param_shardings: the learner's parameter shardings on `mesh`.
    mesh: the learner's mesh.
    copy_bytes: the copy's bytes, unsharded.
    hbm_bytes: one device's HBM (`hbm.device_hbm_bytes`); None: unknown (the CPU).
  """
  if hbm.sampler_replicates(
      copy_bytes=copy_bytes,
      fsdp=mesh.shape["fsdp"],
      tensor=mesh.shape["tensor"],
      hbm_bytes=hbm_bytes,
  ):
    return replicated_over(param_shardings, "fsdp")
  return param_shardings


def opt_state_shardings(
    optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """`NamedSharding`s of `optimizer.init(params)`: each moment tree sharded like `params`.

  Left to sharding propagation, `jax.jit(optimizer.init)` returns the moments replicated
  (`zeros_like` does not depend on its argument's values), which would keep a full copy of
  Adam's two moment trees on every FSDP shard. `optax.tree_utils.tree_map_params` finds the
  copies of the parameter tree inside the state; everything else (step counts, schedule
  state) is replicated.

  Args:
    optimizer: the optax transformation whose state is wanted.
    params: the parameters (arrays or `jax.ShapeDtypeStruct`s), the argument of `init`.
    param_shardings: a pytree of `NamedSharding` with the structure of `params`.
    mesh: the mesh of `param_shardings`.

  Returns:
    A pytree with the structure of `optimizer.init(params)` and `NamedSharding` leaves.
  """
  abstract_state = jax.eval_shape(optimizer.init, params)
  return optax.tree_utils.tree_map_params(
      optimizer,
      lambda _, param_sharding: param_sharding,
      abstract_state,
      param_shardings,
      transform_non_params=lambda _: replicated(mesh),
  )


def batch_sharding(mesh: Mesh, *, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Splits `batch_axis` of an ndim-array over data x fsdp; other axes replicated."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def constrain_to_batch_axes(x: jax.Array) -> jax.Array:
  """Pins axis 0 of `x` to the batch axes (data x fsdp), other axes replicated, when traced
  under a mesh.

  Inside the model, the hidden states [B, T, D] otherwise take whatever layout XLA's sharding
  propagation picks; with FSDP-sharded weights it can keep whole activations on every device
  (measured: 1787 -> 930 MiB of temporaries for llama-100m, batch 16, on a 2x4x1 mesh). The
  constraint applies under `jax.set_mesh` to the batch axes that are Auto; inside a
  `shard_map` that made some of them Manual (the learner's update over `data`), x already
  holds that axis's shard and is pinned to the rest (`fsdp`). Anywhere else (no mesh,
  single-device code, every batch axis Manual or one Explicit, a sampler or eval batch that
  does not divide) it returns `x` unchanged. It changes where values live, never their values.

  Args:
    x: [B, ...] an activation with the batch on its leading axis.

  Returns:
    `x`, constrained to P(<the Auto batch axes>, None, ...) or unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.auto_axes) | set(mesh.manual_axes):
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.auto_axes)
  if not axes or x.ndim == 0 or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def target_platform() -> str:
  """The platform the code being traced will run on: that of the context mesh's devices.

  Kernels and defaults that differ per platform (`gmpo_jax.models.attention.resolve_impl`, block
  sizes, the KV-cache dtype) ask this rather than `jax.default_backend()`: under
  `jax.set_mesh` over a TPU topology's devices (`jax.experimental.topologies`), a CPU host
  then traces the program a TPU VM runs. Without a mesh, or on a mesh that names no devices,
  it is the default backend.

  Returns:
    'cpu', 'gpu' / 'cuda' / 'rocm', 'tpu', ...
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings(tree: Any) -> Any:
  """The sharding of every array of `tree` (e.g. an optimizer state placed on a mesh)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def prng_key(seed: int, mesh: Mesh) -> jax.Array:
  """The typed PRNG key `jax.random.key(seed)`, replicated over `mesh`.

  Created inside a computation on the mesh: a key made eagerly sits on one local device of
  each process, which a multi-process Orbax checkpoint cannot save and `jax.device_put`
  cannot move onto a mesh that spans other processes.
  """
  return jax.jit(jax.random.key, out_shardings=replicated(mesh))(seed)


def batch_size_multiple(mesh: Mesh) -> int:
  """Batches split over data x fsdp must have a multiple of this many rows."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
