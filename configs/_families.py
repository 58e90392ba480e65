"""The EDM, rectified-flow and TrigFlow families, consistency models and MeanFlow as deltas
over any config (data and network kept).

configs/toy_edm.py, digits_edm.py, toy_rf.py and digits_rf.py apply them to the toy and
digits configs, so the families differ from VP / VE there in these keys only.
"""

import ml_collections


def _edm_heun(config: ml_collections.ConfigDict, eps: float) -> None:
  """EDM's deterministic Heun sampler: 18 steps on the rho = 7 grid, 35 NFE + denoising."""
  sampling = config.sampling
  sampling.method = "heun"
  sampling.num_steps = 18
  sampling.schedule = "edm"
  sampling.eps = eps


def edm(config: ml_collections.ConfigDict, *, sigma_data: float,
        p_mean: float = -1.2) -> ml_collections.ConfigDict:
  """EDM's preconditioning, loss (ln sigma ~ N(p_mean, 1.2^2), EDM's weighting) and sampler on
  EDM's process x = x_0 + sigma z: the VE SDE with sigma 0.002..80."""
  training = config.training
  training.sde = "vesde"
  training.time_distribution = "lognormal_sigma"
  training.p_mean = p_mean
  training.p_std = 1.2
  training.weighting = "edm"
  model = config.model
  model.parameterization = "edm"
  model.sigma_data = sigma_data
  model.sigma_min = 0.002
  model.sigma_max = 80.0
  _edm_heun(config, eps=1e-5)
  return config


def rectified_flow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """x_t = (1 - t) x_0 + t z, velocity prediction, flow matching at logit-normal times,
  sampled with EDM's Heun sampler."""
  training = config.training
  training.sde = "rectified_flow"
  training.time_distribution = "logit_normal"
  training.weighting = "velocity"
  config.model.parameterization = "velocity"
  _edm_heun(config, eps=1e-3)
  return config


def trigflow(config: ml_collections.ConfigDict, *, sigma_data: float,
             p_mean: float = -1.0) -> ml_collections.ConfigDict:
  """TrigFlow (Lu & Song 2024): x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), the network
  sigma_d F(x_t / sigma_d, t) predicting the velocity, the sCM paper's diffusion loss
  |sigma_d F - (cos(t) z - sin(t) x_0)|^2 (weighting 'velocity') at
  ln(sigma_d tan t) ~ N(p_mean, 1.4^2) (the paper's CIFAR-10 p_mean = -1.0), sampled with
  EDM's Heun sampler."""
  training = config.training
  training.sde = "trigflow"
  training.time_distribution = "lognormal_sigma"
  training.p_mean = p_mean
  training.p_std = 1.4
  training.weighting = "velocity"
  config.model.parameterization = "trigflow"
  config.model.sigma_data = sigma_data
  _edm_heun(config, eps=1e-3)
  return config


def consistency(config: ml_collections.ConfigDict, *, objective: str, sigma_data: float,
                p_mean: float = -1.1) -> ml_collections.ConfigDict:
  """Discrete consistency training (training.objective 'ict' or 'ect') of the 'consistency'
  parameterization on EDM's process (sigma 0.002..80, rho 7), ln sigma ~ N(p_mean, 2^2) (iCT
  and ECT: -1.1 for sigma_data 0.5), the pseudo-Huber metric with iCT's c = 0.00054
  sqrt(dim) scaled by sigma_data / 0.5 (the metric's scale is the data's), the consistency
  sampler. iCT: weighting 1 / (sigma_{i+1} - sigma_i) over the curriculum's grid; ECT: the
  same form 1 / (t - r), and the toy and digits runs start from an EDM run."""
  training = config.training
  training.sde = "vesde"
  training.continuous = True
  training.objective = objective
  training.p_mean = p_mean
  training.p_std = 2.0
  training.ct_metric = "pseudo_huber"
  training.ct_huber_c = 0.00054 * sigma_data / 0.5
  training.ct_weighting = "ict"
  training.ct_rho = 7.0
  model = config.model
  model.parameterization = "consistency"
  model.sigma_data = sigma_data
  model.sigma_min = 0.002
  model.sigma_max = 80.0
  config.sampling.method = "consistency"
  config.sampling.num_steps = 1
  config.eval.enable_bpd = False  # the likelihood integrates a true score
  return config


def meanflow(config: ml_collections.ConfigDict, *, ratio: float = 0.25, power: float = 1.0,
             logit_mean: float = -0.4, logit_std: float = 1.0) -> ml_collections.ConfigDict:
  """MeanFlow (Geng et al. 2025) on the rectified-flow path: a network with a second time
  input learns the average velocity u(z_t, r, t) (logit-normal times, r != t on a share
  `ratio` of the batch, the adaptive weight 1 / (error + 1e-3)^power), sampled in
  sampling.num_steps jumps (1)."""
  training = config.training
  training.sde = "rectified_flow"
  training.objective = "meanflow"
  training.time_distribution = "logit_normal"
  training.logit_mean = logit_mean
  training.logit_std = logit_std
  training.meanflow_ratio = ratio
  training.meanflow_power = power
  training.meanflow_c = 1e-3
  config.model.second_time = True
  config.sampling.method = "meanflow"
  config.sampling.num_steps = 1
  config.eval.enable_bpd = False  # the likelihood integrates a score; this network gives u
  return config


def sct(config: ml_collections.ConfigDict, *, sigma_data: float, p_mean: float,
        warmup_steps: int) -> ml_collections.ConfigDict:
  """Continuous-time consistency training (sCT, Lu & Song 2024) on TrigFlow: the sCM
  objective with ln(sigma_d tan t) ~ N(p_mean, 1.4^2), the tangent warm-up over warmup_steps,
  normalization c = 0.1, the adaptive weighting, the paper's time label c_noise(t) = t;
  sampled by the consistency sampler in sampling.num_steps steps (1)."""
  config = trigflow(config, sigma_data=sigma_data, p_mean=p_mean)
  training = config.training
  training.objective = "sct"
  training.scm_p_mean = p_mean
  training.scm_p_std = 1.4
  training.scm_warmup_steps = warmup_steps
  training.scm_tangent_c = 0.1
  training.scm_adaptive_weighting = True
  config.model.trigflow_label_scale = 1.0
  config.sampling.method = "consistency"
  config.sampling.num_steps = 1
  config.eval.enable_bpd = False  # the likelihood integrates a score; this network gives f
  return config


def edm2_network(config: ml_collections.ConfigDict, **arch) -> ml_collections.ConfigDict:
  """EDM2's magnitude-preserving U-Net (model.name 'edm2_unet', models/edm2.py) in place of the
  config's network (its architecture keys removed), with EDM2's optimizer: Adam with betas
  (0.9, 0.99), eps 1e-8, no clipping, the rate ramped up over optim.lr_rampup_kimg images
  and decayed as 1 / sqrt(max(step / optim.ref_batches, 1)), forced weight normalization
  after each update (chained by the optimizer builder for this network)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  model = config.model
  generic = set(default.get_config().model.keys())
  for key in [k for k in model.keys() if k not in generic]:
    del model[key]
  model.name = "edm2_unet"
  for key, value in arch.items():
    model[key] = value
  optim = config.optim
  optim.optimizer = "Adam"
  optim.beta1 = 0.9
  optim.beta2 = 0.99
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.grad_clip = 0.0
  optim.warmup = 0
  optim.lr_decay = "inverse_sqrt"
  return config


def edm2(config: ml_collections.ConfigDict, *, sigma_data: float, p_mean: float,
         p_std: float) -> ml_collections.ConfigDict:
  """EDM2's loss on EDM's process and preconditioning (edm() above): ln sigma ~ N(p_mean,
  p_std^2), EDM's weighting divided by the learned uncertainty e^u(sigma), plus u(sigma)
  (training.objective 'edm2'), summed over dimensions; the network must be EDM2's
  (edm2_network)."""
  config = edm(config, sigma_data=sigma_data, p_mean=p_mean)
  training = config.training
  training.objective = "edm2"
  training.p_std = p_std
  training.continuous = True
  training.reduce_mean = False
  return config


def edm2_imagenet(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """One of EDM2's ImageNet presets (train_edm2.py, models.edm2.PRESETS): 'img512-*' on the
  64x64x4 latents of Stable Diffusion's VAE (data.dataset 'latents', encoded from [0, 1] pixels
  and normalized per channel as EDM2 does: data.vae_centered, data.latent_scale and
  data.latent_shift), 'img64-*' on 64x64x3 pixels; class-conditional (1000 classes), batch 2048,
  the preset's channels, dropout, P_mean / P_std, reference rate and decay, ramp-up over 10M
  images, and its duration in images as training.n_iters = duration / batch; post-hoc EMA
  profiles sigma_rel 0.05 and 0.10 (EDM2's), fp32 master weights with bfloat16 compute."""
  from score_jax.models import edm2 as edm2_lib  # pylint: disable=g-import-not-at-top
  p = edm2_lib.preset(preset)
  latent = preset.startswith("img512")
  config = edm2_network(config, model_channels=p.channels)
  config = edm2(config, sigma_data=0.5, p_mean=p.p_mean, p_std=p.p_std)
  training = config.training
  training.batch_size = p.batch
  training.n_iters = p.duration // p.batch
  training.snapshot_freq = (8 << 20) // p.batch  # EDM2's snapshot_nimg, 8Mi images
  training.snapshot_freq_for_preemption = (2 << 20) // p.batch  # every 2Mi images
  training.phema_snapshot_freq = (8 << 20) // p.batch
  training.snapshot_sampling = False
  training.log_freq = 64  # EDM2's status_nimg 128Ki images
  training.class_dropout = 0.0  # EDM2 trains its guiding network separately
  data = config.data
  data.dataset = "latents" if latent else "images"  # data.path: the latents / ImageNet 64x64
  data.image_size = 64
  data.num_channels = 4 if latent else 3
  data.random_flip = False  # EDM2's training loop does not flip
  data.centered = True
  if latent:  # EDM2's StabilityVAEEncoder: [0, 1] pixels, latents whitened per channel
    from score_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
    data.latent_scale, data.latent_shift = latents_lib.edm2_norm()
    data.vae_centered = False
  model = config.model
  model.num_classes = 1000
  model.dropout = p.dropout
  model.dtype = "bfloat16"
  model.phema_sigma_rels = (0.05, 0.10)
  model.ema_rate = 0.9999
  model.ema_warmup = False
  optim = config.optim
  optim.lr = p.lr
  optim.ref_batches = p.decay
  optim.lr_rampup_kimg = 10_000.0  # EDM2's rampup_Mimg = 10
  config.sampling.num_steps = 31  # + the final denoising: EDM2's 32 levels, 63 NFE
  config.sampling.batch_size = 64
  config.eval.batch_size = 256
  return config
