"""EDM on your own images: a small DDPM++ (SongUNet, 7.0M parameters) for small images.

  python main.py --config=configs/folder.py --workdir=runs/mine --mode=train \\
      --config.data.path=/data/my_images

data.path: a folder of images (one subfolder per class gives labels), EDM's
dataset_tool .zip or folder, or an .npz of uint8 images
(score_jax/data/image_files.py). Images are center-cropped to a square and
resized to data.image_size (32 here; 64 works with the same network:
--config.data.image_size=64); gray images: --config.data.num_channels=1.
Train on the class labels with --config.model.num_classes=K (the training
log names the K classes it found); training.class_dropout = 0.1 then also
trains the unconditional model that classifier-free guidance
(--config.sampling.guidance_weight) needs.

configs/edm_cifar_vp.py (EDM's preconditioning, loss and Heun sampler, 35
NFE) with a smaller network (64 channels, multipliers (1, 2, 2), 2 blocks),
EMA half-life 50 kimg, learning-rate ramp-up over the first 200 kimg, random
left-right flips. A few thousand images at 32 px: 50k steps at batch 64
(3.2 Mimg); for very small sets EDM's augmentation helps
(--config.data.augment_p=0.12 --config.model.augment_dim=9, see
configs/edm_cifar_vp.py).
"""

import ml_collections

from configs import edm_cifar_vp


def get_config() -> ml_collections.ConfigDict:
  config = edm_cifar_vp.get_config()  # EDM, SongUNet (DDPM++), made small below

  training = config.training
  training.batch_size = 64
  training.n_iters = 50_000
  training.snapshot_freq = 5_000
  training.snapshot_freq_for_preemption = 1_000
  training.log_freq = 100
  training.eval_freq = 1_000
  training.class_dropout = 0.1  # read only by conditional models (model.num_classes > 0)

  data = config.data
  data.dataset = "images"
  data.path = ""  # required: --config.data.path=DIR (a folder, a dataset_tool .zip or an .npz)
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.augment_p = 0.0

  model = config.model
  model.ema_halflife_kimg = 50.0
  model.dropout = 0.1
  model.nf = 64
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 2
  model.augment_dim = 0

  config.optim.lr_rampup_kimg = 200.0

  config.sampling.batch_size = 64
  config.eval.batch_size = 128
  config.eval.enable_sampling = True  # --mode=eval samples, then FID with eval.inception_path
  config.eval.num_samples = 10_000
  config.eval.quantization = "round"
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 10
  return config
