"""The CPU peak on 8 simulated devices: measured inside the runner's mesh, counted per host."""

import math

import jax
import numpy as np

from gmpo_jax.runner import perf


def test_the_probe_runs_under_a_context_mesh_of_other_devices_and_counts_once_per_host():
  devices = jax.devices()
  assert len(devices) == 8
  perf.cpu_matmul_tflops.cache_clear()  # measured here, not reused from an earlier test
  with jax.set_mesh(jax.sharding.Mesh(np.array(devices), ("data",))):
    peak = perf.mesh_peak(devices)
  assert math.isfinite(peak.per_device) and peak.per_device > 0
  # The 8 devices share one process's cores: one probe, not 8.
  assert peak == perf.Peak(peak.per_device, peak.per_device, perf.SOURCE_CPU_PROBE)
  assert perf.mesh_peak(devices, override=2.0).tflops == 16.0
