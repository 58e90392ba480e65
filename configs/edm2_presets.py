"""EDM2's generation presets (Karras et al. 2024; NVlabs/edm2 generate_images.py) for converted
networks: `--config=configs/edm2_presets.py:<preset>`.

  python -m score_jax.convert --from=edm2 --config=configs/edm2_presets.py:edm2-img512-s-fid \\
      edm2-img512-s-2147483-0.130.pkl runs/edm2-img512-s-fid
  python main.py --config=runs/edm2-img512-s-fid/config.json --workdir=runs/edm2-img512-s-fid \\
      --mode=sample

A guided preset (edm2-img512-s-autog-fid, the guid-* ones, ...) names two networks: convert
the main one into runs/<preset> and the guide into runs/<preset>-guide (this config's
sample.guide_workdir, the guide's converted config samples alone), then sample the first:

  python -m score_jax.convert --from=edm2 \\
      --config=configs/edm2_presets.py:edm2-img512-s-autog-fid \\
      edm2-img512-s-2147483-0.070.pkl runs/edm2-img512-s-autog-fid
  python -m score_jax.convert --from=edm2 \\
      --config=configs/edm2_presets.py:edm2-img512-s-autog-fid \\
      edm2-img512-xs-0134217-0.125.pkl runs/edm2-img512-s-autog-fid-guide
  python main.py --config=runs/edm2-img512-s-autog-fid/config.json \\
      --workdir=runs/edm2-img512-s-autog-fid --mode=sample

`PRESETS` lists each preset's network files (EDM2's
https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/<file>), guide and guidance.
EDM2's guidance g is D = D_guide + g (D_main - D_guide), score_jax's autoguidance
(1 + w) s_main - w s_guide: sampling.guidance_weight = g - 1. EDM2's guid-* presets guide
with an unconditional network (the xs '-uncond-' one), which score_jax's autoguidance
evaluates without labels, as EDM2 does.

The sampler is EDM2's: EDM's deterministic Heun on 32 noise levels from 80 to 0.002 with
rho = 7 and a last Euler step to 0, 63 network evaluations (sampling.num_steps = 31 Heun
steps + noise_removal, the denoising step), computed in float32. The rest is the main
network's training preset (configs/_families.py edm2_imagenet: EDM's process, the VE SDE
with sigma 0.002..80, model.parameterization 'edm', sigma_data 0.5, EDM2's loss and
optimizer), the network score_jax's EDM2UNet; the converter sets its architecture from the
file, so any network of the preset's data converts with it.

img512 networks model 64 x 64 x 4 latents of Stable Diffusion's VAE (sd-vae-ft-mse) of [0, 1]
pixels (data.vae_centered = False), which EDM2 normalizes per channel (z = (raw - mean) * 0.5 /
std, mean (5.81, 3.25, 0.12, -2.15), std (4.17, 4.62, 3.71, 3.28): data.latent_scale and
data.latent_shift, score_jax.data.latents.edm2_norm()); data.dataset = 'latents'. Samples
decode through data.vae, a local diffusers folder of sd-vae-ft-mse, with no encoded dataset:

  python -m score_jax.convert --from=edm2 --config=configs/edm2_presets.py:edm2-img512-s-fid \\
      --config.data.vae=sd-vae-ft-mse edm2-img512-s-2147483-0.130.pkl runs/edm2-img512-s-fid

img64 networks model ImageNet 64 x 64 pixels in [-1, 1] (data.dataset = 'images', data.path
EDM2's dataset zip). Both have 1000 classes (the '-uncond-' networks none; the converter takes
label_dim from the file).
"""

from typing import Dict, NamedTuple, Optional

import ml_collections

from configs import _families as families, default
from score_jax.errors import ConfigError


class Preset(NamedTuple):
  net: str  # EDM2's released file of the main network
  gnet: Optional[str] = None  # the guide's, for guided presets
  guidance: float = 1.0  # EDM2's guidance g (1: none)


PRESETS: Dict[str, Preset] = {
    "edm2-img512-xs-fid": Preset("edm2-img512-xs-2147483-0.135.pkl"),
    "edm2-img512-xs-dino": Preset("edm2-img512-xs-2147483-0.200.pkl"),
    "edm2-img512-s-fid": Preset("edm2-img512-s-2147483-0.130.pkl"),
    "edm2-img512-s-dino": Preset("edm2-img512-s-2147483-0.190.pkl"),
    "edm2-img512-m-fid": Preset("edm2-img512-m-2147483-0.100.pkl"),
    "edm2-img512-m-dino": Preset("edm2-img512-m-2147483-0.155.pkl"),
    "edm2-img512-l-fid": Preset("edm2-img512-l-1879048-0.085.pkl"),
    "edm2-img512-l-dino": Preset("edm2-img512-l-1879048-0.155.pkl"),
    "edm2-img512-xl-fid": Preset("edm2-img512-xl-1342177-0.085.pkl"),
    "edm2-img512-xl-dino": Preset("edm2-img512-xl-1342177-0.155.pkl"),
    "edm2-img512-xxl-fid": Preset("edm2-img512-xxl-0939524-0.070.pkl"),
    "edm2-img512-xxl-dino": Preset("edm2-img512-xxl-0939524-0.150.pkl"),
    "edm2-img64-s-fid": Preset("edm2-img64-s-1073741-0.075.pkl"),
    "edm2-img64-m-fid": Preset("edm2-img64-m-2147483-0.060.pkl"),
    "edm2-img64-l-fid": Preset("edm2-img64-l-1073741-0.040.pkl"),
    "edm2-img64-xl-fid": Preset("edm2-img64-xl-0671088-0.040.pkl"),
    "edm2-img512-xs-guid-fid": Preset("edm2-img512-xs-2147483-0.045.pkl",
                                      "edm2-img512-xs-uncond-2147483-0.045.pkl", 1.40),
    "edm2-img512-xs-guid-dino": Preset("edm2-img512-xs-2147483-0.150.pkl",
                                       "edm2-img512-xs-uncond-2147483-0.150.pkl", 1.70),
    "edm2-img512-s-guid-fid": Preset("edm2-img512-s-2147483-0.025.pkl",
                                     "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.40),
    "edm2-img512-s-guid-dino": Preset("edm2-img512-s-2147483-0.085.pkl",
                                      "edm2-img512-xs-uncond-2147483-0.085.pkl", 1.90),
    "edm2-img512-m-guid-fid": Preset("edm2-img512-m-2147483-0.030.pkl",
                                     "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.20),
    "edm2-img512-m-guid-dino": Preset("edm2-img512-m-2147483-0.015.pkl",
                                      "edm2-img512-xs-uncond-2147483-0.015.pkl", 2.00),
    "edm2-img512-l-guid-fid": Preset("edm2-img512-l-1879048-0.015.pkl",
                                     "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20),
    "edm2-img512-l-guid-dino": Preset("edm2-img512-l-1879048-0.035.pkl",
                                      "edm2-img512-xs-uncond-2147483-0.035.pkl", 1.70),
    "edm2-img512-xl-guid-fid": Preset("edm2-img512-xl-1342177-0.020.pkl",
                                      "edm2-img512-xs-uncond-2147483-0.020.pkl", 1.20),
    "edm2-img512-xl-guid-dino": Preset("edm2-img512-xl-1342177-0.030.pkl",
                                       "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.70),
    "edm2-img512-xxl-guid-fid": Preset("edm2-img512-xxl-0939524-0.015.pkl",
                                       "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20),
    "edm2-img512-xxl-guid-dino": Preset("edm2-img512-xxl-0939524-0.015.pkl",
                                        "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.70),
    "edm2-img512-s-autog-fid": Preset("edm2-img512-s-2147483-0.070.pkl",
                                      "edm2-img512-xs-0134217-0.125.pkl", 2.10),
    "edm2-img512-s-autog-dino": Preset("edm2-img512-s-2147483-0.120.pkl",
                                       "edm2-img512-xs-0134217-0.165.pkl", 2.45),
    "edm2-img512-xxl-autog-fid": Preset("edm2-img512-xxl-0939524-0.075.pkl",
                                        "edm2-img512-m-0268435-0.155.pkl", 2.05),
    "edm2-img512-xxl-autog-dino": Preset("edm2-img512-xxl-0939524-0.130.pkl",
                                         "edm2-img512-m-0268435-0.205.pkl", 2.30),
    "edm2-img512-s-uncond-autog-fid": Preset("edm2-img512-s-uncond-2147483-0.070.pkl",
                                             "edm2-img512-xs-uncond-0134217-0.110.pkl", 2.85),
    "edm2-img512-s-uncond-autog-dino": Preset("edm2-img512-s-uncond-2147483-0.090.pkl",
                                              "edm2-img512-xs-uncond-0134217-0.125.pkl", 2.90),
    "edm2-img64-s-autog-fid": Preset("edm2-img64-s-1073741-0.045.pkl",
                                     "edm2-img64-xs-0134217-0.110.pkl", 1.70),
    "edm2-img64-s-autog-dino": Preset("edm2-img64-s-1073741-0.105.pkl",
                                      "edm2-img64-xs-0134217-0.175.pkl", 2.20),
}

def _network(file: str):
  """(data 'img512' | 'img64', size, conditional) of a released file name."""
  parts = file.split("-")  # edm2, img512, s, [uncond,] kimg, std.pkl
  return parts[1], parts[2], parts[3] != "uncond"


def get_config(preset: str = "edm2-img512-s-fid") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ConfigError(f"Unknown EDM2 preset {preset!r}; choose one of {sorted(PRESETS)} "
                      "(--config=configs/edm2_presets.py:<preset>).")
  p = PRESETS[preset]
  data_kind, size, conditional = _network(p.net)
  # The main network's training preset (data, process, loss, network size), then generation.
  config = families.edm2_imagenet(default.get_config(), f"{data_kind}-{size}")

  sampling = config.sampling
  sampling.method = "heun"
  sampling.num_steps = 31  # + noise_removal: 32 levels, 63 NFE
  sampling.schedule = "edm"
  sampling.s_churn = 0.0
  sampling.noise_removal = True
  sampling.eps = 1e-6  # sigma^ = 0.002 * 40000 ** 1e-6 = 0.0020000212
  sampling.guidance_weight = p.guidance - 1.0
  sampling.batch_size = 32
  if p.gnet is not None:
    config.sample.guide_workdir = f"runs/{preset}-guide"

  model = config.model
  model.dtype = "float32"  # EDM2 generates in float16; bfloat16 has 3 fewer mantissa bits
  model.num_classes = 1000 if conditional else 0
  # EDM2's UNet defaults, written out (the converter reports the file's values that differ).
  model.channel_mult = (1, 2, 3, 4)
  model.num_blocks = 3
  model.attn_resolutions = (16, 8)
  model.channel_mult_noise = None  # None: channel_mult[0]
  model.channel_mult_emb = None  # None: max(channel_mult)
  model.label_balance = 0.5
  model.concat_balance = 0.5
  model.channels_per_head = 64
  model.res_balance = 0.3
  model.attn_balance = 0.3
  model.clip_act = 256.0
  model.logvar_channels = 128
  return config
