"""EDM (Karras et al. 2022) on CIFAR-10, DDPM++ backbone: 55.73M parameters.

EDM's CIFAR-10 training as NVlabs/edm's train.py and training_loop.py set it
(`--arch=ddpmpp --precond=edm`, the `-vp` networks; `vp` and `ve` name the
backbone, as in EDM's file names). The network is score_jax's `SongUNet`
(EDM's re-implementation of DDPM++: 128 channels, multipliers (2, 2, 2), 4
blocks per resolution, attention at 16x16, dropout 0.13, positional
embedding, [1, 1] resampling filter, 9 augmentation labels) behind EDM's
preconditioning (`model.parameterization = 'edm'`, sigma_data 0.5). EDM's
time parameterization sigma(t) = t, s(t) = 1 is score_jax's VE SDE with
sigma from 0.002 to 80; with EDM's log-normal noise levels (P_mean -1.2,
P_std 1.2) and EDM's weighting the loss is EDM's, summed over pixels.

Sampler: EDM's deterministic Heun, 18 noise levels from 80 to 0.002 with
rho = 7, 35 network evaluations: score_jax's `heun` takes num_steps Heun
steps between grid levels (two evaluations each) and EDM's last step to
sigma = 0 is the denoising step, so 17 steps + noise_removal = 35 NFE.
Reported: FID 1.97 unconditional, 1.79 with 10 classes
(`--config.model.num_classes=10`, a 1,408-parameter label embedding).

Released networks convert with
`python -m score_jax.convert --from=edm --config=configs/edm_cifar_vp.py
edm-cifar10-32x32-uncond-vp.pkl DST` (`--config.model.num_classes=10` for
the `-cond-` files).

EMA with a half-life of 0.5 Mimg and ramp-up ratio 0.05
(model.ema_halflife_kimg, model.ema_rampup_ratio), learning-rate ramp-up
over 10 Mimg (optim.lr_rampup_kimg), non-finite gradient entries set to zero
(optim.nonfinite_grads = 'zero'), and EDM's non-leaky augmentation with p =
0.12 (`train.py --augment=0.12`: x-flip selected always, so 50% of the images
are flipped, y-flip, isotropic scaling, rotation, anisotropic scaling and
fractional translation each at 12%), whose 9 labels the network takes
(model.augment_dim = 9; zero at sampling time). EDM flips the data only
through the augmentation (its --xflip is off), so data.random_flip is off.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()

  training = config.training
  training.sde = "vesde"
  training.continuous = True
  training.reduce_mean = False  # EDM sums the loss over pixels
  training.batch_size = 512
  training.n_iters = 390_625  # 200 Mimg
  training.snapshot_freq = 5_000  # 2.56 Mimg (EDM: every 2.5 Mimg)
  training.snapshot_freq_for_preemption = 1_000
  training.eps = 1e-5
  training.time_distribution = "lognormal_sigma"
  training.p_mean = -1.2
  training.p_std = 1.2
  training.weighting = "edm"
  training.class_dropout = 0.0

  sampling = config.sampling
  sampling.method = "heun"
  sampling.num_steps = 17  # + noise_removal: 18 levels, 35 NFE
  sampling.schedule = "edm"
  sampling.s_churn = 0.0
  sampling.noise_removal = True
  sampling.eps = 1e-6  # sigma^ = 0.002 * 40000 ** 1e-6 = 0.0020000212

  data = config.data
  data.dataset = "cifar10"
  data.image_size = 32
  data.centered = True  # EDM's data are in [-1, 1]
  data.random_flip = False  # the augmentation flips, with a label
  data.augment_p = 0.12
  data.augment_xflip = 1e8
  data.augment_yflip = 1.0
  data.augment_scale = 1.0
  data.augment_rotate_frac = 1.0
  data.augment_aniso = 1.0
  data.augment_translate_frac = 1.0

  model = config.model
  model.name = "song_unet"
  model.parameterization = "edm"
  model.sigma_data = 0.5
  model.sigma_min = 0.002
  model.sigma_max = 80.0
  model.num_classes = 0
  model.ema_halflife_kimg = 500.0  # 0.5 Mimg; replaces model.ema_rate
  model.ema_rampup_ratio = 0.05
  model.dropout = 0.13
  model.nf = 128
  model.ch_mult = (2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.channel_mult_emb = 4
  model.embedding_type = "positional"
  model.channel_mult_noise = 1
  model.encoder_type = "standard"
  model.decoder_type = "standard"
  model.resample_filter = (1, 1)
  model.augment_dim = 9

  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 1e-3
  optim.beta1 = 0.9  # beta2 is 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 0
  optim.lr_rampup_kimg = 10_000.0  # 10 Mimg
  optim.grad_clip = 0.0  # no clipping
  optim.nonfinite_grads = "zero"
  return config
