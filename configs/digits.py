"""scikit-learn's 8x8 digits with a small DDPM++: recognizable digits on a CPU.

  python main.py --config=configs/digits.py --workdir=runs/digits --mode=train

The 1,797 digits ship inside scikit-learn (nothing to download); 16 gray
levels rescaled to 0..255. VP SDE, continuous DSM, class labels kept so the
same config trains a class-conditional model with --config.model.num_classes=10
(and classifier-free guidance with --config.training.class_dropout=0.1).
"""

import ml_collections

from configs import vp_cifar


def get_config() -> ml_collections.ConfigDict:
  config = vp_cifar.get_config()  # DDPM++ cont. on the VP SDE, made small below
  config.seed = 0

  training = config.training
  training.batch_size = 128
  training.n_iters = 3000
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.log_freq = 100
  training.eval_freq = 500

  config.sampling.batch_size = 64

  data = config.data
  data.dataset = "digits"
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False

  model = config.model
  model.ema_rate = 0.999
  model.ema_warmup = True  # a 400-step run samples from its EMA, not from its initialization
  model.nf = 16
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.dropout = 0.1
  model.num_scales = 500

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 200
  optim.grad_clip = 1.0

  config.eval.batch_size = 256
  config.eval.num_samples = 1000
  config.eval.quantization = "round"  # unbiased levels for the digits FD (its floor is real digits)
  config.eval.enable_sampling = True  # samples.png and the digits FD (score_jax/metrics/digits.py)
  config.eval.begin_ckpt = 1  # --mode=eval: checkpoints 1..3 = steps 1000..3000
  config.eval.end_ckpt = 3
  return config
