"""MeanFlow (Geng et al. 2025) on unconditional CIFAR-10: one-step generation with EDM's
DDPM++ U-Net taking a second time (the paper: ~55M parameters, 1-NFE FID 2.92; the authors'
PyTorch README: below 2.9 for its released checkpoint of a later sampler, cifar10_v1.sh).

  python main.py --config=configs/cifar10_meanflow.py --workdir=runs/cifar10_meanflow --mode=train
  python main.py --config=runs/cifar10_meanflow/config.json --workdir=runs/cifar10_meanflow \\
      --mode=sample --config.sampling.num_steps=2

Sources. The paper's CIFAR-10 runs were made with JAX on TPUs; the JAX code released
(Gsunshine/meanflow) has only the ImageNet configs. The CIFAR-10 settings here are those of
the authors' PyTorch release, Gsunshine/py-meanflow, whose README calls
meanflow/scripts/cifar10_v0.sh "the original configuration used in the paper" (its
cifar10_v1.sh, a later (t, r) sampler, is not used). The paper's appendix table itself could
not be read here, so the values below are checked against the authors' code only, and the
~55M and FID 2.92 above are the paper's as secondary sources quote them.

From cifar10_v0.sh and train_arg_parser.py's defaults:
- batch 1,024 (128 per GPU x 8 GPUs); Adam, lr 6e-4, betas (0.9, 0.999), eps 1e-8, no weight
  decay, no gradient clipping, lr constant after a linear warm-up of 200 epochs;
- 16,000 epochs, "800k iterations" in the README: training.n_iters = 800,000 and
  optim.warmup = 10,000 (200 of the 16,000 epochs). The script's data loader drops the last
  partial batch of each GPU's 6,250 images, so it takes 48 steps an epoch: 768,000 steps and
  a warm-up of 9,600;
- (t, r): two independent logit-normal times, logit ~ N(-2, 2^2) for both, sorted so
  r <= t, then r = t on a quarter of the batch: r != t on 75% (training.meanflow_ratio; the
  script's `--tr_sampler=v0`, which score_jax.meanflow.sample_times implements);
- the adaptive weight 1 / (||u - u_tgt||^2 + c)^p with p = 0.75 and c = 1e-3 (`norm_p`,
  `norm_eps`), the error summed over pixels;
- dropout 0.2; EMA decay 0.9999 per step (the code applies 0.9999^16 every 16 steps and also
  keeps EMAs 0.99995 and 0.9996 to evaluate, not kept here);
- data in [-1, 1], a random horizontal flip, and EDM's augmentation (`--use_edm_aug`) with
  p = 0.12 and EDM's CIFAR-10 multipliers but y-flip and rotation off: x-flip (every image
  selected, half flipped), isotropic scaling, anisotropic scaling and fractional translation,
  6 labels the network takes (model.augment_dim = 6; zero at sampling time).

The network (the code's models/model_configs.py): EDM's SongUNet with the DDPM++ settings of
configs/edm_cifar_vp.py (128 channels, multipliers (2, 2, 2), 4 blocks per resolution,
attention at 16x16, positional embedding) except a 2 x 128 noise embedding
(channel_mult_noise 2) and the [1, 3, 3, 1] resampling filter, taking t and t - r as the
authors' network does (model.second_time_mode = 'concat'): the positional embeddings of t and
t - r are concatenated in that order (512 wide) before the mapping network's first layer,
whose input, like the augmentation labels' layer, is that wide. The parameter count is then
the authors' network's, 55,932,419 (tests/test_meanflow.py counts their class).

Sampling: one jump z_0 = z_1 - u(z_1, 0, 1) (sampling.num_steps = 1; 2 for two jumps).
"""

import ml_collections

from configs import edm_cifar_vp


def get_config() -> ml_collections.ConfigDict:
  config = edm_cifar_vp.get_config()  # the DDPM++ network, CIFAR-10 data, EDM's augmentation

  training = config.training
  training.sde = "rectified_flow"
  training.continuous = True
  training.objective = "meanflow"
  training.batch_size = 1024
  training.n_iters = 800_000
  training.snapshot_freq = 10_000
  training.snapshot_freq_for_preemption = 2_000
  training.time_distribution = "logit_normal"
  training.logit_mean = -2.0
  training.logit_std = 2.0
  training.meanflow_ratio = 0.75
  training.meanflow_power = 0.75
  training.meanflow_c = 1e-3
  training.weighting = "default"  # unused by the MeanFlow loss

  sampling = config.sampling
  sampling.method = "meanflow"
  sampling.num_steps = 1
  sampling.noise_removal = False
  config.eval.enable_bpd = False  # the likelihood integrates a score; this network gives u

  data = config.data
  data.random_flip = True
  data.augment_p = 0.12
  data.augment_xflip = 1e8
  data.augment_yflip = 0.0
  data.augment_scale = 1.0
  data.augment_rotate_frac = 0.0
  data.augment_aniso = 1.0
  data.augment_translate_frac = 1.0

  model = config.model
  model.parameterization = "default"  # the network's output is u
  model.second_time = True
  model.second_time_mode = "concat"  # [emb(t), emb(t - r)], the authors' network
  model.dropout = 0.2
  model.channel_mult_noise = 2
  model.resample_filter = (1, 3, 3, 1)
  model.augment_dim = 6
  model.ema_halflife_kimg = 0.0  # the constant decay model.ema_rate
  model.ema_rate = 0.9999
  model.ema_warmup = False

  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 6e-4
  optim.beta1 = 0.9  # beta2 is 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.lr_rampup_kimg = 0.0
  optim.warmup = 10_000
  optim.grad_clip = 0.0  # no clipping
  optim.nonfinite_grads = "skip"  # the code stops on a non-finite loss
  return config
