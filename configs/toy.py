"""2-D toy data with an MLP score model: the embedded default (CPU, minutes).

  python main.py --config=configs/toy.py --workdir=runs/toy --mode=train

Data: config.data.toy_name in {'gaussian_mixture', 'checkerboard',
'swiss_roll', 'moons'} (generated, nothing to download). VP SDE, continuous
DSM; snapshots write a scatter plot of samples beside the data.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.seed = 0

  training = config.training
  training.sde = "vpsde"
  training.continuous = True
  training.reduce_mean = True
  training.batch_size = 512
  training.n_iters = 4000
  training.snapshot_freq = 2000
  training.snapshot_freq_for_preemption = 500
  training.log_freq = 100
  training.eval_freq = 500
  training.eps = 1e-5

  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.batch_size = 2048
  sampling.eps = 1e-3

  data = config.data
  data.dataset = "toy"
  data.toy_name = "gaussian_mixture"
  data.image_size = 0
  data.num_channels = 0
  data.random_flip = False
  data.centered = False
  data.uniform_dequantization = False

  model = config.model
  model.name = "mlp"
  model.hidden_sizes = (256, 256, 256)
  model.nf = 64
  model.embedding_type = "positional"
  model.dropout = 0.0
  model.scale_by_sigma = False
  model.ema_rate = 0.999
  model.ema_warmup = True  # a 400-step run samples from its EMA, not from its initialization
  model.num_scales = 500  # PC sampler steps

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 100
  optim.grad_clip = 1.0

  config.eval.batch_size = 1024
  config.eval.num_samples = 8192
  config.eval.begin_ckpt = 1  # --mode=eval: checkpoints 1..2 = steps 2000..4000
  config.eval.end_ckpt = 2
  config.eval.enable_sampling = True  # samples.png: a scatter beside the data
  config.eval.enable_bpd = True  # negative log-likelihood, nats per dimension
  config.eval.bpd_passes = 1
  return config
