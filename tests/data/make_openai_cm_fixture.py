"""Writes tests/data/consistency/openai_ct.npz: consistency training (CT) and distillation (CD)
losses and gradients on one fixed batch, computed by the consistency models' authors' own JAX
code (openai/consistency_models_cifar10).

How it was made (run from the repository root of score_jax):

  git clone https://github.com/openai/consistency_models_cifar10 /path/to/cm
  #   (commit d086e77dfdc30b51671685f9eec90c90d4f4eaa6)
  python3.11 -m venv /path/to/venv_cm
  /path/to/venv_cm/bin/pip install jax==0.4.13 jaxlib==0.4.13 flax==0.7.0 optax==0.1.5 \
      dm-haiku==0.0.10 ml_collections "numpy<2" "scipy<1.12"
  /path/to/venv_cm/bin/python tests/data/make_openai_cm_fixture.py /path/to/cm

(CPU; the versions installed were jax 0.4.13, jaxlib 0.4.13, flax 0.7.0, optax 0.1.5,
dm-haiku 0.0.10, ml_collections 1.1.0, numpy 1.26.4; the authors pin jax 0.4.10.) The
script imports only the authors' loss, SDE and model modules (jcm/losses.py, jcm/sde_lib.py,
jcm/models/{utils,ncsnpp,layers,layerspp,...}.py) and their configs; their files are not
changed. Two import-time shims, both in this script: `blobfile` (cloud file access, imported
by jcm/utils.py and jcm/checkpoints.py) and `PIL` (image saving, jcm/utils.py) are empty
stand-in modules, since nothing here touches files.

Network: the authors' NCSN++ ('ncsnpp', jcm/models/ncsnpp.py) with the model section of their
configs (configs/cifar10_ve_ct_ema.py for CT, configs/cifar10_ve_cd.py for CD, their teacher
configs/cifar10_k_ve.py), made tiny: nf 8, ch_mult (1, 2), num_res_blocks 1, attention at
resolution 4, 8x8x3 images, dropout 0 (so the losses are deterministic). The student and the
teacher are two such networks, initialized by the authors' `mutils.init_model` with different
keys, then re-randomized where their init leaves a constant (so the output depends on every
layer): every kernel whose init is ~0 (init_scale 0 -> their default_init(1e-10), |w| ~ 1e-6:
the last conv of each residual branch, the attention output NIN and the output conv) gets
N(0, 1 / fan_in), every bias gets N(0, 0.1^2) added, every GroupNorm scale becomes
1 + N(0, 0.1^2). The Fourier
features' W keep their init (N(0, 16^2); a constant: stop_gradient in their code).

Loss: `losses.get_consistency_loss_fn` (jcm/losses.py:242), the function of both their CT
('consistency_ema' / 'consistency_adaptive': dsm_target=True) and CD ('consistency':
dsm_target=False, Heun teacher step) configs, called with target_params = the student's
parameters (mu = 0: no EMA teacher). Their loss draws, through hk.PRNGSequence, in this
order: `jax.random.randint(key, (B,), 0, N - 1)` (the indices n), `jax.random.normal(key,
x.shape)` (z) and a dropout key (unused: dropout 0). This script replaces the first two by
its fixed `indices` and `z` (it patches jax.random.randint and jax.random.normal while the
loss runs, checking the requested shapes and bounds); the key passed is PRNGKey(0).

The npz holds (all float32 unless said):
  x [4, 8, 8, 3], z [4, 8, 8, 3], indices [4] int32, N, sigma_min, sigma_max, rho, sigma_data
    (scalars), sigma_grid [N] (their formula at n = 0..N-1, float32 as their code computes it:
    largest first), t [4] = sigma_grid[indices] (the noisier), t2 [4] = sigma_grid[indices + 1];
  student/<path>, teacher/<path>: the networks' parameters (path: Flax parameter path joined
    by '/');
  net_in [4, 8, 8, 3], net_cond [4], net_out [4, 8, 8, 3]: the student's raw network output
    F(net_in, net_cond) with net_in = x_t / sqrt(t^2 + sigma_data^2), net_cond = 0.25 log t
    (their c_in and c_noise), train=False;
  ct/x_t, ct/x_t2, ct/F_t, ct/F_t2 [4, 8, 8, 3]: the CT pair and the consistency function's
    outputs on it; cd/x_t2, cd/F_t2 the same for CD (x_t is the same);
  ct/<norm>/loss, ct/<norm>/per_example [4] for norm in l2, l1, linf (uniform weighting);
    ct/l2/grad/<path> (gradient of ct/l2/loss in the student's parameters);
  ct/l2_<weighting>/loss for weightings snrp1, truncated_snr, snr;
  ct/l2_N10/loss, ct/l2_N10/indices [4] (0, 3, 5, 8), ct/l2_N10/t, ct/l2_N10/t2: the loss
    with num_scales = 10 passed to the loss (as their adaptive schedule does);
  cd/l2/loss, cd/l2/per_example, cd/l2/grad/<path>.
Per-example terms are their loss called with one-hot batch masks (their reduction is
nansum(losses * mask * weight / sum(mask))).
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np

import jax
import jax.numpy as jnp
from flax import traverse_util

B, SIZE, CH = 4, 8, 3
N_SCALES = 18  # their configs' model.num_scales
INDICES = np.array([0, 5, 11, 16], np.int32)  # 16 = N - 2: t2 = sigma_min (boundary)
INDICES_N10 = np.array([0, 3, 5, 8], np.int32)  # for num_scales = 10 (8 = N - 2)
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "consistency", "openai_ct.npz")


def _import_authors(repo):
  """Imports the authors' modules with stand-ins for their file-access dependencies."""
  for name in ("blobfile", "PIL", "PIL.Image"):
    if name not in sys.modules:
      sys.modules[name] = types.ModuleType(name)
  sys.modules["PIL"].Image = sys.modules["PIL.Image"]
  sys.path.insert(0, repo)
  from jcm import losses, sde_lib  # pylint: disable=import-outside-toplevel
  from jcm.models import utils as mutils, ncsnpp  # noqa: F401  (registers 'ncsnpp')
  import configs.cifar10_ve_ct_ema as ct_cfg  # pylint: disable=import-outside-toplevel
  import configs.cifar10_ve_cd as cd_cfg  # pylint: disable=import-outside-toplevel
  return losses, sde_lib, mutils, ct_cfg, cd_cfg


def _shrink(config):
  for k, v in TINY.items():
    config.model[k] = v
  config.data.image_size = SIZE
  config.data.num_channels = CH
  return config


def _rerandomize(params, seed):
  """Replaces their init's constants (zero-init kernels, zero biases, unit scales)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, v in flat.items():
    v = np.asarray(v, np.float32)
    name = path[-1]
    if path[0].startswith("GaussianFourierProjection"):  # W: their random init, kept
      pass
    elif name in ("bias", "b"):
      v = v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    elif name == "scale":
      v = 1.0 + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    elif name in ("kernel", "weight", "W") and np.abs(v).max() < 1e-4:
      # init_scale 0 -> their default_init(1e-10): |v| ~ 1e-6. HWIO / [in, out] layouts.
      fan_in = int(np.prod(v.shape[:-1]))
      v = rng.standard_normal(v.shape).astype(np.float32) / np.sqrt(fan_in)
    out[path] = v
  return traverse_util.unflatten_dict(out)


def _flat(tree, prefix):
  return {f"{prefix}/" + "/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(tree).items()}


class _FixedDraws:
  """Patches jax.random.randint / normal to return the fixture's indices / z.

  Only calls with the loss's shapes are answered from the fixture (and counted: one of each
  per loss call); others go to JAX (Flax's parameter shape check evaluates the Fourier
  features' initializer under jax.eval_shape while the loss runs).
  """

  def __init__(self, indices, z, num_scales):
    self.indices, self.z, self.num_scales = indices, z, num_scales
    self.calls = {"randint": 0, "normal": 0}

  def __enter__(self):
    self._randint, self._normal = jax.random.randint, jax.random.normal
    real_randint, real_normal = self._randint, self._normal

    def randint(key, shape, minval, maxval, *a, **kw):
      if tuple(shape) != self.indices.shape:
        return real_randint(key, shape, minval, maxval, *a, **kw)
      assert minval == 0 and maxval == self.num_scales - 1, (minval, maxval)
      assert self.indices.max() < maxval
      self.calls["randint"] += 1
      return jnp.asarray(self.indices)

    def normal(key, shape=(), *a, **kw):
      if tuple(shape) != self.z.shape:
        return real_normal(key, shape, *a, **kw)
      self.calls["normal"] += 1
      return jnp.asarray(self.z)

    jax.random.randint, jax.random.normal = randint, normal
    return self

  def __exit__(self, *exc):
    jax.random.randint, jax.random.normal = self._randint, self._normal
    if exc[0] is None:
      assert self.calls == {"randint": 1, "normal": 1}, self.calls


def main(repo):
  losses, sde_lib, mutils, ct_cfg, cd_cfg = _import_authors(repo)
  ct_config, cd_config = _shrink(ct_cfg.get_config()), _shrink(cd_cfg.get_config())
  teacher_config = _shrink(cd_config.training.ref_config)
  for c in (ct_config, cd_config, teacher_config):
    assert c.training.sde == "kvesde" and c.model.num_scales == N_SCALES
  sde = sde_lib.get_sde(ct_config)  # KVESDE(t_min 0.002, t_max 80, N 18, rho 7, data_std 0.5)

  model, states, params = mutils.init_model(jax.random.PRNGKey(1), ct_config)
  t_model, t_states, t_params = mutils.init_model(jax.random.PRNGKey(2), teacher_config)
  assert not states and not t_states
  params, t_params = _rerandomize(params, 11), _rerandomize(t_params, 12)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1.0, 1.0, (B, SIZE, SIZE, CH)).astype(np.float32)
  z = rng.standard_normal((B, SIZE, SIZE, CH)).astype(np.float32)
  batch = {"image": jnp.asarray(x), "mask": jnp.ones((B,), jnp.float32)}
  key = jax.random.PRNGKey(0)

  # Their grid (jcm/losses.py:312-320) at every n, float32 as in the loss.
  n = jnp.arange(N_SCALES)
  grid = (sde.t_max ** (1 / sde.rho) + n / (N_SCALES - 1) *
          (sde.t_min ** (1 / sde.rho) - sde.t_max ** (1 / sde.rho))) ** sde.rho
  grid = np.asarray(grid)
  assert grid.dtype == np.float32

  out = {"x": x, "z": z, "indices": INDICES, "N": np.int32(N_SCALES),
         "sigma_min": np.float32(sde.t_min), "sigma_max": np.float32(sde.t_max),
         "rho": np.float32(sde.rho), "sigma_data": np.float32(sde.data_std),
         "sigma_grid": grid, "t": grid[INDICES], "t2": grid[INDICES + 1]}
  out.update(_flat(params, "student"))
  out.update(_flat(t_params, "teacher"))

  # The raw network output on the CT input (their distiller's c_in and c_noise).
  t = jnp.asarray(grid[INDICES])
  x_t = x + t[:, None, None, None] * z
  net_in = x_t / jnp.sqrt(t**2 + sde.data_std**2)[:, None, None, None]
  net_cond = 0.25 * jnp.log(t)
  net_out = model.apply({"params": params}, net_in, net_cond, train=False)
  out.update(net_in=np.asarray(net_in), net_cond=np.asarray(net_cond), net_out=np.asarray(net_out))

  def make_loss(config, loss_norm, weighting="uniform"):
    tr = config.training
    return losses.get_consistency_loss_fn(
        sde, t_model, t_params, t_states, model, train=True, loss_norm=loss_norm,
        weighting=weighting, stopgrad=tr.stopgrad, dsm_target=tr.dsm_target, solver=tr.solver)

  def record_pair(loss_fn, prefix, num_scales=None, indices=INDICES):
    """Their loss, eagerly, capturing the consistency function's inputs and outputs."""
    seen = []
    real = mutils.get_distiller_fn

    def spy(*a, **kw):
      fn = real(*a, **kw)

      def wrapped(xx, tt, rng=None):
        res = fn(xx, tt, rng=rng)
        seen.append((np.asarray(xx), np.asarray(tt), np.asarray(res[0])))
        return res
      return wrapped
    losses.mutils.get_distiller_fn = spy
    try:
      with _FixedDraws(indices, z, num_scales or N_SCALES):
        loss_fn(key, params, states, batch, params, num_scales)
    finally:
      losses.mutils.get_distiller_fn = real
    (xt, tt, ft), (xt2, tt2, ft2) = seen
    if indices is INDICES:
      np.testing.assert_array_equal(xt, np.asarray(x_t))
    return {f"{prefix}/x_t": xt, f"{prefix}/F_t": ft, f"{prefix}/x_t2": xt2,
            f"{prefix}/F_t2": ft2}, tt, tt2

  def value(loss_fn, mask=None, num_scales=None, indices=INDICES):
    b = batch if mask is None else {"image": batch["image"], "mask": jnp.asarray(mask)}
    with _FixedDraws(indices, z, num_scales or N_SCALES):
      loss, _ = loss_fn(key, params, states, b, params, num_scales)
    return np.float32(loss)

  def per_example(loss_fn):
    return np.array([value(loss_fn, np.eye(B, dtype=np.float32)[i]) for i in range(B)],
                    np.float32)

  def grad(loss_fn):
    with _FixedDraws(INDICES, z, N_SCALES):
      (loss, _), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
          key, params, states, batch, params, None)
    return np.float32(loss), g

  # CT (their CT configs: dsm_target=True, solver 'euler', stopgrad).
  ct_l2 = make_loss(ct_config, "l2")
  pair, tt, tt2 = record_pair(ct_l2, "ct")
  np.testing.assert_array_equal(tt, grid[INDICES])
  np.testing.assert_array_equal(tt2, grid[INDICES + 1])
  out.update(pair)
  for norm in ("l2", "l1", "linf"):
    fn = make_loss(ct_config, norm)
    out[f"ct/{norm}/loss"] = value(fn)
    out[f"ct/{norm}/per_example"] = per_example(fn)
  loss, g = grad(ct_l2)
  assert np.isclose(loss, out["ct/l2/loss"], rtol=1e-6)
  out.update(_flat(g, "ct/l2/grad"))
  for w in ("snrp1", "truncated_snr", "snr"):
    out[f"ct/l2_{w}/loss"] = value(make_loss(ct_config, "l2", w))
  _, tt, tt2 = record_pair(ct_l2, "unused", num_scales=10, indices=INDICES_N10)
  out["ct/l2_N10/indices"] = INDICES_N10
  out["ct/l2_N10/loss"] = value(ct_l2, num_scales=10, indices=INDICES_N10)
  out["ct/l2_N10/t"], out["ct/l2_N10/t2"] = tt, tt2

  # CD (their CD config: dsm_target=False, Heun step of the teacher's EDM denoiser).
  cd_l2 = make_loss(cd_config, "l2")
  assert not cd_config.training.dsm_target and cd_config.training.solver == "heun"
  pair, _, _ = record_pair(cd_l2, "cd")
  out.update({k: v for k, v in pair.items() if k in ("cd/x_t2", "cd/F_t2")})
  out["cd/l2/loss"] = value(cd_l2)
  out["cd/l2/per_example"] = per_example(cd_l2)
  loss, g = grad(cd_l2)
  assert np.isclose(loss, out["cd/l2/loss"], rtol=1e-6)
  out.update(_flat(g, "cd/l2/grad"))

  for k, v in out.items():
    v = np.asarray(v)
    if v.dtype == np.float64:
      raise AssertionError(f"{k} is float64")
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **out)
  n_params = sum(v.size for k, v in out.items() if k.startswith("student/"))
  print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes; student {n_params} parameters")
  for k in sorted(out):
    if "/" not in k.replace("ct/", "").replace("cd/", "") or k.endswith("loss"):
      print(k, np.asarray(out[k]).shape, np.asarray(out[k]).ravel()[:4])


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python tests/data/make_openai_cm_fixture.py "
                     "/path/to/consistency_models_cifar10")
  main(os.path.abspath(sys.argv[1]))
