"""score_jax's XLA:CPU defaults (score_jax/run/xla_flags.py): when they are set, and what they change."""

import json
import os
import subprocess
import sys

import pytest

from score_jax.run import xla_flags as _xla_flags

(FLAG, VALUE), (SCHEDULER, _) = _xla_flags.DEFAULTS
KNOWN = _xla_flags._jaxlib_knows(FLAG)  # pylint: disable=protected-access
KNOWN_SCHEDULER = _xla_flags._jaxlib_knows(SCHEDULER)  # pylint: disable=protected-access
ALL = tuple(f"--{name}={value}" for name, value in _xla_flags.DEFAULTS)


@pytest.mark.skipif(not (KNOWN and KNOWN_SCHEDULER), reason="this jaxlib lacks a default's flag")
def test_apply_adds_the_flags_and_keeps_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert _xla_flags.apply(env) == ALL
  assert env["XLA_FLAGS"] == " ".join(("--xla_force_host_platform_device_count=4",) + ALL)
  empty = {}
  assert _xla_flags.apply(empty) == ALL and empty["XLA_FLAGS"] == " ".join(ALL)


@pytest.mark.skipif(not KNOWN_SCHEDULER, reason="this jaxlib has no " + SCHEDULER)
def test_apply_leaves_a_users_own_setting_and_the_opt_out_alone():
  mine = {"XLA_FLAGS": f"--{FLAG}="}
  assert _xla_flags.apply(mine) == (f"--{SCHEDULER}=false",)  # only the flag the user left
  assert mine == {"XLA_FLAGS": f"--{FLAG}= --{SCHEDULER}=false"}
  both = {"XLA_FLAGS": f"--{FLAG}= --{SCHEDULER}=true"}
  assert _xla_flags.apply(both) == () and both == {"XLA_FLAGS": f"--{FLAG}= --{SCHEDULER}=true"}
  opted_out = {_xla_flags.OPT_OUT: "0", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  assert _xla_flags.apply(opted_out) == ()
  assert opted_out["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_an_unknown_flag_is_never_added():
  assert not _xla_flags._jaxlib_knows("xla_cpu_no_such_flag_anywhere_0123")  # pylint: disable=protected-access


_PROBE = r"""
import json, os, re, sys
if sys.argv[1] == "jax_first":
  import jax.numpy as jnp
  jnp.ones(1).block_until_ready()  # the backend starts before score_jax is imported
from score_jax.run import xla_flags
xla_flags.apply_defaults()
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

def chains(x, ws):
  # 8 independent chains, each with a 1 MiB intermediate (sort keeps them out of one fusion):
  # breadth-first order keeps all 8 alive at once, depth-first finishes a chain first.
  return sum(jnp.max(jnp.sort(jnp.sort(x @ w, axis=0) @ w, axis=0)) for w in ws)

mat = jax.ShapeDtypeStruct((512, 512), jnp.float32)
temp = jax.jit(chains).lower(mat, [mat] * 8).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"applied": list(xla_flags.applied()),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn_conv": ynn_conv,
                  "n_conv": text.count(" convolution("), "chains_temp_mib": temp / 2**20}))
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
  assert f"--{FLAG}={VALUE}" in ours["applied"]
  assert f"--{FLAG}={VALUE}" in ours["xla_flags"]
  assert ours["n_conv"] >= 3  # forward, input gradient, weight gradient
  assert not ours["ynn_conv"]
  plain = _probe("score_jax_first", **{_xla_flags.OPT_OUT: "0"})
  assert not plain["applied"] and FLAG not in plain["xla_flags"]
  if not plain["ynn_conv"]:
    pytest.skip("this jaxlib no longer hands convolutions to YNNPACK by default")


@pytest.mark.skipif(not KNOWN_SCHEDULER, reason="this jaxlib has no " + SCHEDULER)
def test_import_plans_memory_depth_first():
  """The scheduler default: independent branches run one after another, not all at once."""
  ours = _probe("score_jax_first")
  assert f"--{SCHEDULER}=false" in ours["applied"]
  assert ours["chains_temp_mib"] <= 3  # one chain's two 1 MiB intermediates (+ scalars)
  plain = _probe("score_jax_first", **{_xla_flags.OPT_OUT: "0"})
  if plain["chains_temp_mib"] < 8:
    pytest.skip("this jaxlib's default scheduler no longer keeps independent branches alive")
  assert ours["chains_temp_mib"] < plain["chains_temp_mib"] / 2


@pytest.mark.skipif(not KNOWN, reason="this jaxlib has no " + FLAG)
def test_import_after_jax_started_changes_nothing():
  late = _probe("jax_first")
  assert not late["applied"] and FLAG not in late["xla_flags"]


def test_importing_the_library_leaves_xla_flags_alone():
  """Only the entry points apply the defaults: `import score_jax` (and its subpackages) does not."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_flags.OPT_OUT)}
  code = ("import os, score_jax, score_jax.run.plan, score_jax.convert.cli; "
          "print(repr(os.environ.get('XLA_FLAGS')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
  assert out.stdout.strip().splitlines()[-1] == "None"
