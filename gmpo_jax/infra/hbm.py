"""Accelerator memory: each chip's HBM, what a run's state takes of it, and the mesh that fits.

A data-parallel mesh keeps a full copy of the parameters and of the optimizer state on every
device. `auto_fsdp` decides when that copy is too large for a chip and shards it instead
(`fsdp` over the data devices, `gmpo_jax.infra.sharding`): the runner can call it with the
abstract state before placing anything, and `python -m gmpo_jax.plan` does, before it compiles.

HBM capacity and bandwidth per chip come from `device.memory_stats()` where the device can
report it (a real accelerator) and otherwise from `CHIP_HBM`, the published figures (Google
Cloud's TPU system-architecture pages: v4 32 GiB at 1200 GB/s, v5e 16 GiB at 819 GB/s, v5p
95 GiB at 2765 GB/s, v6e 32 GiB at 1638 GB/s; the TPU compiler itself reports 15.75 GiB of a
v5e's 16 as usable).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

GIB = 2**30


class ChipHBM(NamedTuple):
  """One chip's high-bandwidth memory: capacity in bytes and bandwidth in bytes per second."""

  capacity: float
  bandwidth: float


# Matched in order on the lower case `jax.Device.device_kind`, more specific names first (as
# `gmpo_jax.runner.perf.CHIP_PEAK_TFLOPS`): "tpu v5 lite" is v5e, "tpu v5" v5p.
CHIP_HBM: tuple[tuple[str, ChipHBM], ...] = (
    ("tpu v4", ChipHBM(32 * GIB, 1200e9)),
    ("tpu v5 lite", ChipHBM(16 * GIB, 819e9)),
    ("tpu v5e", ChipHBM(16 * GIB, 819e9)),
    ("tpu v5p", ChipHBM(95 * GIB, 2765e9)),
    ("tpu v5", ChipHBM(95 * GIB, 2765e9)),
    ("tpu v6 lite", ChipHBM(32 * GIB, 1638e9)),
    ("tpu v6e", ChipHBM(32 * GIB, 1638e9)),
)

# The share of a chip's HBM that a replicated copy of the parameters and optimizer state may
# take before `auto_fsdp` shards it. The rest holds the gradients (as large as the parameters),
# the activations of a micro-batch and the sampler's KV cache; at a quarter, Qwen2.5-1.5B in
# bfloat16 with Adam (9.3 GB) is sharded on a 16 GiB v5e and stays replicated on a 95 GiB v5p,
# and 7B (46 GB) is sharded on both, as their compiled programs need (docs/tpu.md).
STATE_FRACTION = 0.25


# The share of a chip's HBM that the sampler's compute-dtype copy of the parameters may take
# replicated over the fsdp axis (`sampler_replicates`). Sharded, every decode step all-gathers
# every weight to every chip: the weights cross the interconnect once per generated token,
# which costs more than the step's own HBM reads. A quarter keeps Qwen2.5-0.5B and 1.5B
# (1.0 and 3.1 GB in bfloat16) replicated on a 16 GiB v5e and 7B (15.2 GB) on a 95 GiB v5p.
SAMPLER_COPY_FRACTION = 0.25


def chip_hbm(device_kind: str) -> ChipHBM | None:
  """The published HBM of a `jax.Device.device_kind` in `CHIP_HBM`; None if unknown."""
  kind = device_kind.lower()
  for name, hbm in CHIP_HBM:
    if name in kind:
      return hbm
  return None


def device_hbm_bytes(device: jax.Device) -> float | None:
  """HBM bytes one device offers: its allocator's limit if it reports one, else `CHIP_HBM`.

  A device of a compile-only topology (`jax.experimental.topologies`) has no allocator and
  reports nothing; the table answers for it. None for a device neither knows (the CPU).
  """
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    # Compile-only and CPU devices raise (the kind differs by backend) rather than return None.
    stats = {}
  if "bytes_limit" in stats:
    return float(stats["bytes_limit"])
  hbm = chip_hbm(device.device_kind)
  return None if hbm is None else hbm.capacity


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s), unsharded."""
  return int(
      sum(
          np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
          for x in jax.tree.leaves(tree)
      )
  )


class MeshChoice(NamedTuple):
  """The (data, fsdp, tensor) sizes `auto_fsdp` picked; `sharded` says whether it changed them.

  Attributes:
    data / fsdp / tensor: the mesh sizes (`gmpo_jax.infra.sharding.make_mesh`), -1 resolved.
    sharded: True when `auto_fsdp` moved the data devices to fsdp.
    reason: one line on why, for logs and the planner's report.
  """

  data: int
  fsdp: int
  tensor: int
  sharded: bool
  reason: str


def auto_fsdp(
    *,
    data: int,
    fsdp: int,
    tensor: int,
    num_devices: int,
    state_bytes: int,
    hbm_bytes: float | None,
    fraction: float = STATE_FRACTION,
) -> MeshChoice:
  """The mesh sizes to use: FSDP over the data devices when a replicated state does not fit.

  With the parameters and optimizer state replicated (fsdp = 1), every device holds
  `state_bytes` (divided by `tensor` at most). When that exceeds `fraction` of a device's HBM,
  the data axis is turned into fsdp (ZeRO-3: parameters, moments and gradients sharded, layers
  all-gathered where used). A mesh that already shards (fsdp > 1), a single data device, or an
  unknown capacity are kept as given.

  Args:
    data / fsdp / tensor: the configured mesh (`config.mesh`), one of them possibly -1.
    num_devices: devices of the learner's mesh.
    state_bytes: parameters plus optimizer state, unsharded (`tree_bytes`).
    hbm_bytes: one device's HBM (`device_hbm_bytes`); None: unknown, nothing changes.
    fraction: the share of HBM a replicated state may take (`STATE_FRACTION`).

  Returns:
    The `MeshChoice`.

  Raises:
    ValueError: the sizes do not divide `num_devices` (as `make_mesh`).
  """
  sizes = [data, fsdp, tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or num_devices % known:
    raise ValueError(
        f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide " f"{num_devices} devices"
    )
  if -1 in sizes:
    sizes[sizes.index(-1)] = num_devices // known
  data, fsdp, tensor = sizes
  per_device = state_bytes / tensor
  if hbm_bytes is None:
    return MeshChoice(data, fsdp, tensor, False, "HBM capacity unknown: mesh as configured")
  budget = fraction * hbm_bytes
  summary = (
      f"parameters + optimizer state {per_device / GIB:.2f} GiB per device "
      f"{'>' if per_device > budget else '<='} {fraction:g} x {hbm_bytes / GIB:.2f} GiB HBM"
  )
  if fsdp > 1 or data == 1 or per_device <= budget:
    return MeshChoice(data, fsdp, tensor, False, summary + ": mesh as configured")
  return MeshChoice(1, data, tensor, True, summary + f": FSDP over {data} devices")


def sampler_replicates(
    *,
    copy_bytes: int,
    fsdp: int,
    tensor: int,
    hbm_bytes: float | None,
    fraction: float = SAMPLER_COPY_FRACTION,
) -> bool:
  """Whether the sampler's copy of the parameters is replicated over the fsdp axis.

  Args:
    copy_bytes: the copy's bytes in the compute dtype, unsharded (`tree_bytes`).
    fsdp / tensor: the mesh sizes; the copy stays split over `tensor` either way.
    hbm_bytes: one device's HBM (`device_hbm_bytes`); None: unknown, the copy stays sharded.
    fraction: the share of HBM it may take (`SAMPLER_COPY_FRACTION`).

  Returns:
    True when fsdp > 1 and copy_bytes / tensor fits `fraction` of the HBM.
  """
  return fsdp > 1 and hbm_bytes is not None and copy_bytes / tensor <= fraction * hbm_bytes
