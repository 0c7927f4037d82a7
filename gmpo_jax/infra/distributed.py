"""Multi-process runs on JAX's own distributed runtime (`jax.distributed.initialize`).

One Python process runs per host (a TPU VM worker, a GPU node), all with the same command.
`initialize` connects them through a coordinator (process 0); afterwards `jax.devices()` lists
the devices of every process, `gmpo_jax.infra.sharding.make_mesh` spans all of them, every jitted
step is one SPMD program over the global mesh, and Orbax checkpoints are written
collectively. Cross-process collectives on CPU go through Gloo (the default of
`jax_cpu_collectives_implementation` in jax 0.10), over TCP.

Settings come from the `distributed` section of the experiment config and, for every field
left unset there, from the environment:

    JAX_COORDINATOR_ADDRESS   host:port of process 0 (JAX itself reads this one too)
    JAX_NUM_PROCESSES         how many processes take part
    JAX_PROCESS_ID            this process, in [0, JAX_NUM_PROCESSES)

With none of the three given, the run is single-process unless `auto_detect` is set; then
JAX finds them itself on a Cloud TPU pod slice, under Slurm, Open MPI or a Kubernetes JobSet.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process run; validated on construction.

  Attributes:
    coordinator_address: 'host:port' of process 0, reachable from every process; process 0
      listens on that port.
    num_processes: the number of processes (>= 1).
    process_id: this process's index in [0, num_processes).
    auto_detect: with none of the three above, let JAX detect them from the cluster
      environment (TPU pod slice, Slurm, Open MPI, Kubernetes).
    initialization_timeout: seconds to wait for every process to join.
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto_detect: bool = False
  initialization_timeout: int = 300

  def __post_init__(self):
    given = {
        "coordinator_address": self.coordinator_address,
        "num_processes": self.num_processes,
        "process_id": self.process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if 0 < len(missing) < len(given):
      raise ValueError(
          f"distributed: {sorted(set(given) - set(missing))} given but {missing} "
          f"missing; set all three (config or {ENV_COORDINATOR_ADDRESS}, "
          f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) or none"
      )
    if not missing:
      host, _, port = self.coordinator_address.rpartition(":")
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"distributed.coordinator_address={self.coordinator_address!r}: " "expected 'host:port'"
        )
      if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
        raise ValueError(
            f"distributed: process_id={self.process_id} must lie in "
            f"[0, num_processes={self.num_processes})"
        )
    if self.initialization_timeout <= 0:
      raise ValueError(
          f"distributed.initialization_timeout={self.initialization_timeout} " "must be > 0 seconds"
      )

  @property
  def explicit(self) -> bool:
    """Coordinator, process count and process id are all given."""
    return self.coordinator_address is not None

  @property
  def enabled(self) -> bool:
    return self.explicit or self.auto_detect

  @classmethod
  def from_config(
      cls, section: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
  ) -> DistributedConfig:
    """Reads the config's `distributed` section; unset ('' or None) fields fall back to the
    `JAX_*` environment variables of the module docstring.

    Raises:
      ValueError: an unknown option, a non-integer environment value, or an invalid
        combination (see the class).
    """
    section = dict(section or {})
    environ = os.environ if environ is None else environ
    unknown = set(section) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown distributed options {sorted(unknown)}")

    def pick(name, variable, convert):
      value = section.get(name)
      if value is not None and value != "":
        return value
      text = environ.get(variable, "")
      if not text:
        return None
      try:
        return convert(text)
      except ValueError as error:
        raise ValueError(f"{variable}={text!r} is not a valid {name}") from error

    return cls(
        coordinator_address=pick("coordinator_address", ENV_COORDINATOR_ADDRESS, str),
        num_processes=pick("num_processes", ENV_NUM_PROCESSES, int),
        process_id=pick("process_id", ENV_PROCESS_ID, int),
        auto_detect=bool(section.get("auto_detect", False)),
        initialization_timeout=int(section.get("initialization_timeout", 300)),
    )


def initialize(config: DistributedConfig) -> bool:
  """Joins the multi-process run that `config` describes; a no-op when it describes none.

  Must run before anything touches a JAX backend (`jax.devices()`, the first array): JAX
  fixes the device list when the backend starts.

  Args:
    config: the settings (`DistributedConfig.from_config`).

  Returns:
    True when the distributed runtime is up (possibly with a single process), False for a
    plain single-process run.

  Raises:
    RuntimeError: JAX's backend already started, or `jax.distributed` was initialized
      elsewhere (JAX's own errors).
  """
  if not config.enabled:
    return False
  if config.explicit:
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=config.initialization_timeout,
        # Everything is given: skip cluster detection, which could misread a CI or
        # Kubernetes environment.
        cluster_detection_method="deactivate",
    )
  else:
    jax.distributed.initialize(initialization_timeout=config.initialization_timeout)
  logger.info(
      "process %d of %d: %d local of %d devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True


def primary_first(fn: Callable[[], T], *, name: str) -> T:
  """Runs `fn()` on process 0, then, after a barrier, on every other process.

  For work that writes files the other processes then read: a TFDS dataset build in a
  shared `data_dir` would otherwise race (every process building into the same directory).
  On hosts without a shared file system each process still builds its own copy. Collective:
  every process must call it, with the same `name`, in the same order.

  Args:
    fn: the work; its result is returned on every process.
    name: a barrier name unique to this call site.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    result = fn()
  multihost_utils.sync_global_devices(f"gmpo_jax_primary_first_{name}")
  if jax.process_index() != 0:
    result = fn()
  return result
