"""Test set-up: several simulated CPU devices and strict numerics.

The device count must be set before JAX initializes its backends, so it is
done here, before anything imports jax.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

from score_jax.run import xla_flags  # noqa: E402  # the CPU compiler settings main.py uses

xla_flags.apply_defaults()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# main.py runs in subprocesses keep compiled programs ('auto' compilation cache); give
# them a folder of this session's own, not the user's cache. Set after `import jax`, so
# this process itself caches nothing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="score_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

NUM_DEVICES = 4


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
  """(workdir, final state) of helpers.TINY_TOY trained by the real training loop, once per
  session (per worker under pytest-xdist): 20 steps, checkpoints at 10 and 20. Read-only:
  a test that writes into a workdir works on a copy (helpers.copy_run)."""
  import helpers  # pylint: disable=g-import-not-at-top
  from score_jax.run import train  # pylint: disable=g-import-not-at-top
  from score_jax.run.settings import from_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("toy") / "run")
  state = train.train_and_evaluate(from_config(helpers.config("toy", helpers.TINY_TOY)), workdir)
  return workdir, state


@pytest.fixture
def fast_compile():
  """Compiles with most XLA optimizations off (jax_disable_most_optimizations) for the test:
  for tests whose programs are large and run briefly, where neither precision beyond
  float32 round-off nor bitwise agreement with optimized programs matters. JAX's compiled
  programs are dropped after the test, so later tests compile their own optimized ones."""
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)
