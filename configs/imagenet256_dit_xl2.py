"""DiT-XL/2 (Peebles & Xie 2023) on ImageNet 256x256 latents: 674.83M parameters.

  python -m score_jax.convert --from=dit --config=configs/imagenet256_dit_xl2.py DiT-XL-2-256x256.pt runs/dit_xl2
  python main.py --config=runs/dit_xl2/config.json --workdir=runs/dit_xl2 --mode=sample

The network is score_jax's `DiT` (models/dit.py: XL, patch 2, 1000 classes and a null label,
learned variance channels) on the 32x32x4 latents of Stable Diffusion's VAE (images / 8,
multiplied by 0.18215). The diffusion is DiT's: the DDPM chain with linear betas from 1e-4 to
0.02 over 1000 steps (score_jax's VP SDE with beta 0.1..20, N = 1000, discrete time: the step
index is the network's time label), noise prediction, the mean squared error over latent
dimensions, labels dropped at rate 0.1 for classifier-free guidance. AdamW at 1e-4 with no
weight decay (optax's Adam), no warm-up, no clipping, batch 256, EMA 0.9999 (train.py).
DiT also trains its variance channels with the variational bound (improved DDPM's hybrid loss);
score_jax's losses train the noise prediction only, so a run trained here leaves those
channels at their initialization; converted networks keep the authors' (models/dit.py says
how they are read).

Data: `data.dataset = 'latents'` with `data.path` the ImageNet latents that
`python -m score_jax.data.encode --vae=sd-vae-ft-mse --config=<ImageNet 256 config> --out=DIR`
writes (docs/latent.md); training draws scaled posterior samples from them, and samples,
grids and FID are decoded through the VAE named in DIR/meta.json. ImageNet figures need an
accelerator and were not measured here.

Sampling: DiT samples 250 DDPM steps with its learned variance and a guidance scale s (1.5
for its FID 2.27, 4.0 for its figures), applied to the first 3 latent channels "for exact
reproducibility". Here: DDIM with eta = 1 (the DDPM posterior's variance) on 250 uniform
steps, and guidance on all channels with sampling.guidance_weight = s - 1 (score_jax guides
as (1 + w) s_cond - w s_uncond). FIDs therefore need not equal the paper's.

The other sizes are --config.model.dit_size=S|B|L|XL --config.model.patch_size=2|4|8; the
released DiT-XL/2 at 512x512 is --config.data.image_size=64.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()

  training = config.training
  training.sde = "vpsde"
  training.continuous = False  # the DDPM chain, integer time labels
  training.reduce_mean = True  # DiT's mean over dimensions
  training.batch_size = 256
  training.n_iters = 400_001  # the paper's ablations; its best XL/2 ran 7M steps
  training.snapshot_freq = 50_000  # train.py's --ckpt-every
  training.snapshot_freq_for_preemption = 10_000
  training.snapshot_sampling = False  # latents; images come from the VAE
  training.log_freq = 100
  training.class_dropout = 0.1  # DiT's class_dropout_prob

  sampling = config.sampling
  sampling.method = "ddim"
  sampling.num_steps = 250
  sampling.eta = 1.0
  sampling.schedule = "uniform_t"
  sampling.eps = 1e-3
  sampling.noise_removal = False
  sampling.guidance_weight = 0.5  # DiT's cfg scale 1.5
  sampling.batch_size = 32

  data = config.data
  data.dataset = "latents"
  data.image_size = 32  # 256 / 8
  data.num_channels = 4
  data.random_flip = False  # DiT flips the images before encoding
  data.centered = True

  model = config.model
  model.name = "dit"
  model.dit_size = "XL"
  model.patch_size = 2
  model.hidden_size = 0  # 0: the size's (1152, 28 blocks, 16 heads for XL)
  model.depth = 0
  model.num_heads = 0
  model.learn_sigma = True
  model.num_classes = 1000
  model.beta_min = 0.1  # betas 1e-4 .. 0.02 over 1000 steps
  model.beta_max = 20.0
  model.num_scales = 1000
  model.ema_rate = 0.9999
  model.parameterization = "default"
  model.dtype = "float32"  # "bfloat16" on accelerators

  optim = config.optim
  optim.optimizer = "AdamW"
  optim.lr = 1e-4
  optim.weight_decay = 0.0
  optim.warmup = 0
  optim.grad_clip = 0.0

  config.eval.batch_size = 256
  config.eval.enable_loss = True
  return config
