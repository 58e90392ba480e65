"""Forward-mode derivatives through every network family.

Continuous-time consistency models and MeanFlow differentiate the network along the
trajectory: the JVP of F(x, t) with tangent (v, 1). Here `jax.jvp` in float32 is compared
with the central difference (F(x + h v, t + h) - F(x - h v, t - h)) / 2h computed with
64-bit parameters and inputs (jax.enable_x64), on tiny members of each family
with attention and GroupNorm on.

Tolerance: the relative error (in norm, per network) is at most 2e-3. The float32 JVP
carries ~1e-6 relative round-off per layer; the difference quotient has truncation error
O(h^2 F''') ~ 1e-6 at h = 1e-3, and round-off eps / h where a network keeps a float32
cast (noise embeddings, attention logits and the output are float32 by design): 6e-8 / 1e-3
~ 1e-4. A wrong derivative (a dropped term, a stop-gradient, a non-differentiable
normalization) is off by O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from score_jax import models

import helpers

_ATTN = dict(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))

# name -> (module, input shape, noise labels): tiny members with attention at 4x4.
NETWORKS = {
    "ncsnpp": (models.NCSNpp(nf=16, **_ATTN), (2, 8, 8, 3), (0.5, 3.0)),
    "ddpmpp": (models.NCSNpp(nf=16, **_ATTN, fir=False, progressive_input="none",
                             embedding_type="positional", scale_by_sigma=False, centered=True,
                             second_time=True),
               (2, 8, 8, 3), (0.5, 3.0)),
    # MeanFlow's second time input on (also DDPM++ and the MLP): the derivative runs through
    # both time embeddings.
    "song_unet": (models.SongUNet(nf=8, **_ATTN, dropout=0.0, second_time=True), (2, 8, 8, 3),
                  (0.5, 3.0)),
    "ddpm": (models.DDPM(nf=32, **_ATTN), (2, 8, 8, 3), (0.5, 3.0)),
    "ncsnv2": (models.NCSNv2(nf=8), (2, 8, 8, 3), (0.5, 3.0)),
    "mlp": (models.MLPScore(hidden_sizes=(32, 32), nf=16, second_time=True), (2, 2), (0.5, 3.0)),
    "dit": (models.DiT(hidden_size=32, depth=1, num_heads=2, patch_size=2, learn_sigma=False,
                       second_time=True), (2, 8, 8, 3), (0.5, 3.0)),
}

H = 1e-3
RTOL = 2e-3


def _to64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_jvp_equals_central_difference(name, fast_compile):
  model, shape, labels = NETWORKS[name]
  variables = helpers.random_variables(model, shape, seed=1)
  rng = np.random.default_rng(2)
  x = rng.normal(size=shape)
  v = rng.normal(size=shape)
  t = np.asarray(labels)

  second_time = getattr(model, "second_time", False)

  def apply(model, variables, x, t):
    # A second time input gets labels2 = t / 2 (MeanFlow's t - r at r = t / 2).
    extra = {"labels2": t / 2} if second_time else {}
    return model.apply(variables, x, t, train=False, **extra)

  f = lambda x, t: apply(model, variables, x, t)
  jvp_fn = jax.jit(lambda x, t, v, dt: jax.jvp(f, (x, t), (v, dt))[1])
  x32, t32, v32 = (jnp.asarray(a, jnp.float32) for a in (x, t, v))
  jvp = np.asarray(jvp_fn(x32, t32, v32, jnp.ones_like(t32)), np.float64)

  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64)
    f64 = jax.jit(lambda vs, x, t: apply(model64, vs, x, t).astype(jnp.float64))
    vs64, x64, v64, t64 = _to64(variables), _to64(x), _to64(v), _to64(t)
    fd = (f64(vs64, x64 + H * v64, t64 + H) - f64(vs64, x64 - H * v64, t64 - H)) / (2 * H)
    fd = np.asarray(fd)

  assert np.linalg.norm(fd) > 1e-2  # the derivative is not trivially zero
  err = np.linalg.norm(jvp - fd) / np.linalg.norm(fd)
  assert err < RTOL, f"{name}: relative error {err:.2e}"
  if name == "ncsnv2":
    return  # its output does not depend on the noise label (the score divides by sigma)
  # The time tangent matters: with the x tangent alone the answer is far off.
  jvp_x = np.asarray(jvp_fn(x32, t32, v32, jnp.zeros_like(t32)))
  assert np.linalg.norm(jvp_x - fd) / np.linalg.norm(fd) > 10 * RTOL


# bfloat16 compute (model.dtype) through MeanFlow's JVP: configs/toy_meanflow.py with a tiny
# MLP, its training loss (score_jax.run.plan: the loss main.py trains with) and gradient, and
# the tangent d/dt u, against float32 with the same parameters and batch.
#
# Tolerance: bfloat16 keeps 8 significant bits, so each rounding is off by at most
# 2^-9 ~ 0.002 (relative). A dense layer rounds its input, its weights and its output:
# 3 roundings; the longest chain of dense layers from the noise labels to the output of
# this MLP has L = 7 (two embedding layers, two per residual block, the output layer). The
# errors add along the chain, so u is within BF16_RTOL = L * 3 * 2^-9 = 0.041 of float32's.
# The tangent runs through the same layers (rounded weights, rounded tangent activations,
# activation slopes at rounded points): the same bound. The loss is quadratic in the
# residual u - u_tgt (2x its relative error) and the gradient runs back through the chain
# again (2L roundings): 2 * BF16_RTOL. Measured: u 0.0066, tangent 0.011, loss 0.0063,
# gradient 0.0065. A float32 computation differs by ~1e-6 (BF16_MIN: bfloat16 is in use),
# and a wrong tangent dtype or a dropped term is off by O(1).
BF16_RTOL = 7 * 3 * 2.0**-9
BF16_MIN = 1e-4


def _rel(a, b):
  a, b = (np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in
                          jax.tree_util.tree_leaves(t)]) for t in (a, b))
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _dot_dtypes(jaxpr, found=None):
  """Operand dtypes of every dot_general in jaxpr, nested jaxprs included."""
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _dot_dtypes(sub.jaxpr, found)
        elif isinstance(sub, jex_core.Jaxpr):
          _dot_dtypes(sub, found)
  return found


def test_meanflow_bfloat16_loss_gradient_and_tangent_match_float32(fast_compile):
  from score_jax import meanflow  # pylint: disable=g-import-not-at-top
  from score_jax.run import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings  # pylint: disable=g-import-not-at-top

  batch = 32
  setups = {dtype: plan_lib.make_plan(settings.from_config(helpers.config(
      "toy_meanflow", **{"model.hidden_sizes": (32, 32), "model.nf": 16, "model.dtype": dtype,
                         "training.batch_size": batch})), need_data=False)
            for dtype in ("float32", "bfloat16")}
  assert jnp.dtype(setups["bfloat16"].model.dtype) == jnp.bfloat16
  # Random parameters with O(1) activations (init's zero output layer would make u = 0).
  params = helpers.random_variables(setups["float32"].model, (batch, 2), seed=3)["params"]
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)
  key = jax.random.PRNGKey(5)
  z = jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)
  r, t = meanflow.sample_times(jax.random.PRNGKey(6), batch, ratio=1.0)  # r < t everywhere

  def tangent_fn(setup):
    u_fn = meanflow.network_u_fn(setup.model, {"params": params})
    return u_fn, lambda z, v: jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))

  @jax.jit
  def both(params, x, z, v):  # one program for both precisions: one compilation
    out = {}
    for dtype, setup in setups.items():
      loss, grad = jax.value_and_grad(lambda p: setup.train_loss(p, key, x, None)[0])(params)
      u, du_dt = jax.jvp(meanflow.network_u_fn(setup.model, {"params": params}), (z, r, t),
                         (v, jnp.zeros_like(r), jnp.ones_like(t)))
      out[dtype] = {"loss": loss, "grad": grad, "u": u, "du_dt": du_dt}
    return out

  out = jax.device_get(both(params, x, z, v))
  for dtype, setup in setups.items():
    assert out[dtype]["u"].dtype == out[dtype]["du_dt"].dtype == np.float32  # float32 outputs
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(out[dtype]))
    u_fn, tangent = tangent_fn(setup)
    dots = _dot_dtypes(jax.make_jaxpr(tangent)(z, v).jaxpr)
    forward = _dot_dtypes(jax.make_jaxpr(u_fn)(z, r, t).jaxpr)
    # Forward mode adds one product per dense layer (the tangent's); in bfloat16 both the
    # primal's and the tangent's run in bfloat16.
    assert len(dots) == 2 * len(forward) > 0
    assert all(d == (jnp.dtype(dtype).name,) * 2 for d in dots), dots

  for name, tol in (("u", BF16_RTOL), ("du_dt", BF16_RTOL), ("loss", 2 * BF16_RTOL),
                    ("grad", 2 * BF16_RTOL)):
    err = _rel(out["bfloat16"][name], out["float32"][name])
    assert BF16_MIN < err < tol, f"{name}: relative difference {err:.2e}"
  # The tangent is the time derivative, not u again: it differs from u by O(1).
  assert _rel(out["float32"]["du_dt"], out["float32"]["u"]) > 0.3


# The convolutional networks with a second time input (the tiny members above: GroupNorm,
# attention with float32 logits, skip connections) in bfloat16 through MeanFlow's loss.
# Their longest chain of rounding layers is L <= 64 (counted for DDPM++: 10 residual blocks
# x 4 (two GroupNorms, two convolutions), 3 attentions x 6 (GroupNorm, q/k/v, logits,
# softmax, weights x v, output), input and output 3: 61), where the MLP's worst case
# L * 3 * 2^-9 = 0.37 says nothing. The roundings are independent (uniform, standard
# deviation 2^-9 / sqrt(3) relative) and add in quadrature: the relative error's expected
# size is sqrt(3 L) * 2^-9 / sqrt(3) = 8 * 2^-9 = 0.016, and CONV_BF16_RTOL is 4 times that,
# 2^-4, for u and its tangent; twice that for the loss and the gradient (as for the MLP).
# Measured (2 CPU cores): u 0.0059 / 0.0079, tangent 0.0088 / 0.0073, loss 0.0007 / 0.0007,
# gradient 0.0035 / 0.0056 (SongUNet / DDPM++). A dropped term in the tangent or a wrong
# dtype is off by O(1), or fails to trace.
CONV_BF16_RTOL = 4 * 8 * 2.0**-9


@pytest.mark.slow  # compiles the gradient of each network's JVP twice: ~25 CPU-s each
@pytest.mark.parametrize("name", ["song_unet", "ddpmpp"])
def test_meanflow_bfloat16_conv_networks_match_float32(name, fast_compile):
  from score_jax import meanflow  # pylint: disable=g-import-not-at-top

  model, (_, *dims), _ = NETWORKS[name]
  shape = (8, *dims)
  variables = helpers.random_variables(model, shape, seed=1)
  rng = np.random.default_rng(2)
  x, e = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
  r, t = meanflow.sample_times(jax.random.PRNGKey(3), shape[0], ratio=0.5)

  @jax.jit
  def both(params):
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
      net = model.clone(dtype=dtype)
      u_fn = lambda p: meanflow.network_u_fn(net, {"params": p})
      loss = lambda p: jnp.mean(meanflow.loss(u_fn(p), x, e, r, t, power=0.0).loss)
      value, grad = jax.value_and_grad(loss)(params)
      u, du_dt = jax.jvp(u_fn(params), (x, r, t), (e - x, jnp.zeros_like(r), jnp.ones_like(t)))
      out[jnp.dtype(dtype).name] = {"loss": value, "grad": grad, "u": u, "du_dt": du_dt}
    return out

  out = jax.device_get(both(variables["params"]))
  for dtype in out:
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(out[dtype]))
  for part, tol in (("u", CONV_BF16_RTOL), ("du_dt", CONV_BF16_RTOL),
                    ("loss", 2 * CONV_BF16_RTOL), ("grad", 2 * CONV_BF16_RTOL)):
    err = _rel(out["bfloat16"][part], out["float32"][part])
    assert BF16_MIN < err < tol, f"{name} {part}: relative difference {err:.2e}"
