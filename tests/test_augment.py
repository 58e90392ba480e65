"""EDM's non-leaky augmentation (score_jax.data.augment) and its wiring into training.

References are independent: numpy index maps and np.rot90 / np.pad for the
pixel transforms, the analytic value of a smooth test image at the mapped
points for the geometric ones, scipy.stats for the draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_jax.data import augment as A
from score_jax import models
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.errors import ConfigError
from score_jax.run.settings import from_config as S

from configs import default, edm_cifar_ve, edm_cifar_vp

PIXEL = A.Augment(p=0.7, xflip=1.0, yflip=1.0, rotate_int=1.0, translate_int=1.0)
# Jitted (one compilation each instead of many op-by-op ones); the settings are static.
augment = jax.jit(A.augment, static_argnums=2)
blit = jax.jit(A.blit, static_argnums=2)
warp = jax.jit(A.warp)


def _transforms(batch, **kw):
  """Transforms with the given draws and zeros elsewhere."""
  zeros = dict(xflip=np.zeros(batch, np.int32), yflip=np.zeros(batch, np.int32),
               quarter_turns=np.zeros(batch, np.int32), shift=np.zeros((batch, 2), np.int32),
               scale=np.zeros(batch, np.float32), angle=np.zeros(batch, np.float32),
               aniso=np.zeros(batch, np.float32), aniso_angle=np.zeros(batch, np.float32),
               offset=np.zeros((batch, 2), np.float32))
  zeros.update(kw)
  return A.Transforms(**{k: jnp.asarray(v) for k, v in zeros.items()})


def _reflect_shift(img, tx, ty):
  """out[y, x] = img[y + ty, x - tx] on the image reflected at its borders (np.pad 'reflect')."""
  h, w = img.shape[:2]
  padded = np.pad(img, ((h - 1, h - 1), (w - 1, w - 1)) + ((0, 0),) * (img.ndim - 2),
                  mode="reflect")
  return padded[h - 1 + ty:2 * h - 1 + ty, w - 1 - tx:2 * w - 1 - tx]


# ---------------------------------------------------------------------------
# Off, settings and configs


def test_off_returns_the_images_and_zero_labels():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 3))
  for aug in (A.Augment(p=0.0, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                        translate_frac=1), A.Augment(p=0.5)):
    out, labels = augment(jax.random.PRNGKey(1), x, aug)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert labels.shape == (5, aug.label_dim) and not np.any(np.asarray(labels))
  assert A.EDM_CIFAR10.label_dim == 9 and PIXEL.label_dim == 6


def test_edm_configs_augment_as_edm_and_settings_refuse_what_cannot_work():
  for config in (edm_cifar_vp, edm_cifar_ve):
    s = S(config.get_config())
    assert builders.get_augment(s) == A.EDM_CIFAR10
    assert s.optim.nonfinite_grads == "zero" and not s.data.random_flip
  s = S(default.get_config())
  assert builders.get_augment(s) is None and s.optim.nonfinite_grads == "skip"
  config = edm_cifar_vp.get_config()
  config.data.augment_p = 0.0
  assert S(config).model.get("augment_dim") == 9  # labels stay zero: fine
  cases = [({"model.augment_dim": 0}, "set model.augment_dim = 9"),
           ({"data.augment_rotate_int": 1.0}, "makes 11 labels"),
           ({"data.augment_p": 1.5}, "data.augment_p must lie in"),
           ({"data.augment_aniso": -1.0}, "data.augment_aniso must be"),
           ({"model.name": "ncsnv2"}, "'ncsnv2' does not take"),
           ({"model.name": "ddpmpp", "model.augment_dim": 0}, "set model.augment_dim = 9"),
           ({"optim.nonfinite_grads": "clip"}, "optim.nonfinite_grads")]
  for changes, match in cases:
    config = edm_cifar_vp.get_config()
    for key, value in changes.items():
      section, name = key.split(".")
      setattr(getattr(config, section), name, value)
    with pytest.raises(ConfigError, match=match):
      S(config)


# ---------------------------------------------------------------------------
# Pixel blitting: exact


def test_flips_quarter_turns_and_integer_shifts_are_exact_and_invertible():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(6, 6, 2)).astype(np.float32)
  x = jnp.asarray(np.stack([img] * 4))
  aug = A.Augment(p=1.0, xflip=1.0, yflip=1.0, rotate_int=1.0, translate_int=1.0)
  flips = np.array([0, 1, 0, 1], np.int32)
  out = np.asarray(blit(x, _transforms(4, xflip=flips), aug))
  for b in range(4):
    np.testing.assert_array_equal(out[b], img[:, ::-1] if flips[b] else img)
  back = blit(jnp.asarray(out), _transforms(4, xflip=flips), aug)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
  out = np.asarray(blit(x, _transforms(4, yflip=flips), aug))
  for b in range(4):
    np.testing.assert_array_equal(out[b], img[::-1] if flips[b] else img)
  turns = np.arange(4, dtype=np.int32)
  out = blit(x, _transforms(4, quarter_turns=turns), aug)
  for b in range(4):
    np.testing.assert_array_equal(np.asarray(out[b]), np.rot90(img, b))
  back = blit(out, _transforms(4, quarter_turns=(4 - turns) % 4), aug)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
  # Integer shifts, reflected without repeating the edge; undone where no pixel left the grid.
  img = rng.normal(size=(5, 7, 1)).astype(np.float32)
  shifts = np.array([[0, 0], [2, -1], [-3, 4], [6, -4]], np.int32)  # up to size - 1
  x = jnp.asarray(np.stack([img] * 4))
  aug = A.Augment(p=1.0, translate_int=1.0)
  out = blit(x, _transforms(4, shift=shifts), aug)
  back = np.asarray(blit(out, _transforms(4, shift=-shifts), aug))
  for b, (tx, ty) in enumerate(shifts):
    np.testing.assert_array_equal(np.asarray(out[b]), _reflect_shift(img, tx, ty))
    cols = (np.arange(7) + tx >= 0) & (np.arange(7) + tx <= 6)
    rows = (np.arange(5) - ty >= 0) & (np.arange(5) - ty <= 4)
    np.testing.assert_array_equal(back[b][rows][:, cols], img[rows][:, cols])
  assert np.any(back[1] != img)  # the reflected border is not undone


def test_pixel_labels_say_what_was_applied():
  """The labels decoded independently (flip bits, quarter turn, shift) and applied with numpy."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
  out, labels = augment(jax.random.PRNGKey(3), jnp.asarray(x), PIXEL)
  out, labels = np.asarray(out), np.asarray(labels)
  turn_of = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
  for b in range(64):
    xf, yf, r1, r2, lx, ly = labels[b]
    img = x[b]
    img = img[:, ::-1] if xf else img
    img = img[::-1] if yf else img
    img = np.rot90(img, turn_of[(int(r1), int(r2))])
    tx, ty = int(round(lx * 8 * 0.125)), int(round(ly * 8 * 0.125))
    np.testing.assert_array_equal(out[b], _reflect_shift(img, tx, ty))
  assert set(np.unique(labels[:, :4])) == {0.0, 1.0}
  assert set(np.unique(labels[:, 4:] * 8 * 0.125)) <= set(range(-1, 2))  # |t| <= round(8 / 8)


# ---------------------------------------------------------------------------
# Geometric transforms: within interpolation error of the exact map

SIZE = 32
C = (SIZE - 1) / 2
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) - C  # centered pixel coordinates


def _smooth(x, y, period=32.0):
  """A smooth test image in centered coordinates: |grad| <= 0.31, |second derivatives| <= 0.06."""
  w = 2 * np.pi / period
  return (np.sin(w * x + 0.3) * np.cos(w * y / 1.25 + 1.0)
          + 0.5 * np.cos(w * (x - 0.7 * y) / 1.5))


def _rot(a):
  return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _affine(linear, t=(0.0, 0.0)):
  """[2, 3]: p -> linear (p - t)."""
  linear = np.asarray(linear, np.float64)
  return np.concatenate([linear, -(linear @ np.asarray(t))[:, None]], axis=1)


def _apply(m, x, y):
  return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _inside(qx, qy, margin=3.0):
  """Output pixels whose source lies at least `margin` pixels inside the image (away from the
  reflected border, whose kink the filters smear over ~3 pixels)."""
  return (np.abs(qx) <= C - margin) & (np.abs(qy) <= C - margin)


# Worst error against the exact map f(G^-1 p): bilinear interpolation on the 2x grid (spacing
# h = 1/2 px: h^2 / 8 |f''| < 2e-3 per axis for _smooth) plus EDM's centering of the sym6
# filter, which takes its delay as 5 samples where its centroid is 5.10: transforms act about
# a point ~0.05 px (0.1 subpixel, in x and y) off the center, an error |grad f| |(A - I) d|
# <= 0.31 * 2 * 0.07 = 0.044 at a half turn. Measured: 0.021 at a quarter turn, <= 0.011
# for the other maps below.
GEOMETRIC_TOL = 0.05
# Warping forth and back cancels the off-center point exactly, leaving two interpolations.
INVERSE_TOL = 0.01

MAPS = {
    "quarter turn": _affine(_rot(np.pi / 2)),
    "rotation 0.7": _affine(_rot(0.7)),
    "zoom in 1.3": _affine(np.eye(2) / 1.3),
    "zoom out 1.3": _affine(np.eye(2) * 1.3),
    "anisotropic": _affine(_rot(-0.4) @ np.diag([1 / 1.25, 1.25]) @ _rot(0.4)),
    "subpixel shift": _affine(np.eye(2), (0.5, -1.25)),
    "composite": _affine(np.diag([1 / 1.15] * 2) @ _rot(-1.1) @ _rot(-0.4)
                         @ np.diag([1 / 1.2, 1.2]) @ _rot(0.4), (1.7, -2.2)),
}


# EDM's execution of the geometric map, step by step as its AugmentPipe runs it (NCHW there,
# one [H, W] plane here, float64): the reflect margins computed from the mapped corners (not
# the fixed size - 1 of score_jax), the normalized coordinates of affine_grid / grid_sample
# (align_corners=False, zero outside), the filters as zero-stuffing and correlations.
def _translate(tx, ty):
  return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _scale(sx, sy):
  return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], np.float64)


def _edm_warp(img, g_inv, h):
  """EDM's execution steps for one image [H, W] (numpy, float64)."""
  H, W = img.shape
  g = np.vstack([g_inv, [0, 0, 1]])
  cx, cy = (W - 1) / 2, (H - 1) / 2
  taps, hz_pad = len(h), len(h) // 4
  corners = g @ np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]]).T
  x0, y0 = np.max(-corners[0]), np.max(-corners[1])
  x1, y1 = np.max(corners[0]), np.max(corners[1])
  margin = np.array([x0, y0, x1, y1]) + np.array([2 * hz_pad - cx, 2 * hz_pad - cy] * 2)
  margin = np.minimum(np.maximum(margin, 0), [W - 1, H - 1, W - 1, H - 1])
  mx0, my0, mx1, my1 = np.ceil(margin).astype(int)
  img = np.pad(img, ((my0, my1), (mx0, mx1)), mode="reflect")
  g = _translate((mx0 - mx1) / 2, (my0 - my1) / 2) @ g
  def up(a):  # along the last axis: zeros between samples, correlate with the reversed filter
    z = np.stack([a, np.zeros_like(a)], -1).reshape(a.shape[0], -1)[:, :-1]
    z = np.pad(z, ((0, 0), ((taps + 1) // 2,) * 2))
    return np.stack([np.correlate(r, h[::-1], "valid") for r in z])
  img = up(up(img).T).T
  g = _scale(2, 2) @ g @ _scale(0.5, 0.5)
  g = _translate(-0.5, -0.5) @ g @ _translate(0.5, 0.5)
  ho, wo = (H + 2 * hz_pad) * 2, (W + 2 * hz_pad) * 2
  hi, wi = img.shape
  g = _scale(2 / wi, 2 / hi) @ g @ _scale(wo / 2, ho / 2)
  gy, gx = np.meshgrid((2 * np.arange(ho) + 1) / ho - 1, (2 * np.arange(wo) + 1) / wo - 1,
                       indexing="ij")
  sx = g[0, 0] * gx + g[0, 1] * gy + g[0, 2]
  sy = g[1, 0] * gx + g[1, 1] * gy + g[1, 2]
  ix, iy = ((sx + 1) * wi - 1) / 2, ((sy + 1) * hi - 1) / 2
  x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
  out = np.zeros((ho, wo))
  for dy in (0, 1):
    for dx in (0, 1):
      xx, yy = x0 + dx, y0 + dy
      wgt = (1 - np.abs(ix - xx)) * (1 - np.abs(iy - yy))
      ok = (xx >= 0) & (xx < wi) & (yy >= 0) & (yy < hi)
      out += np.where(ok, wgt * img[np.clip(yy, 0, hi - 1), np.clip(xx, 0, wi - 1)], 0.0)
  def down(a):  # along the last axis: correlate with the filter at stride 2, crop
    z = np.pad(a, ((0, 0), ((taps - 1) // 2,) * 2))
    return np.stack([np.correlate(r, h, "valid")[::2] for r in z])[:, hz_pad:-hz_pad]
  return down(down(out).T).T


def test_warp_follows_edm_execution_steps():
  """Random (non-smooth) images, square and not, maps from mild to ones that clamp EDM's
  margins: float32 against float64, sums of a few hundred O(1) terms (measured 2.7e-6)."""
  rng = np.random.default_rng(2)
  for h, w in ((8, 8), (6, 10)):
    img = rng.normal(size=(h, w))
    for linear, t in [(np.eye(2), (0, 0)), (_rot(0.6), (0.3, -0.7)),
                      (np.diag([1 / 1.4, 1.2]) @ _rot(2.0), (1.5, 0.2)),
                      (np.eye(2) * 2.2, (0, 0)), (np.eye(2) * 0.5, (3.0, 0.0))]:
      m = _affine(linear, t)
      got = warp(jnp.asarray(img[None, :, :, None], jnp.float32), jnp.asarray(m[None], jnp.float32))
      np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], _edm_warp(img, m, A.SYM6), atol=1e-5)


def test_warp_samples_the_image_at_the_mapped_points():
  x = jnp.asarray(np.stack([_smooth(XX, YY)] * len(MAPS))[..., None], jnp.float32)
  g = jnp.asarray(np.stack(list(MAPS.values())), jnp.float32)
  out = np.asarray(warp(x, g))[..., 0]
  for b, (name, m) in enumerate(MAPS.items()):
    qx, qy = _apply(m, XX, YY)
    inside = _inside(qx, qy)
    assert inside.sum() > 300, name
    err = np.abs(out[b] - _smooth(qx, qy))[inside].max()
    assert err < GEOMETRIC_TOL, (name, err)
  np.testing.assert_allclose(np.asarray(warp(x[:1], jnp.asarray(_affine(np.eye(2))[None],
                                                                    jnp.float32))),
                             np.asarray(x[:1]), atol=2e-6)  # perfect reconstruction of sym6


def test_warps_are_undone_by_their_inverse():
  names = [n for n in MAPS if n != "quarter turn"]
  x = jnp.asarray(np.stack([_smooth(XX, YY)] * len(names))[..., None], jnp.float32)
  fwd = np.stack([MAPS[n] for n in names])
  inv = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2] for m in fwd])
  back = np.asarray(warp(warp(x, jnp.asarray(fwd, jnp.float32)), jnp.asarray(inv, jnp.float32)))
  for b, name in enumerate(names):
    qx, qy = _apply(inv[b], XX, YY)  # where the second warp reads the first's output
    keep = _inside(qx, qy) & _inside(XX, YY)
    err = np.abs(back[b, ..., 0] - _smooth(XX, YY))[keep].max()
    assert err < INVERSE_TOL, (name, err)


def test_geometric_labels_say_what_was_applied():
  """EDM's CIFAR-10 setting at p = 0.5: each image's labels decoded into flips and G^-1 =
  S(1/s) R(a) R(-r) S(1/s', s') R(r) T(-t) (written here from the labels alone), and the output
  compared with the exact map of the smooth image.

  EDM's anisotropy labels (w cos r, w sin r) are those of (-w, r + pi) too, which is the
  inverse stretch: when r != 0 (half the anisotropic images) they leave its direction of
  stretching open, and either reading is accepted (the other fails unless |w| is small)."""
  aug = A.Augment(**{**A.EDM_CIFAR10.__dict__, "p": 0.5})
  batch = 24
  x = jnp.asarray(np.stack([_smooth(XX, YY)] * batch)[..., None], jnp.float32)
  out, labels = augment(jax.random.PRNGKey(7), x, aug)
  out, labels = np.asarray(out)[..., 0], np.asarray(labels, np.float64)
  moved = ambiguous = 0
  for b in range(batch):
    xf, yf, w_s, rc, rs, ac, as_, tx, ty = labels[b]
    s, a = 2 ** (0.2 * w_s), np.arctan2(rs, rc + 1)
    if as_ == 0:  # r = 0
      readings = [(ac, 0.0)]
    else:
      rho, r = np.hypot(ac, as_), np.arctan2(as_, ac)
      readings = [(rho, r), (-rho, r)]  # (-rho, r + pi) is (-rho, r)
      ambiguous += 1
    errors = []
    for w_a, r in readings:
      sa = 2 ** (0.2 * w_a)
      m = _affine(np.eye(2) / s @ _rot(a) @ _rot(-r) @ np.diag([1 / sa, sa]) @ _rot(r),
                  (tx * SIZE * 0.125, ty * SIZE * 0.125))
      qx, qy = _apply(m, XX, YY)
      # The flips act before the warp: the flipped image is f(-x, y) / f(x, -y).
      want = _smooth(-qx if xf else qx, -qy if yf else qy)
      errors.append(np.abs(out[b] - want)[_inside(qx, qy)].max())
    if np.any(labels[b, 2:]):
      moved += 1
      assert min(errors) < GEOMETRIC_TOL, (b, errors)
      if len(errors) == 2 and np.hypot(ac, as_) > 0.5:
        assert max(errors) > 2 * GEOMETRIC_TOL, (b, errors)  # the other reading is wrong
    else:  # flips only: exact
      img = np.asarray(x[b, ..., 0])
      img = img[:, ::-1] if xf else img
      np.testing.assert_array_equal(out[b], img[::-1] if yf else img)
  assert 0 < moved < batch and ambiguous > 0


# ---------------------------------------------------------------------------
# The draws


def test_label_frequencies_and_distributions_match_edm():
  """Each label is non-zero at its transform's probability min(multiplier p, 1) (times 1/2 for
  the flips' and anisotropy's coin), within 5 binomial standard deviations of 2^16 draws; the
  non-zero draws follow their distributions (Kolmogorov-Smirnov, p > 1e-3)."""
  n, p = 1 << 16, 0.12
  aug = A.Augment(p=p, xflip=1e8, yflip=1.0, rotate_int=2.0, translate_int=1.0, scale=1.0,
                  rotate_frac=1.0, aniso=1.0, translate_frac=1.0)
  draw = jax.jit(lambda key: (lambda tr: (tr, A.augment_labels(aug, tr, 32, 32)))(
      A.sample_transforms(key, aug, n, 32, 32)))
  tr, labels = draw(jax.random.PRNGKey(11))
  labels = np.asarray(labels)
  assert labels.shape == (n, 13)
  # Columns: xflip, yflip, rot_int (2), translate_int (2), scale, rot (2), aniso (2), trans (2).
  turns = np.asarray(tr.quarter_turns)
  shift = np.asarray(tr.shift)
  rate = {0: 0.5, 1: p / 2, 2: 2 * p * 0.5, 3: 2 * p * 0.5, 6: p, 7: p, 8: p, 9: p,
          10: p * 0.5, 11: p, 12: p}  # rot_int: k in (1, 2) and k in (2, 3) each 1/2 of 2p
  for col, q in rate.items():
    freq = np.mean(labels[:, col] != 0)
    assert abs(freq - q) < 5 * np.sqrt(q * (1 - q) / n), (col, freq, q)
  # Integer shifts: selected at p, tx = round(u * 4) for u ~ U(-1, 1): 0 with prob 1/8.
  sel = np.any(shift != 0, axis=1)
  q = p * (1 - (1 / 8) ** 2)
  assert abs(sel.mean() - q) < 5 * np.sqrt(q * (1 - q) / n)
  assert np.abs(shift).max() == 4
  np.testing.assert_array_equal(labels[:, 4:6], shift / 4.0)
  assert set(np.unique(turns)) == {0, 1, 2, 3}
  w = labels[:, 6][labels[:, 6] != 0]
  assert stats.kstest(w, "norm").pvalue > 1e-3
  angle = np.arctan2(labels[:, 8], labels[:, 7] + 1)[labels[:, 8] != 0]
  assert stats.kstest(angle, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3
  wa = np.asarray(tr.aniso)[np.asarray(tr.aniso) != 0]
  assert stats.kstest(wa, "norm").pvalue > 1e-3
  # The fractional translation's two draws are selected together.
  np.testing.assert_array_equal(labels[:, 11] != 0, labels[:, 12] != 0)


# ---------------------------------------------------------------------------
# Wiring: the loss passes the labels to the network, sampling passes none


def test_loss_passes_the_augmentation_labels_to_the_network():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  seen = []

  class Probe(nn.Module):
    augment_dim: int = 9

    @nn.compact
    def __call__(self, x, labels, y=None, train=False, augment_labels=None):
      seen.append(augment_labels)
      return jnp.zeros_like(x)

  s = S(edm_cifar_vp.get_config())
  loss_fn = builders.get_loss_fn(s, builders.get_sde(s), Probe(), train=True)
  x = jnp.zeros((4, 8, 8, 3))
  labels = jnp.arange(36.0).reshape(4, 9)
  loss_fn({}, jax.random.PRNGKey(0), x, None, labels)
  loss_fn({}, jax.random.PRNGKey(0), x, None)
  assert seen[0] is labels and seen[1] is None
  score = models.get_score_fn(builders.get_sde(s), Probe(), {"params": {}}, continuous=True,
                              **builders.parameterization_kwargs(s))
  score(x, jnp.ones(4))
  assert seen[2] is None  # sampling: zero labels


_NCSNPP = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               init_scale=1.0)  # init_scale 0 would scale the output to ~1e-10


def test_ncsnpp_takes_augmentation_labels_as_an_option():
  """NCSN++ / DDPM++ with augment_dim: one bias-free dense layer more, 9 x the noise
  embedding's width (2 nf Fourier features); augment_dim = 0 is the 2021 network (shapes)."""
  shape = (2, 8, 8, 3)
  with_aug = models.build_model("ncsnpp", augment_dim=9, **_NCSNPP)
  plain = models.build_model("ncsnpp", **_NCSNPP)
  shapes = jax.eval_shape(lambda k: models.init_model(k, with_aug, shape), jax.random.PRNGKey(0))
  assert shapes["params"]["map_augment"]["kernel"].shape == (9, 16)
  assert models.count_params(with_aug, shape) - models.count_params(plain, shape) == 9 * 16


@pytest.mark.slow
def test_ncsnpp_augmentation_labels_condition_the_output():
  """Zero labels and None give the same output, other labels another; a network without
  augmentation labels refuses them. ~35 s on 2 CPU cores (compiling the U-Net)."""
  with_aug = models.build_model("ncsnpp", augment_dim=9, **_NCSNPP)
  plain = models.build_model("ncsnpp", **_NCSNPP)
  x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([0.5, 2.0])

  @jax.jit  # one compiled program: op by op the U-Net's init and applies take far longer
  def outputs(key):
    p = models.init_model(key, with_aug, x.shape)
    return (with_aug.apply(p, x, t), with_aug.apply(p, x, t, augment_labels=jnp.zeros((2, 9))),
            with_aug.apply(p, x, t, augment_labels=jnp.ones((2, 9))))

  none, zero, ones = (np.asarray(a) for a in outputs(jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(zero, none)
  assert np.abs(ones - none).max() > 1e-3 * np.abs(none).max()
  with pytest.raises(ValueError, match="augment_dim = 0"):
    jax.eval_shape(lambda k: plain.apply(models.init_model(k, plain, x.shape), x, t,
                                         augment_labels=jnp.zeros((2, 9))),
                   jax.random.PRNGKey(0))


def test_augmented_train_step_traces_with_microbatches():
  """The step with EDM's augmentation and 2 micro-batches has the state's shapes (traced only)."""
  config = edm_cifar_vp.get_config()
  config.data.image_size, config.training.batch_size, config.training.microbatches = 8, 8, 2
  config.model.nf, config.model.ch_mult, config.model.num_res_blocks = 8, (1, 2), 1
  config.model.attn_resolutions = ()
  setup = plan_lib.make_plan(S(config), need_data=False)
  state = jax.eval_shape(lambda r: run_state.init_state(setup, r), jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((8,), jnp.int32)
  new, metrics = jax.eval_shape(train.make_train_step(setup), state, x, y, jax.random.PRNGKey(0))
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert metrics["loss"].shape == ()
