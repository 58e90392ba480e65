"""EDM (Karras et al. 2022) on scikit-learn's 8x8 digits with EDM's own U-Net (SongUNet, its
DDPM++): configs/digits_edm.py's process, loss, sampler and budget (3,000 steps of 128), the
network `model.name = 'song_unet'` at the size of digits.py's DDPM++ (nf 16, multipliers
(1, 2, 2), one block per resolution, attention at 4x4, dropout 0.1) without EDM's augmentation
labels. The SongUNet column beside configs/digits_edm2.py's MP U-Net in docs/edm2.md.

  python main.py --config=configs/digits_edm_song_unet.py --workdir=runs/digits_edm_song_unet \
      --mode=train
"""

import ml_collections

from configs import default, digits_edm


def get_config() -> ml_collections.ConfigDict:
  config = digits_edm.get_config()
  model = config.model
  generic = set(default.get_config().model.keys())
  for key in [k for k in model.keys() if k not in generic]:  # DDPM++'s own keys
    if key not in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"):
      del model[key]
  model.name = "song_unet"
  model.embedding_type = "positional"
  model.augment_dim = 0  # no augmentation, so no augmentation-label embedding
  return config
