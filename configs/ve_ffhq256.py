"""NCSN++ cont. (VE SDE) on FFHQ 256x256: 65.57M parameters, sigma_max 348, N = 2000.

The 256 px NCSN++: 7 resolutions, 2 blocks each, output-skip and
input-skip pyramids, no dropout; batch 64, snr 0.075.
"""

import ml_collections

from configs import ve_cifar


def get_config() -> ml_collections.ConfigDict:
  config = ve_cifar.get_config()

  training = config.training
  training.batch_size = 64
  training.n_iters = 2_400_001
  training.snapshot_freq_for_preemption = 5000

  config.sampling.snr = 0.075

  evaluate = config.eval
  evaluate.begin_ckpt = 50
  evaluate.end_ckpt = 96
  evaluate.batch_size = 512
  evaluate.enable_sampling = True

  data = config.data
  data.dataset = "ffhq"  # TFRecords folder given by data.data_dir
  data.image_size = 256

  model = config.model
  model.sigma_max = 348.0
  model.num_scales = 2000
  model.dropout = 0.0
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.progressive = "output_skip"
  model.progressive_input = "input_skip"
  return config
