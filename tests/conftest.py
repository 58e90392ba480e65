"""Test set-up: several simulated CPU devices and strict numerics.

The device count must be set before JAX initializes its backends, so it is
done here, before anything imports jax.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

NUM_DEVICES = 4


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)
