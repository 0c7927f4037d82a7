"""Multi-device tests run in their own process with 8 simulated CPU devices.

`make test` sets XLA_FLAGS for this directory; setting it here too (before JAX initialises its
backends) lets `pytest tests/multidevice` work on its own.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  if jax.device_count() != 8:
    pytest.fail(
        f"expected 8 simulated CPU devices, got {jax.device_count()}: "
        "JAX was initialised before XLA_FLAGS could be set"
    )
