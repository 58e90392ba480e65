"""Continuous-time consistency training (sCT; Lu & Song 2024) on the 2-D toy data:
configs/toy_trigflow.py's TrigFlow path, data and MLP, one- and two-step generation.

  python main.py --config=configs/toy_sct.py --workdir=runs/toy_sct --mode=train
  python main.py --config=runs/toy_sct/config.json --workdir=runs/toy_sct --mode=sample \
      --config.sampling.num_steps=2

The network sigma_d F(x_t / sigma_d, t) is trained with the sCM objective (score_jax.scm):
the tangent g of the consistency function from one JVP, normalized (c = 0.1), warmed up over
training.scm_warmup_steps. sigma_d = 2.86 and the time distribution's P_mean are
toy_trigflow.py's (the paper's -1.0 moved by ln(2.86 / 0.5)); P_std = 1.4 is the paper's.
Sampled by the consistency sampler in sampling.num_steps steps.

Without the paper's adaptive weighting (training.scm_adaptive_weighting = False): it divides
each time's loss by the learned mean of ||F - F^- - g||^2 / D, which at theta^- = theta is
||g||^2 / (||g|| + c)^2 / D. For images ||g|| sums over thousands of entries and stays far
above c, so that mean is ~1 / D at every t; in two dimensions ||g|| is comparable to c and
falls where the model is already consistent (small t), and the weighting then puts the
training there. Measured (one device, EMA, 8,192 samples; off-mode share at 1 / 2 steps):
6,000 steps 6.0% / 4.8% with the weighting, 4.8% / 4.1% without; sCD (4,000 steps), whose
tangent has no sampling noise, 37% / 38% with it and 7.6% / 7.6% without (configs/toy_scd.py).

The network's time label is the paper's c_noise(t) = t (model.trigflow_label_scale = 1) in
toy.py's positional embedding. Shipped: 32,000 steps with the learning rate decayed to 0 by
a cosine (optim.lr_decay). Measured (as above; largest mode-weight error, share off every
mode; the data's off-mode share is 1.1%, the few-step check allows 2.2%): 1 step 0.023,
1.8%; 2 steps 0.012, 1.8% (the slow test's run, 1,025 s on 2 CPU cores). Two trainings of
24,000 steps with the same settings (through main.py and through the slow test; they do not
repeat bit for bit here and ended apart): 0.014, 1.6% / 0.012, 1.5% and 0.023, 2.0% / 0.017,
1.7%. With the diffusion configs' label 636 t (and Fourier features of its log) the training
gave 0.107, 82% and 0.087, 63% at 2,000 steps, and at 6,000 steps its one-step samples
collapsed onto the data mean (f(x_t, t) the posterior mean E[x_0 | x_t]): the tangent
differentiates the network in t, and a fast-varying time embedding makes that derivative
large; a label of 100 t: 54% / 42% at 6,000 steps. Without tangent normalization
(training.scm_tangent_c = 1e3) the samples collapse.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  config = families.sct(toy.get_config(), sigma_data=2.86, p_mean=0.74, warmup_steps=500)
  config.training.n_iters = 32_000
  config.training.scm_adaptive_weighting = False
  config.optim.lr_decay = "cosine"
  return config
