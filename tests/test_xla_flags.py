"""score_jax's XLA:CPU default (score_jax/_xla_flags.py): when it is set, and what it changes."""

import json
import os
import subprocess
import sys

import pytest

from score_jax import _xla_flags

FLAG = _xla_flags.FLAG
KNOWN = _xla_flags._jaxlib_knows(FLAG)  # pylint: disable=protected-access


@pytest.mark.skipif(not KNOWN, reason="this jaxlib has no " + FLAG)
def test_apply_adds_the_flag_and_keeps_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert _xla_flags.apply(env)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 --{FLAG}={_xla_flags.VALUE}"
  empty = {}
  assert _xla_flags.apply(empty) and empty["XLA_FLAGS"] == f"--{FLAG}={_xla_flags.VALUE}"


def test_apply_leaves_a_users_own_setting_and_the_opt_out_alone():
  mine = {"XLA_FLAGS": f"--{FLAG}="}
  assert not _xla_flags.apply(mine) and mine == {"XLA_FLAGS": f"--{FLAG}="}
  opted_out = {_xla_flags.OPT_OUT: "0", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  assert not _xla_flags.apply(opted_out)
  assert opted_out["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_an_unknown_flag_is_never_added():
  assert not _xla_flags._jaxlib_knows("xla_cpu_no_such_flag_anywhere_0123")  # pylint: disable=protected-access


_PROBE = r"""
import json, os, re, sys
if sys.argv[1] == "jax_first":
  import jax.numpy as jnp
  jnp.ones(1).block_until_ready()  # the backend starts before score_jax is imported
import score_jax
import jax, jax.numpy as jnp

def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

step = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
text = step.lower(jnp.ones((8, 32, 32, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
# Computations that hold a convolution, and whether any YNNPACK fusion calls one.
blocks = re.split(r"\n(?=%?[\w.\-]+ \()", text)
with_conv = {re.match(r"%?([\w.\-]+)", b).group(1) for b in blocks if " convolution(" in b}
ynn_conv = any("__ynn_fusion" in line and any("calls=%" + n + "," in line or
                                              "calls=%" + n + " " in line for n in with_conv)
               for line in text.splitlines())
print(json.dumps({"applied": score_jax._xla_flags.applied(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn_conv": ynn_conv,
                  "n_conv": text.count(" convolution(")}))
"""


def _probe(order, **env):
  full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_flags.OPT_OUT)}
  full.update(env)
  out = subprocess.run([sys.executable, "-c", _PROBE, order], capture_output=True, text=True,
                       env=full, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not KNOWN, reason="this jaxlib has no " + FLAG)
def test_import_keeps_convolutions_out_of_ynnpack():
  """The point of the default: XLA's own convolutions, not YNNPACK's (see _xla_flags)."""
  ours = _probe("score_jax_first")
  assert ours["applied"] and f"--{FLAG}={_xla_flags.VALUE}" in ours["xla_flags"]
  assert ours["n_conv"] >= 3  # forward, input gradient, weight gradient
  assert not ours["ynn_conv"]
  plain = _probe("score_jax_first", **{_xla_flags.OPT_OUT: "0"})
  assert not plain["applied"] and FLAG not in plain["xla_flags"]
  if not plain["ynn_conv"]:
    pytest.skip("this jaxlib no longer hands convolutions to YNNPACK by default")


@pytest.mark.skipif(not KNOWN, reason="this jaxlib has no " + FLAG)
def test_import_after_jax_started_changes_nothing():
  late = _probe("jax_first")
  assert not late["applied"] and FLAG not in late["xla_flags"]
