"""Continuous-time consistency training (sCT; Lu & Song 2024) on the 2-D toy data:
configs/toy_trigflow.py's TrigFlow path, data and MLP, one- and two-step generation.

  python main.py --config=configs/toy_sct.py --workdir=runs/toy_sct --mode=train
  python main.py --config=runs/toy_sct/config.json --workdir=runs/toy_sct --mode=sample \
      --config.sampling.num_steps=2

The network sigma_d F(x_t / sigma_d, t) is trained with the sCM objective (score_jax.scm):
the tangent g of the consistency function from one JVP, normalized (c = 0.1), warmed up over
training.scm_warmup_steps, with the learned adaptive weighting. sigma_d = 2.86 and the time
distribution's P_mean are toy_trigflow.py's (the paper's -1.0 moved by ln(2.86 / 0.5));
P_std = 1.4 is the paper's. Sampled by the consistency sampler in sampling.num_steps steps.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  config = families.trigflow(toy.get_config(), sigma_data=2.86, p_mean=0.74)
  training = config.training
  training.objective = "sct"
  training.scm_p_mean = 0.74
  training.scm_p_std = 1.4
  training.scm_warmup_steps = 500
  training.scm_tangent_c = 0.1
  training.scm_adaptive_weighting = True
  config.sampling.method = "consistency"
  config.sampling.num_steps = 1
  config.eval.enable_bpd = False  # the likelihood integrates a score; this network gives f
  return config
