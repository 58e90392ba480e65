"""Continuous-time consistency training (sCT; Lu & Song 2024) on scikit-learn's 8x8 digits:
configs/digits.py's data and small DDPM++, one- and two-step generation.

  python main.py --config=configs/digits_sct.py --workdir=runs/digits_sct --mode=train
  python main.py --config=runs/digits_sct/config.json --workdir=runs/digits_sct \
      --mode=sample --config.sampling.num_steps=2

TrigFlow with sigma_d = 0.75 (the centered digits' standard deviation, as
configs/digits_edm.py), the sCM objective (score_jax.scm) with the paper's P_std = 1.4 and
P_mean = -1.0 moved by ln(0.75 / 0.5) (the paper's -1.0 is for sigma_d = 0.5), tangent
normalization c = 0.1, the adaptive weighting, and a tangent warm-up over the first 1,000 of
the 3,000 steps (the paper warms up over 10k of its 400k). The network's time label is the
paper's c_noise(t) = t (model.trigflow_label_scale = 1) in digits.py's positional embedding:
the tangent differentiates the network in t, and a label of 636 t (the label range of the
diffusion configs) makes that derivative large and the one-step samples collapse.
"""

import math

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  return families.sct(digits.get_config(), sigma_data=0.75,
                      p_mean=-1.0 + math.log(0.75 / 0.5), warmup_steps=1000)
