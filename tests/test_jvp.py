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
