"""Writes tests/data/vae/: a tiny Stable Diffusion VAE (AutoencoderKL) made and run by diffusers.

  python -m venv /path/to/venv
  /path/to/venv/bin/pip install torch==2.13.0 diffusers safetensors numpy
  /path/to/venv/bin/python tests/data/make_vae_fixture.py

(Run from the repository root; torch only in that separate virtualenv, the project never needs
it.) The network is diffusers' own `AutoencoderKL`, with the architecture of sd-vae-ft-mse shrunk
(two resolutions of 16 and 32 channels, one ResNet block per encoder level, GroupNorm with 8
groups, 4 latent channels). Every parameter is redrawn at random first (convolution and linear
weights N(0, 1 / fan_in), biases N(0, 0.2^2), GroupNorm weights 1 + N(0, 0.2^2) and biases
N(0, 0.2^2)), so a mapping error cannot hide behind ones and zeros. `save_pretrained` writes
tests/data/vae/tiny/ (config.json, diffusion_pytorch_model.safetensors, float32), exactly the
layout of a diffusers VAE folder.

tests/data/vae/tiny_outputs.npz (images and latents NHWC, like score_jax):
  x [2, 16, 16, 3]              fixed input images, uniform in [-1, 1]
  mean, logvar [2, 8, 8, 4]     diffusers' posterior (`encode(x).latent_dist`; logvar clamped
                                to [-30, 20] as diffusers does), computed in float64
  decoded [2, 16, 16, 3]        diffusers' `decode(mean)`, in float64
  mean32, logvar32, decoded32   the same in float32, diffusers' ordinary precision

The float64 outputs come from the same float32 weights (`model.double()` converts them exactly),
so they are the network's exact output up to float64 rounding; the float32 ones say how far
diffusers' own float32 evaluation is from it, the yardstick for the tolerance of the tests.

tests/data/vae/sd_vae_ft_mse_layout.json: sd-vae-ft-mse's parameter count and the name and
shape of each of its tensors, from diffusers' AutoencoderKL built with that configuration on
torch's meta device (no weights exist or are downloaded).

Before writing, the script checks that diffusers reads the tiny folder back with every key
renamed to the old attention names (query, key, value, proj_attn) and gives the same outputs:
the old layout that score_jax's reader also accepts (tests/test_vae.py renames the keys the
same way).
"""

import json
import os
import shutil
import tempfile

import diffusers
import numpy as np
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "vae")

CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
              layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=8,
              sample_size=16, scaling_factor=0.18215)

# stabilityai/sd-vae-ft-mse's architecture (its config.json; sd-vae-ft-ema has the same).
SD_VAE_FT_MSE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4,
                     block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
                     latent_channels=4, norm_num_groups=32, sample_size=256)

OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Redraws every parameter of `model`; fails if one is left as initialized."""
  done = set()
  with torch.no_grad():
    for mname, module in model.named_modules():
      for pname, p in module.named_parameters(recurse=False):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if isinstance(module, torch.nn.GroupNorm):
          p.copy_(noise * 0.2 + (1.0 if pname == "weight" else 0.0))
        elif pname == "bias":
          p.copy_(noise * 0.2)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
          p.copy_(noise / np.sqrt(p[0].numel()))
        else:
          raise AssertionError(f"unexpected parameter {mname}.{pname} of {type(module)}")
        done.add(f"{mname}.{pname}")
  missing = {name for name, _ in model.named_parameters()} - done
  assert not missing, missing


def run(model: AutoencoderKL, x: torch.Tensor):
  """(mean, logvar, decode(mean)) of diffusers' AutoencoderKL, NHWC numpy."""
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    decoded = model.decode(posterior.mean).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


def sd_vae_ft_mse_layout():
  """sd-vae-ft-mse's tensor names and shapes and its parameter count, from diffusers' class
  built on the meta device (shapes only, no memory, no weights)."""
  with torch.device("meta"):
    model = AutoencoderKL(**SD_VAE_FT_MSE)
  tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
  return dict(diffusers=diffusers.__version__, config=SD_VAE_FT_MSE,
              parameters=sum(p.numel() for p in model.parameters()), tensors=tensors)


def main():
  torch.manual_seed(0)
  model = AutoencoderKL(**CONFIG).eval()
  generator = torch.Generator().manual_seed(2026)
  randomize(model, generator)
  x = torch.rand((2, 3, 16, 16), generator=generator, dtype=torch.float32) * 2 - 1

  mean32, logvar32, decoded32 = run(model, x)
  mean, logvar, decoded = run(model.double(), x.double())
  model = model.float()

  folder = os.path.join(OUT, "tiny")
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True)

  # diffusers reads the old attention names of the same weights to the same network.
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(os.path.join(folder, "config.json"), tmp)
    tensors = safetensors.torch.load_file(
        os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
      for new, old in OLD_NAMES.items():
        key = key.replace(f".{new}.", f".{old}.")
      renamed[key] = value
    assert sum(".query." in k for k in renamed) == 4, sorted(renamed)
    safetensors.torch.save_file(renamed, os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
    old = AutoencoderKL.from_pretrained(tmp).eval()
    for a, b in zip(run(old, x), (mean32, logvar32, decoded32)):
      np.testing.assert_array_equal(a, b)

  np.savez_compressed(
      os.path.join(OUT, "tiny_outputs.npz"), x=x.permute(0, 2, 3, 1).numpy(),
      mean=mean, logvar=logvar, decoded=decoded,
      mean32=mean32, logvar32=logvar32, decoded32=decoded32)

  layout = sd_vae_ft_mse_layout()
  with open(os.path.join(OUT, "sd_vae_ft_mse_layout.json"), "w") as f:
    tensors = layout.pop("tensors")
    head = json.dumps(layout)[:-1]
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in tensors.items())
    f.write(f'{head}, "tensors": {{\n{rows}\n}}}}\n')
    layout["tensors"] = tensors
  print("sd-vae-ft-mse: parameters", layout["parameters"], "tensors", len(layout["tensors"]))

  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  params = sum(p.numel() for p in model.parameters())
  print("diffusers", diffusers.__version__, "torch", torch.__version__,
        "safetensors", safetensors.__version__, "numpy", np.__version__)
  print("parameters", params, "tensors", len(model.state_dict()), "config", config)
  for name in ("mean", "logvar", "decoded"):
    ref, f32 = locals()[name], locals()[name + "32"]
    print(f"{name}: max |x| {np.abs(ref).max():.3g}, diffusers float32 - float64 max abs "
          f"{np.abs(f32 - ref).max():.3g}")
  for path in sorted(os.listdir(folder)) + ["../tiny_outputs.npz", "../sd_vae_ft_mse_layout.json"]:
    print(path, os.path.getsize(os.path.join(folder, path)), "bytes")


if __name__ == "__main__":
  main()
