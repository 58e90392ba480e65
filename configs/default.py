"""Default configuration: the CIFAR-10 settings of the score SDE paper.

Every other config imports `get_config()` from here and changes only its
deltas. Key names follow the 2021 reference code where it has one, so
existing configs port by renaming `evaluate` to `eval`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Training.
  config.training = training = ml_collections.ConfigDict()
  training.sde = "vpsde"  # vpsde | subvpsde | vesde | rectified_flow | trigflow
  training.continuous = True
  training.reduce_mean = False
  training.likelihood_weighting = False
  training.importance_weighting = False
  training.batch_size = 128
  # Gradient accumulation: the batch is processed as this many equal
  # micro-batches in one step (the same batch-mean gradient, less memory per
  # step; meant for accelerators, see docs/training.md for the CPU).
  training.microbatches = 1
  # How the train state lies on the devices (score_jax.run.sharding, docs/training.md):
  # 'replicated' (data parallel: a whole copy per device) or 'fsdp' (parameters, EMA and
  # optimizer state split over training.fsdp_size devices; 0: all devices).
  training.sharding = "replicated"
  training.fsdp_size = 0
  training.n_iters = 1_300_001
  training.snapshot_freq = 50_000
  training.snapshot_freq_for_preemption = 10_000
  training.snapshot_sampling = True
  training.phema_snapshot_freq = 10_000  # post-hoc EMA snapshots (model.phema_sigma_rels)
  training.log_freq = 50
  training.eval_freq = 100
  training.eps = 1e-5  # t ~ U(eps, T)
  training.class_dropout = 0.0  # label dropout for classifier-free guidance
  # Continuous DSM: the distribution of t and the weighting of |std s + z|^2
  # (score_jax.losses). uniform | lognormal_sigma (EDM: ln(std / alpha) ~
  # N(p_mean, p_std^2)) | logit_normal (flow matching: logit t ~ N(logit_mean,
  # logit_std^2)); weighting default (std^2) | edm | velocity (flow matching).
  training.time_distribution = "uniform"
  training.p_mean = -1.2
  training.p_std = 1.2
  training.logit_mean = 0.0
  training.logit_std = 1.0
  training.weighting = "default"
  # The objective: denoising (the losses above) | edm2 (EDM2's loss: ln sigma ~ N(p_mean,
  # p_std^2) untruncated, EDM's weighting, divided by the learned uncertainty e^u(sigma) plus
  # u(sigma); model.name = 'edm2_unet', parameterization 'edm', vesde) | meanflow
  # (score_jax.meanflow: an average-velocity network u(z, r, t), model.second_time = True,
  # on rectified_flow with time_distribution logit_normal; a share meanflow_ratio of the
  # batch has r < t, the loss is weighted by 1 / (error + meanflow_c)^meanflow_power).
  training.objective = "denoising"
  training.meanflow_ratio = 0.25
  training.meanflow_power = 1.0
  training.meanflow_c = 1e-3
  # True: d/dt u moves z along the network's own sg(u(z, t, t)) instead of e - x.
  training.meanflow_model_tangent = False
  # A trained diffusion run the objective learns from (distillation) or starts from: its
  # workdir (a score_jax run or a converted checkpoint, as load_run opens), its checkpoint
  # (0: the newest), and whether the network starts from its EMA weights.
  training.teacher_workdir = ""
  training.teacher_step = 0
  training.init_from_teacher = False
  # Continuous-time consistency models (score_jax.scm; objectives sct, and scd with a
  # teacher): ln(sigma_d tan t) ~ N(scm_p_mean, scm_p_std^2), the tangent warm-up over
  # scm_warmup_steps steps (0: none), the tangent normalization g / (||g|| + scm_tangent_c),
  # and the learned adaptive weighting (a log-variance head beside the network).
  training.scm_p_mean = -1.0
  training.scm_p_std = 1.4
  training.scm_warmup_steps = 10_000
  training.scm_tangent_c = 0.1
  training.scm_adaptive_weighting = True
  # Discrete consistency training (score_jax.consistency), objective ict | ect, on vesde with
  # model.parameterization = consistency; ln sigma ~ N(p_mean, p_std^2) as above (iCT, ECT:
  # -1.1, 2.0). ct_metric: pseudo_huber (sqrt(||d||^2 + c^2) - c, c = ct_huber_c
  # sqrt(dim); ECT's c = 0 is the norm) | l2 (the mean of squares); ct_weighting: ict
  # (1 / (t - s)) | uniform | snr | snrp1 | truncated_snr. iCT: Karras' grid (ct_rho) with
  # N(k) = min(ct_s0 2^floor(k / K'), ct_s1) + 1 levels over the n_iters steps. ECT:
  # r = t (1 - ct_ect_q^-ceil(k / ct_ect_double) (1 + ct_ect_k sigmoid(-ct_ect_b t))).
  training.ct_metric = "pseudo_huber"
  training.ct_huber_c = 0.00054
  training.ct_weighting = "ict"
  training.ct_rho = 7.0
  training.ct_s0 = 10
  training.ct_s1 = 1280
  training.ct_ect_q = 2.0
  training.ct_ect_double = 25000
  training.ct_ect_k = 8.0
  training.ct_ect_b = 1.0

  # Sampling.
  config.sampling = sampling = ml_collections.ConfigDict()
  # pc | ode | ddim | heun | dpm_solver | unipc | meanflow | consistency
  sampling.method = "pc"
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.snr = 0.16
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.num_steps = 0  # fast solvers: score evaluations; 0 = sampler default
  sampling.schedule = ""  # fast solvers: 'uniform_t' | 'logSNR' | 'edm'; '' = sampler default
  # unipc also 'optimized': a grid fitted to the model (score_jax.samplers.time_grids), once per
  # checkpoint, on grid_batch_size latents in grid_iters Adam steps, kept in the workdir.
  sampling.eta = 0.0  # ddim: 0 deterministic, 1 ancestral-like
  sampling.order = 2  # dpm_solver: 2 or 3; unipc: 1, 2 or 3 (+1 with its corrector)
  sampling.unipc_variant = "bh2"  # unipc: B(h) = 1 - e^-h (bh2) or h (bh1)
  sampling.grid_batch_size = 256
  sampling.grid_iters = 200
  sampling.s_churn = 0.0  # heun: EDM stochasticity (0 = deterministic)
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.eps = 1e-3
  sampling.guidance_weight = 0.0
  # Guide only where sigma^ = std / alpha lies in [lo, hi] (Kynkaanniemi et al. 2024);
  # (0, 0): at every noise level.
  sampling.guidance_interval = (0.0, 0.0)
  # consistency: the noise levels sigma = std / alpha where steps 2..num_steps start
  # (decreasing); (): sigma_d tan(pi/2 sqrt(1 - k / n)), k = 1..n-1 (model.sigma_data).
  sampling.consistency_sigmas = ()
  sampling.batch_size = 64

  # Evaluation.
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50_000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"
  evaluate.bpd_passes = 5
  # Likelihood ODE (probability flow): trace estimator and solver tolerances.
  evaluate.hutchinson = "rademacher"  # rademacher | gaussian | exact
  evaluate.likelihood_rtol = 1e-5
  evaluate.likelihood_atol = 1e-5
  evaluate.likelihood_eps = 1e-5
  # Eval beside training: wait this long for a checkpoint not written yet.
  evaluate.wait_timeout_s = 86_400.0
  evaluate.poll_interval_s = 60.0
  # Samples -> uint8 for FID / IS / KID and the shards: 'truncate' is the
  # reference's np.clip(x * 255, 0, 255).astype(np.uint8), behind the paper's
  # FIDs; 'round' rounds to the nearest level, as the data were quantized.
  evaluate.quantization = "truncate"
  # FID / IS / KID: a converted FID Inception .npz (python -m score_jax.metrics.inception
  # convert ...); empty skips them. Dataset statistics are cached in stats_path
  # (empty: WORKDIR/eval/stats_<dataset>_<size>_<resize>.npz).
  evaluate.inception_path = ""
  evaluate.inception_resize = "tf1"  # tf1 (reference) | pytorch (pytorch-fid)
  evaluate.inception_precision = "highest"  # highest | high | default
  evaluate.inception_batch_size = 250
  evaluate.stats_path = ""
  evaluate.stats_num_images = 0  # 0: all training images (the protocol)
  evaluate.kid_dataset_features = 10_000  # dataset feature rows kept for KID
  # FD-DINOv2 (EDM2's fd_dinov2): a converted DINOv2 ViT-L/14 .npz (python -m
  # score_jax.convert.dinov2 dinov2_vitl14_pretrain.pth); empty: the converter's default
  # location if a file is there, else skipped. Dataset statistics are cached in
  # dinov2_stats_path (empty: WORKDIR/eval/stats_<dataset>_<size>_dinov2.npz).
  evaluate.dinov2_path = ""
  evaluate.dinov2_precision = "highest"  # highest | high | default
  evaluate.dinov2_batch_size = 250
  evaluate.dinov2_stats_path = ""

  # Sample mode (--mode=sample); the sampler itself is config.sampling.
  config.sample = sample = ml_collections.ConfigDict()
  sample.ckpt_step = -1  # checkpoint step to load; -1: the newest
  sample.num = 64
  sample.task = "generate"  # generate | inpaint | colorize | interpolate
  sample.images_path = ""  # .npz / .png / .jpg / folder: images to inpaint, colorize, interpolate
  # inpaint: the region to generate, {left,right,top,bottom}_half | center, or a mask
  # file (.png / .npz, nonzero = known pixel).
  sample.mask = "right_half"
  sample.class_label = -1  # class-conditional models: -1 cycles through the classes
  sample.interpolation_steps = 8
  sample.output_dir = ""  # empty: WORKDIR/sample
  # Autoguidance (Karras et al. 2024), sample and eval modes: guide with a weaker
  # run of the same SDE (an earlier checkpoint, a smaller network), weight
  # sampling.guidance_weight. Empty: off. guide_step -1: its newest checkpoint.
  sample.guide_workdir = ""
  sample.guide_step = -1

  # Data.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"
  data.data_dir = ""  # empty: the tfds default (~/tensorflow_datasets)
  # dataset 'images': your own folder of images (class subfolders -> labels), EDM dataset_tool
  # .zip / folder, or .npz (score_jax/data/image_files.py); configs/folder.py uses it.
  data.path = ""
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.toy_name = "gaussian_mixture"  # dataset 'toy': gaussian_mixture | checkerboard | swiss_roll | moons
  data.category = ""  # dataset 'lsun': bedroom | church_outdoor
  data.tfrecords_path = ""  # ffhq / celebahq: the TFRecord file or folder (else data.data_dir)
  # EDM's non-leaky augmentation (score_jax.data.augment), on the device in the train step:
  # each transform is applied with probability min(multiplier * augment_p, 1) and the
  # network (song_unet, ncsnpp, ddpmpp, ddpm; model.augment_dim = the label count) is
  # told which; 0 = off.
  data.augment_p = 0.0
  data.augment_xflip = 0.0
  data.augment_yflip = 0.0
  data.augment_rotate_int = 0.0  # quarter turns
  data.augment_translate_int = 0.0  # integer shifts up to 1/8 of the size
  data.augment_scale = 0.0  # isotropic, log2 std 0.2
  data.augment_rotate_frac = 0.0  # any angle
  data.augment_aniso = 0.0  # anisotropic, log2 std 0.2
  data.augment_translate_frac = 0.0  # std 1/8 of the size
  # dataset 'latents' (docs/latent.md): the model sees z = latent_scale * raw + latent_shift,
  # one value per latent channel (() : the VAE's scaling factor, no shift; EDM2's img512
  # networks: score_jax.data.latents.edm2_norm()). vae: the diffusers VAE folder that decodes
  # samples ('' : the one data.path's meta.json names; sampling needs no data.path then).
  # vae_centered: pixels enter and leave the VAE in [-1, 1] (True, latent diffusion) or in
  # [0, 1] (False, EDM2); the encode records it, training and decoding check it.
  data.latent_scale = ()
  data.latent_shift = ()
  data.vae = ""
  data.vae_centered = True

  # Model: the keys every network shares. The architecture keys are model.name's network's
  # constructor arguments (score_jax.models.network_arguments), whose defaults hold where a
  # config does not set them; the model configs set them, and a key of another network is an
  # error. dropout, embedding_type, num_classes and remat reach the networks that take them.
  config.model = model = ml_collections.ConfigDict()
  model.name = "ddpmpp"
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.dropout = 0.1
  model.embedding_type = "fourier"
  model.ema_rate = 0.9999
  # EMA warm-up: decay min(ema_rate, (1 + n) / (10 + n)) at the n-th update, as the PyTorch
  # reference's ExponentialMovingAverage(use_num_updates=True); off: the constant ema_rate
  # of the JAX reference. On in the toy and digits configs, whose short runs it makes usable.
  model.ema_warmup = False
  # EMA by half-life in images (EDM): > 0 replaces ema_rate by 0.5 ** (batch /
  # max(min(halflife_kimg * 1000, ramp-up ratio * images seen), 1e-8)); ratio 0:
  # no ramp-up.
  model.ema_halflife_kimg = 0.0
  model.ema_rampup_ratio = 0.05
  # Post-hoc EMA (EDM2, score_jax.run.phema): relative widths of the power-function
  # EMAs tracked beside ema_params, e.g. (0.05, 0.10); every
  # training.phema_snapshot_freq steps they are written to WORKDIR/phema, from
  # which `python -m score_jax.convert.phema` makes the EMA of any other width. () = off.
  model.phema_sigma_rels = ()
  model.num_classes = 0  # 0: unconditional
  model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  # Gradient checkpointing of the network's blocks (ncsnpp, ddpmpp, ddpm, dit): less
  # activation memory on GPU/TPU for ~1 extra forward pass (on CPU see
  # docs/training.md: XLA's CPU backend undoes it).
  model.remat = False
  # Network output -> score (score_jax.models.build.get_score_fn): default (noise
  # or score, the 2021 code) | edm (Karras et al. preconditioning, sigma_data) |
  # velocity (flow matching) | trigflow (TrigFlow's sigma_d F(x / sigma_d, t), with
  # training.sde = trigflow, whose sigma_d is model.sigma_data).
  model.parameterization = "default"
  model.sigma_data = 0.5
  # trigflow: the network's time label is trigflow_label_scale t; 999 / (pi / 2) = 636.0 maps
  # [0, pi/2] onto the other families' [0, 999] (diffusion training), 1.0 is the sCM paper's
  # c_noise(t) = t, which its consistency models need (a JVP in t through the embedding).
  model.trigflow_label_scale = 999.0 / (0.5 * 3.141592653589793)

  # Optimization.
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "Adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 5000
  optim.lr_rampup_kimg = 0.0  # > 0: lr * min(images seen / (1000 kimg), 1) (EDM; set warmup = 0)
  optim.grad_clip = 1.0
  # 'none': the rate stays at optim.lr after the ramp; 'cosine': times
  # (1 + cos(pi min(step / training.n_iters, 1))) / 2, down to 0 at the last step;
  # 'inverse_sqrt' (EDM2): times 1 / sqrt(max(step / optim.ref_batches, 1)).
  optim.lr_decay = "none"
  optim.ref_batches = 0  # steps at full rate before the inverse-sqrt decay (EDM2: 70000)
  # A non-finite loss or gradient: 'skip' leaves the state unchanged (the run stops at
  # the next log step); 'zero' (EDM) replaces NaN gradient entries by 0 and +-inf by
  # +-1e5 and takes the step.
  optim.nonfinite_grads = "skip"

  return config
