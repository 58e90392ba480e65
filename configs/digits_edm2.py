"""EDM2 (Karras et al. 2024) on scikit-learn's 8x8 digits: configs/digits_edm.py's data,
process, sampler and training budget (3,000 steps of 128), with EDM2's magnitude-preserving
U-Net and training recipe.

  python main.py --config=configs/digits_edm2.py --workdir=runs/digits_edm2 --mode=train

The network (models/edm2.py): 32 channels, multipliers (1, 2, 2) (8x8, 4x4, 2x2), one block
per resolution, cosine attention at 4x4 (and in the 2x2 bottleneck's first block, as EDM2),
dropout 0.1, not class-conditional. EDM2's loss (training.objective 'edm2': EDM's weighting
divided by the learned uncertainty e^u(sigma), plus u(sigma)) at ln sigma ~ N(-1.2, 1.2^2)
as configs/digits_edm.py, sigma_data = 0.75 (the centered digits' standard deviation).
EDM2's optimizer: Adam betas (0.9, 0.99), no clipping, forced weight normalization; the rate
0.01 ramped up over 200 steps (25.6 kimg) and divided by sqrt(step / 1000) after 1,000 steps
(EDM2's 0.01 and inverse-square-root decay, over a shorter horizon). The EMA of
configs/digits.py (0.999 with warm-up), so the two runs' samples are averaged alike.
"""

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  config = families.edm2_network(
      digits.get_config(), model_channels=32, channel_mult=(1, 2, 2), num_blocks=1,
      attn_resolutions=(4,), channels_per_head=32)
  config = families.edm2(config, sigma_data=0.75, p_mean=-1.2, p_std=1.2)
  config.model.dropout = 0.1
  optim = config.optim
  optim.lr = 0.01
  optim.lr_rampup_kimg = 25.6  # 200 steps of 128
  optim.ref_batches = 1000
  return config
