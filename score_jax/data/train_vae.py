"""`python -m score_jax.data.train_vae --config=CONFIG --out=FOLDER`: a small AutoencoderKL
trained on a config's images, written as a diffusers folder (what score_jax.data.encode and
`load_vae` read).

  python -m score_jax.data.train_vae --config=configs/digits.py --config.data.image_size=16 \\
      --out=runs/digits_vae

For data where no released VAE fits (the 8x8 digits): `score_jax.models.vae.AutoencoderKL` with
--block_out_channels (one entry per level; L levels halve the resolution L - 1 times),
--latent_channels and GroupNorm groups --norm_num_groups, trained with Adam on

  loss = mean |x - D(z)|^2 + kl_weight * mean KL(N(mean, std^2) || N(0, I)),
  z = mean + std * eps  (the encoder's posterior, one draw per image and step)

over [-1, 1] images (no perceptual or adversarial term: enough for digits, not for photos).
Batches come from the score_jax pipeline (uint8 images, no flips), keyed by the config's seed.
The scaling factor written into config.json is 1 / std of the posterior draws over the training
images, the rule latent diffusion used for sd-vae-ft-mse's 0.18215, so that scaled latents
have unit variance. The folder holds config.json and diffusion_pytorch_model.safetensors
(float32, safetensors' numpy writer; `score_jax.convert.vae.save_vae`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax.errors import ConfigError

__all__ = ["kl_divergence", "vae_loss", "train_vae", "scaling_factor", "main"]


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) elementwise."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def vae_loss(module: Any, params: Any, key: jax.Array, x: jax.Array,
             kl_weight: float) -> tuple[jax.Array, Dict[str, jax.Array]]:
  """(loss, {'mse', 'kl'}) of images x [B, H, W, C] in [-1, 1] (module docstring)."""
  from score_jax.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top

  variables = {"params": params}
  mean, logvar = module.apply(variables, x, method=AutoencoderKL.encode)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = module.apply(variables, z, method=AutoencoderKL.decode)
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(kl_divergence(mean, logvar))
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def scaling_factor(vae: Any, params: Any, images: np.ndarray, key: jax.Array,
                   batch_size: int = 256) -> float:
  """1 / std of posterior draws z over `images` (float [-1, 1]), all elements together."""
  total, total_sq, count = 0.0, 0.0, 0
  for i, start in enumerate(range(0, len(images), batch_size)):
    mean, logvar = vae.encode(params, images[start:start + batch_size])
    eps = jax.random.normal(jax.random.fold_in(key, i), mean.shape)
    z = np.asarray(mean + jnp.exp(0.5 * logvar) * eps, np.float64)
    total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
  var = total_sq / count - (total / count) ** 2
  return float(1.0 / np.sqrt(var))


def train_vae(data: Any, out: str, *, block_out_channels: Sequence[int] = (32, 64),
              latent_channels: int = 4, layers_per_block: int = 1, norm_num_groups: int = 8,
              steps: int = 500, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-3, seed: int = 0, log_every: int = 100,
              progress: bool = True) -> Dict[str, Any]:
  """Trains an AutoencoderKL on the images `data` (data settings) names and writes it to out.

  Returns:
    {'scaling_factor', 'mse', 'kl', 'test_mse' (of the posterior means on the test split),
    'seconds', 'history': [(step, mse, kl)]}.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  from score_jax.convert.vae import save_vae  # pylint: disable=g-import-not-at-top
  from score_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from score_jax.data.encode import to_vae_input  # pylint: disable=g-import-not-at-top
  from score_jax.models.vae import VAE, AutoencoderKL  # pylint: disable=g-import-not-at-top

  if str(data.dataset).lower() in ("toy", "latents"):
    raise ConfigError(f"train_vae trains on images; data.dataset {data.dataset!r} is not an "
                      "image dataset (use an image config such as configs/digits.py).")
  channels = tuple(int(c) for c in block_out_channels)
  if any(c % norm_num_groups for c in channels):
    raise ConfigError(f"--norm_num_groups={norm_num_groups} must divide every entry of "
                      f"--block_out_channels={list(channels)}.")
  factor = 2 ** (len(channels) - 1)
  if data.image_size % factor:
    raise ConfigError(f"{len(channels)} levels halve the resolution {len(channels) - 1} times: "
                      f"data.image_size = {data.image_size} must be a multiple of {factor}.")
  c = int(data.num_channels)
  module = AutoencoderKL(in_channels=c, out_channels=c, block_out_channels=channels,
                         layers_per_block=layers_per_block, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups)
  vae = VAE(module)
  key = jax.random.PRNGKey(seed)
  size = int(data.image_size)
  params = module.init(jax.random.fold_in(key, 0), jnp.zeros((1, size, size, c)))["params"]
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, x, step):
    k = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: vae_loss(module, p, k, x, kl_weight), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  batches = datasets.get_dataset(data, "train", batch_size=batch_size, seed=seed, raw=True,
                                 process_index=0, process_count=1)
  history: List[tuple] = []
  start = time.perf_counter()
  with tqdm(total=steps, desc="training the VAE", unit="step", disable=not progress) as bar:
    for step in range(steps):
      x = to_vae_input(next(batches)["image"], c)
      params, opt_state, aux = step_fn(params, opt_state, x, step)
      if (step + 1) % log_every == 0 or step + 1 == steps:
        mse, kl = float(aux["mse"]), float(aux["kl"])
        history.append((step + 1, mse, kl))
        bar.set_postfix(mse=f"{mse:.4f}", kl=f"{kl:.3f}")
        logging.info("step %d: mse %.5f, kl %.4f", step + 1, mse, kl)
      bar.update(1)
  seconds = time.perf_counter() - start
  train_images = to_vae_input(datasets.open_data(data, "train").read(
      np.arange(datasets.num_examples(data, "train")))[0], c)
  scale = scaling_factor(vae, params, train_images, jax.random.fold_in(key, 2))
  test = to_vae_input(datasets.open_data(data, "test").read(
      np.arange(datasets.num_examples(data, "test")))[0], c)
  test_mse = float(np.mean([np.mean(np.square(
      np.asarray(vae.decode(params, vae.encode(params, test[i:i + 256])[0])) - test[i:i + 256]))
                            for i in range(0, len(test), 256)]))
  save_vae(out, module, params, scale)
  logging.info("Wrote %s: scaling factor %.5f, test reconstruction mse %.5f.", out, scale,
               test_mse)
  return {"scaling_factor": scale, "mse": history[-1][1], "kl": history[-1][2],
          "test_mse": test_mse, "seconds": seconds, "history": history}


# ---------------------------------------------------------------------------
# Command line

_USAGE = ("python -m score_jax.data.train_vae --config=IMAGE_CONFIG --out=FOLDER [--steps=500] "
          "[--batch_size=64] [--block_out_channels=32,64] [--latent_channels=4] "
          "[--kl_weight=1e-3] [--lr=1e-3]")


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "An image config; its data section names the "
                                  "training images.", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("out", None, "The folder to write (config.json and the weights).",
                      flag_values=fv)
  flags.DEFINE_integer("steps", 500, "Training steps.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images per step.", flag_values=fv)
  flags.DEFINE_list("block_out_channels", ["32", "64"], "Width of each level.", flag_values=fv)
  flags.DEFINE_integer("latent_channels", 4, "Latent channels.", flag_values=fv)
  flags.DEFINE_integer("layers_per_block", 1, "ResNet blocks per level.", flag_values=fv)
  flags.DEFINE_integer("norm_num_groups", 8, "GroupNorm groups.", flag_values=fv)
  flags.DEFINE_float("lr", 1e-3, "Adam's learning rate.", flag_values=fv)
  flags.DEFINE_float("kl_weight", 1e-3, "Weight of the KL term.", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (score_jax.run.cli's conventions)."""
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings as settings_lib  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  parsed = cli.parse(argv, _define_flags, _USAGE, 0, doc=__doc__)
  if parsed is None:
    return cli.USAGE_ERROR
  fv, _ = parsed
  if fv.config is None or not fv.out:
    print(f"usage: {_USAGE}", file=sys.stderr)
    return cli.USAGE_ERROR
  logging.getLogger().setLevel(logging.INFO)

  def run() -> int:
    settings = settings_lib.from_config(fv.config)
    try:
      channels = [int(c) for c in fv.block_out_channels]
    except ValueError:
      raise ConfigError(f"--block_out_channels must be integers, got "
                        f"{','.join(fv.block_out_channels)}.") from None
    result = train_vae(settings.data, fv.out, block_out_channels=channels,
                       latent_channels=fv.latent_channels, layers_per_block=fv.layers_per_block,
                       norm_num_groups=fv.norm_num_groups, steps=fv.steps,
                       batch_size=fv.batch_size, lr=fv.lr, kl_weight=fv.kl_weight,
                       seed=settings.seed)
    print(f"Wrote {fv.out} ({fv.steps} steps in {result['seconds']:.0f} s): train mse "
          f"{result['mse']:.5f}, test mse {result['test_mse']:.5f} (images in [-1, 1]), "
          f"scaling factor {result['scaling_factor']:.5f}. Encode with: python -m "
          f"score_jax.data.encode --vae={fv.out} --config=... --out=DIR")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  from score_jax.run import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.apply_defaults()
  sys.exit(main())
