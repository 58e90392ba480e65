"""EDM2's magnitude-preserving U-Net, forced weight normalization, loss, schedule and configs,
against EDM2's own code.

Fixtures: tests/data/edm2/ (tests/data/make_edm2_fixtures.py, EDM2's classes and training
loop on a tiny network; commit and versions in manifest.json): EDM2's parameter counts of
every ImageNet preset (counts.json), and a tiny network's weights, outputs on fixed inputs
and two training steps (tiny.npz). Full-size networks are only shape-evaluated.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from score_jax import losses, models
from score_jax.models import edm2
from score_jax.run import builders
from score_jax.run.settings import from_config

from configs import _families as families
from configs import default, digits_edm2

HERE = os.path.dirname(os.path.abspath(__file__))
EDM2 = os.path.join(HERE, "data", "edm2")
PRESET_CONFIGS = ("img512_xs", "img512_s", "img512_m", "img512_l", "img512_xl", "img512_xxl",
                  "img64_s", "img64_m", "img64_l", "img64_xl")


# ---------------------------------------------------------------------------
# EDM2 names and layouts -> score_jax's (the mapping of models/edm2.py's docstring)


def _path(name: str):
  parts = name.split(".")
  if len(parts) > 2 and parts[1] in ("enc", "dec"):
    parts = [parts[0], f"{parts[1]}_{parts[2]}"] + parts[3:]
  return parts


def _layout(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  return a.T if a.ndim == 2 else a  # [out, in] -> [in, out]


def _tree(arrays, prefix: str):
  tree = {}
  for key in arrays.files:
    if not key.startswith(prefix + "/"):
      continue
    *parents, leaf = _path(key[len(prefix) + 1:])
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(_layout(arrays[key]))
  return tree


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _close(actual, expected, rel):
  """|actual - expected| <= rel * max|expected| (a tolerance on the tensor's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


@functools.lru_cache(maxsize=None)
def _fixture():
  with open(os.path.join(EDM2, "manifest.json")) as f:
    manifest = json.load(f)
  return np.load(os.path.join(EDM2, "tiny.npz")), manifest


def _tiny_config() -> ml_collections.ConfigDict:
  """The fixture's network and EDM2's optimizer and loss as a config: 8x8x3, 4 classes, the
  fixture's schedule (ref_lr 0.01, ref_batches 2, ramp-up over 20 images, batch 4)."""
  _, man = _fixture()
  tiny = man["tiny"]
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = tiny["img_resolution"]
  config.data.num_channels = tiny["img_channels"]
  config = families.edm2_network(
      config, model_channels=tiny["model_channels"], channel_mult=tuple(tiny["channel_mult"]),
      num_blocks=tiny["num_blocks"], attn_resolutions=tuple(tiny["attn_resolutions"]),
      channels_per_head=tiny["channels_per_head"], logvar_channels=tiny["logvar_channels"])
  config = families.edm2(config, sigma_data=0.5, p_mean=man["loss"]["P_mean"],
                         p_std=man["loss"]["P_std"])
  config.model.num_classes = tiny["label_dim"]
  config.model.dropout = 0.0
  config.training.batch_size = man["batch"]
  config.optim.lr = man["lr"]["ref_lr"]
  config.optim.ref_batches = man["lr"]["ref_batches"]
  config.optim.lr_rampup_kimg = man["lr"]["rampup_Mimg"] * 1e3
  return config


@functools.lru_cache(maxsize=None)
def _tiny():
  s = from_config(_tiny_config())
  return s, builders.get_model(s), builders.get_optimizer(s)


def _with_schedule_count(opt_state, count: int):
  """The optimizer state with the learning-rate schedule's step set to `count` (Adam's own
  step count, its bias correction, stays at 0, as a fresh torch Adam's)."""
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda x: x._replace(count=jnp.asarray(count, jnp.int32))
                      if is_sched(x) else x, opt_state, is_leaf=is_sched)


def _lookup(tree, path):
  for key in path:
    tree = tree[getattr(key, "key", key)]
  return tree


@functools.lru_cache(maxsize=None)
def _run():
  """Everything the fixture tests compare, from one jitted program (compiled once, with most
  XLA optimizations off: float32 round-off is all that changes): our network's F, D and u on
  the fixture's eval inputs and weights, then steps of EDM2's loss at fixed draws and the
  optimizer's update (builders.get_optimizer, forced weight normalization included): the
  fixture's two, then four at random draws for the sphere test, and the same four without
  the projection (plain Adam at 0.05)."""
  data, man = _fixture()
  s, model, tx = _tiny()
  plain = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-8)

  def loss(params, x, y, sigma, z):
    variables = {"params": params}
    denoise = models.get_edm_denoiser_fn(model, variables, sigma_data=0.5, train=True)
    logvar = lambda sg: model.apply(variables, 0.25 * jnp.log(sg),
                                    method=edm2.EDM2UNet.log_variance)
    return losses.edm2_loss(lambda xx, ss: denoise(xx, ss, y), logvar, x, sigma, z,
                            sigma_data=0.5)[0]

  def step(params, opt_state, x, y, sigma, z):
    value, grads = jax.value_and_grad(loss)(params, x, y, sigma, z)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, grads, optax.apply_updates(params, updates), opt_state

  def evaluate(params, x, y, sigma):
    variables = {"params": params}
    c_in = 1.0 / jnp.sqrt(0.25 + sigma**2)
    f = model.apply(variables, x * c_in[:, None, None, None], 0.25 * jnp.log(sigma), y)
    d = models.get_edm_denoiser_fn(model, variables, sigma_data=0.5)(x, sigma, y)
    u = model.apply(variables, 0.25 * jnp.log(sigma), method=edm2.EDM2UNet.log_variance)
    return f, d, u

  start = man["start_nimg"] // man["batch"]
  p_mean, p_std = man["loss"]["P_mean"], man["loss"]["P_std"]

  @jax.jit
  def run(w0, x, y, sigma_eval, sigmas, noise):
    """sigmas [6, B], noise [6, B, ...]: the draws of the 6 steps, in one scanned body."""
    params = edm2.project_weights(w0)  # EDM2's first training forward projects them

    def body(carry, inputs):
      params, opt_state, raw, raw_state, k = carry
      sigma, z = inputs
      value, grads, params, opt_state = step(params, opt_state, x, y, sigma, z)
      # From step 2 on, also plain Adam on the same gradients, without the projection.
      updates, raw_state2 = plain.update(grads, raw_state, raw)
      raw2 = optax.apply_updates(raw, updates)
      keep = k >= 2
      raw = jax.tree.map(lambda a, b, p: jnp.where(keep, a, p), raw2, raw, params)
      raw_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), raw_state2, raw_state)
      return (params, opt_state, raw, raw_state, k + 1), (value, grads, params)

    carry = (params, _with_schedule_count(tx.init(params), start), params, plain.init(params),
             jnp.zeros((), jnp.int32))
    carry, (values, grads, history) = jax.lax.scan(body, carry, (sigmas, noise))
    first = lambda t: jax.tree.map(lambda a: a[0], t)
    second = lambda t: jax.tree.map(lambda a: a[1], t)
    return {"eval": evaluate(w0, x, y, sigma_eval), "loss": values[:2], "grads0": first(grads),
            "params2": second(history), "params6": carry[0], "raw6": carry[2]}

  jax.config.update("jax_disable_most_optimizations", True)
  try:
    rng = np.random.default_rng(0)
    b = data["images"].shape[0]
    normals = np.concatenate([data["rnd_normal"], rng.standard_normal((4, b))]).astype(np.float32)
    noise = np.concatenate([data["noise"], rng.standard_normal((4,) + data["noise"].shape[1:])])
    out = run(_tree(data, "w0"), _nhwc(data["images"]), jnp.asarray(data["labels"]),
              jnp.asarray(data["sigma"]), jnp.asarray(np.exp(normals * p_std + p_mean)),
              jnp.asarray(noise.transpose(0, 1, 3, 4, 2).astype(np.float32)))
    return jax.device_get(out)
  finally:
    jax.config.update("jax_disable_most_optimizations", False)


# ---------------------------------------------------------------------------
# Parameter counts and configs


def _preset_module(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"configs.edm2_{name}")


@pytest.mark.parametrize("name", ["img512_xs", "img64_xl"])
def test_parameter_counts_equal_edm2(name):
  """The network of each config has EDM2's parameter count (counts.json, EDM2's own
  `Precond` of the preset); ours also holds the Fourier buffers, 2 (noise channels +
  logvar_channels), which EDM2 does not count. Shapes only (jax.eval_shape)."""
  with open(os.path.join(EDM2, "counts.json")) as f:
    expected = json.load(f)[name.replace("_", "-")]
  s = from_config(_preset_module(name).get_config())
  assert dict(s.model.arch)["model_channels"] == expected["model_channels"]
  assert s.data.num_channels == expected["img_channels"]
  total = models.count_params(builders.get_model(s), s.data.shape(1))
  buffers = 2 * (expected["model_channels"] + 128)
  assert buffers == expected["buffers"]
  assert total - buffers == expected["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESET_CONFIGS if n not in ("img512_xs", "img64_xl")])
def test_parameter_counts_equal_edm2_all_presets(name):
  test_parameter_counts_equal_edm2(name)


def test_preset_configs_follow_train_edm2():
  """Each config's recipe is its train_edm2.py preset (models.edm2.PRESETS): rate, decay in
  steps, dropout, P_mean / P_std, batch and duration; data and optimizer as EDM2."""
  for name in PRESET_CONFIGS:
    s = from_config(_preset_module(name).get_config())
    p = edm2.preset(name.replace("_", "-"))
    assert (s.optim.lr, s.optim.ref_batches, s.model.dropout) == (p.lr, p.decay, p.dropout)
    assert (s.training.p_mean, s.training.p_std) == (p.p_mean, p.p_std)
    assert s.training.batch_size * s.training.n_iters == p.duration
    assert (s.optim.beta1, s.optim.beta2, s.optim.eps, s.optim.grad_clip) == (0.9, 0.99, 1e-8, 0)
    assert s.optim.lr_rampup_kimg == 10_000 and s.optim.lr_decay == "inverse_sqrt"
    assert s.training.objective == "edm2" and s.model.parameterization == "edm"
    assert s.model.num_classes == 1000 and s.data.image_size == 64
    assert s.data.is_latents == name.startswith("img512")


def test_inverse_sqrt_schedule_is_edm2s():
  """optim.lr_decay = 'inverse_sqrt' is EDM2's learning_rate_schedule (written out here from
  training_loop.py) at cur_nimg = step * batch, over the ramp-up and the decay."""
  config = digits_edm2.get_config()
  config.optim.lr, config.optim.ref_batches, config.optim.lr_rampup_kimg = 0.01, 70, 3.2
  s = from_config(config)
  schedule = builders.get_lr_schedule(s)
  batch = s.training.batch_size
  for step in (0, 1, 10, 24, 25, 70, 71, 500, 10_000):
    nimg = step * batch
    lr = 0.01 / math.sqrt(max(nimg / (70 * batch), 1)) * min(nimg / 3200, 1)
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------
# Against EDM2's own code (tiny.npz)


def test_network_equals_edm2():
  """EDM2's weights through our network (eval mode): F of the U-Net, the denoiser D of EDM2's
  Precond (our 'edm' preconditioning) and logvar u(sigma), at sigma 0.02..30, with class
  labels and EDM2's zero label. Float32 on both sides over ~40 layers; observed differences
  are ~1e-6 of the output's scale, the tolerance 2e-5."""
  data, _ = _fixture()
  f, d, u = _run()["eval"]
  _close(_nchw(f), data["F"], 2e-5)
  _close(_nchw(d), data["D"], 2e-5)
  _close(u, data["logvar"], 2e-5)


def test_training_steps_equal_edm2():
  """Two of EDM2's training steps (training_loop.py: EDM2Loss at fixed draws, sum / batch,
  Adam (0.9, 0.99, 1e-8) at learning_rate_schedule's rate, forced weight normalization)
  against ours (losses.edm2_loss, builders.get_optimizer's chain): the rates, the losses,
  the first step's gradients and the weights after the second step.

  EDM2 projects the MP weights at the start of each training forward, we right after each
  update: the fixture's step-2 weights are therefore compared after EDM2's own normalize()
  (w2n, what its next forward would use); the gains as they are, the Fourier buffers
  unchanged. The first Adam step is lr g / (|g| + eps), the second depends on the ratio of
  two gradients, so the weights check the gradients' magnitudes as well as their signs.
  Tolerances: losses 1e-5 relative and gradients 1e-4 of each tensor's largest entry
  (float32 through ~40 layers and their transposes); weights 1e-4 absolute, 2% of a step
  (~5e-3; entries ~1): Adam's g / (sqrt(v) + eps) amplifies round-off where a gradient is
  near zero (observed: 1.4e-5 at one entry of 11,687, the rest < 1e-6), while a wrong sign
  or ratio of gradients changes an update by the step itself."""
  data, man = _fixture()
  s, _, _ = _tiny()
  schedule = builders.get_lr_schedule(s)
  start = man["start_nimg"] // man["batch"]
  for k in range(2):
    assert float(schedule(start + k)) == pytest.approx(float(data["lr"][k]), rel=1e-6)
  out = _run()
  np.testing.assert_allclose(out["loss"], data["loss"], rtol=1e-5)
  for path, e in jax.tree_util.tree_leaves_with_path(_tree(data, "g0")):
    _close(_lookup(out["grads0"], path), e, 1e-4)
  expected = {**_tree(data, "w0")}
  for prefix in ("w2", "w2n"):
    for path, e in jax.tree_util.tree_leaves_with_path(_tree(data, prefix)):
      *parents, leaf = path
      _lookup(expected, parents)[leaf.key] = e
  for path, e in jax.tree_util.tree_leaves_with_path(expected):
    np.testing.assert_allclose(_lookup(out["params2"], path), e, rtol=0, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def _rms_error(params) -> float:
  """max over MP weights and output channels of |rms - 1|."""
  errs = [np.max(np.abs(np.sqrt(np.mean(np.square(w.reshape(-1, w.shape[-1])), axis=0)) - 1))
          for path, w in jax.tree_util.tree_leaves_with_path(params) if edm2.is_mp_weight(path)]
  return float(max(errs))


def test_forced_weight_normalization_keeps_weights_on_the_sphere():
  """Initialization and every update put each MP weight, per output channel, at the
  root-mean-square of EDM2's normalize(): a / (1e-4 + a) for the pre-projection rms a,
  within 2e-4 of 1 (a ~ 1 after small steps). Adam on the same gradients without the
  projection leaves them off it by more than 1e-3. The gains move, the Fourier buffers
  (no gradient) do not."""
  s, model, _ = _tiny()
  w = edm2.MPConv(7, (3, 3)).init(jax.random.PRNGKey(3), jnp.zeros((2, 5, 5, 6)))["params"]
  assert _rms_error(w) < 2e-4  # projected at initialization
  out = _run()
  assert _rms_error(out["params2"]) < 2e-4
  assert _rms_error(out["params6"]) < 2e-4
  assert _rms_error(out["raw6"]) > 1e-3
  assert out["params6"]["unet"]["out_gain"] != out["params2"]["unet"]["out_gain"]
  np.testing.assert_array_equal(out["params6"]["unet"]["emb_fourier"]["freqs"],
                                _tree(_fixture()[0], "w0")["unet"]["emb_fourier"]["freqs"])
