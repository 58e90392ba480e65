"""Writes tests/data/meanflow/official.npz: MeanFlow's loss and gradient on one fixed batch,
computed by the paper's own JAX code.

  git clone https://github.com/Gsunshine/meanflow /path/to/meanflow
  python tests/data/make_meanflow_fixture.py /path/to/meanflow

(Made with the commit d70cb55d298ee03c53bf6da67bec281082e4e2d9 of Gsunshine/meanflow, run
from the repository root of score_jax.) The official `MeanFlow` module (meanflow.py) builds
its network as `getattr(models_dit, model_str)(name="net", class_dropout_prob=0.0)` and calls
it as net(z, t, h = t - r, y, train, key). This script registers a tiny score_jax SongUNet
with a second time input (labels t and t - r, score_jax.meanflow's convention) under a
model_str there, so the two loss implementations run the same network with the same weights.
`MeanFlow.forward` then draws (t, r) and the noise e from its 'gen' stream; the script
records them (wrapping `sample_tr` and `jax.random.normal`) with the loss and the gradient
of the loss in the network's parameters. One shim: the official module's
jnp.clip(a, a_min=, a_max=) gets the keywords of the JAX installed here (min=, max=).

Settings: no guidance (guidance_eq ''), no class dropout, the default time distribution
(logit-normal -0.4, 1.0; data_proportion 0.75: r = t on the first 6 of 8 examples),
norm_eps = 0.01, and two adaptive weightings: norm_p = 1.0 (the default) and 0.0 (the plain
squared error, whose loss value is not ~1). The same 'gen' key draws the same (t, r, e) for
both.

official.npz holds x [8, 8, 8, 1], t [8], r [8], e [8, 8, 8, 1], per parameter of the network
'param/<path>' (path: the Flax parameter path joined by '/'), and per weighting (p1, p0)
'<p>/loss' [] and '<p>/grad/<path>'.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from score_jax import models  # pylint: disable=wrong-import-position

# The network of the fixture (tests/test_meanflow.py builds the same).
NETWORK = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
               augment_dim=0, second_time=True)
SHAPE = (8, 8, 8, 1)


class _Net(nn.Module):
  """The official code's network interface around the score_jax network."""

  @nn.compact
  def __call__(self, x, t, h, y, train=False, key=None):
    del y, train, key
    return models.SongUNet(**NETWORK, name="unet")(x, t, labels2=h)


class _JnpWithOldClip:
  """jax.numpy for the official module, whose jnp.clip(a, a_min=, a_max=) predates the JAX
  here (clip's keywords are now min and max)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(a, a_min=None, a_max=None):
    return jnp.clip(a, min=a_min, max=a_max)


def main(official: str) -> None:
  sys.path.insert(0, official)
  import meanflow as official_meanflow  # pylint: disable=g-import-not-at-top
  from models import models_dit  # pylint: disable=g-import-not-at-top

  models_dit.score_jax_song_unet = lambda name, class_dropout_prob: _Net(name=name)
  official_meanflow.jnp = _JnpWithOldClip()
  recorded = {}
  sample_tr = official_meanflow.MeanFlow.sample_tr

  def recording_sample_tr(self, bz):
    t, r = sample_tr(self, bz)
    recorded["t"], recorded["r"] = t, r
    return t, r

  official_meanflow.MeanFlow.sample_tr = recording_sample_tr
  normal = jax.random.normal

  def recording_normal(key, shape=(), dtype=jnp.float32):
    out = normal(key, shape, dtype)
    if tuple(shape) == SHAPE:
      recorded["e"] = out
    return out

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  labels = jnp.zeros((SHAPE[0],), jnp.int32)
  # Weights at random (N(0, 1 / fan_in), vectors 1 + N(0, 0.1^2)): every path matters.
  shapes = jax.eval_shape(lambda k: models.SongUNet(**NETWORK).init(
      k, x, jnp.ones(SHAPE[0]), labels2=jnp.ones(SHAPE[0])), jax.random.PRNGKey(0))["params"]

  def draw(s):
    if len(s.shape) >= 2:
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return (1.0 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

  params = jax.tree_util.tree_map(draw, shapes)

  def loss(p, norm_p):
    mf = official_meanflow.MeanFlow(model_str="score_jax_song_unet", model_config={},
                                    num_classes=10, guidance_eq="", class_dropout_prob=0.0,
                                    norm_p=norm_p, norm_eps=0.01)
    out, _ = mf.apply({"params": {"net": {"unet": p}}}, x, labels, train=True,
                      method=official_meanflow.MeanFlow.forward,
                      rngs={"gen": jax.random.PRNGKey(1)})
    return out

  out = {"x": x}
  flat = lambda tree: [("/".join(k.key for k in path), leaf)
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  out.update({"param/" + k: v for k, v in flat(params)})
  jax.random.normal = recording_normal
  try:
    for norm_p in (1.0, 0.0):
      value, grads = jax.value_and_grad(loss)(params, norm_p)
      tag = f"p{norm_p:g}"
      out[tag + "/loss"] = value
      out.update({f"{tag}/grad/{k}": v for k, v in flat(grads)})
  finally:
    jax.random.normal = normal
  out.update(t=recorded["t"].reshape(-1), r=recorded["r"].reshape(-1), e=recorded["e"])
  dst = os.path.join(ROOT, "tests", "data", "meanflow", "official.npz")
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  np.savez(dst, **{k: np.asarray(v) for k, v in out.items()})
  print(f"wrote {dst}: losses {float(out['p1/loss']):.6f} (norm_p 1), "
        f"{float(out['p0/loss']):.3f} (norm_p 0); r != t on {int(np.sum(out['r'] != out['t']))}")


if __name__ == "__main__":
  main(sys.argv[1])
