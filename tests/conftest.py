"""Test-wide settings: a persistent XLA compilation cache.

Compiles dominate this suite's time on a 2-core machine; the runner tests compile the same
programs in several runs and workers, so they share compiled executables through the cache.
"""

import os
import tempfile

import jax
import pytest
from jax import monitoring

from gmpo_jax.infra import compilation

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "GMPO_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "gmpo_jax_xla_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def backend_compiles():
  """The names of the programs XLA compiles (or reads from the cache) during the test."""
  names = []

  def record(event, duration, **kwargs):
    del duration
    if event == compilation.BACKEND_COMPILE_EVENT:
      names.append(kwargs.get("fun_name"))

  monitoring.register_event_duration_secs_listener(record)
  yield names
  monitoring.unregister_event_duration_listener(record)


@pytest.fixture(scope="module")
def no_persistent_cache():
  """Keeps a module's executables out of the persistent cache: TPU programs compiled without a
  TPU client serialize but cannot be read back (a warning and a recompile every run)."""
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
