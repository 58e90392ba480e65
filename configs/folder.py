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

EDM's preconditioning, loss and Heun sampler (18 levels, 35 NFE), EMA
half-life 50 kimg, learning-rate ramp-up over the first 200 kimg, random
left-right flips. A few thousand images at 32 px: 50k steps at batch 64
(3.2 Mimg); for very small sets EDM's augmentation helps
(--config.data.augment_p=0.12 --config.model.augment_dim=9, see
configs/edm_cifar_vp.py).
"""

import ml_collections

from configs import _families as families, default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()

  training = config.training
  training.continuous = True
  training.reduce_mean = False  # EDM sums the loss over pixels
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
  data.centered = True  # EDM's data are in [-1, 1]
  data.random_flip = True

  model = config.model
  model.name = "song_unet"
  model.num_classes = 0
  model.ema_halflife_kimg = 50.0
  model.ema_rampup_ratio = 0.05
  model.dropout = 0.1
  model.nf = 64
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.channel_mult_emb = 4
  model.embedding_type = "positional"
  model.channel_mult_noise = 1
  model.encoder_type = "standard"
  model.decoder_type = "standard"
  model.resample_filter = (1, 1)
  model.augment_dim = 0

  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 1e-3
  optim.warmup = 0
  optim.lr_rampup_kimg = 200.0
  optim.grad_clip = 0.0
  optim.nonfinite_grads = "zero"

  config.sampling.batch_size = 64
  config.eval.batch_size = 128
  config.eval.num_samples = 10_000
  config.eval.quantization = "round"
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 10
  return families.edm(config, sigma_data=0.5)
