"""A small DiT on scikit-learn's 8x8 digits: configs/digits.py with the transformer.

  python main.py --config=configs/digits_dit.py --workdir=runs/digits_dit --mode=train

The data, VP SDE, loss, sampler and schedule of configs/digits.py; the network is a DiT
(models/dit.py) of width 64, 4 blocks, 4 heads, on 2x2 patches (16 tokens), without the
learned-variance channels (score_jax's losses do not train them): 328,260 parameters. With
--config.model.num_classes=10 (and --config.training.class_dropout=0.1) it is
class-conditional, as DiT.

Measured (3,000 steps on 2 shared CPU cores, ~3 steps/s; the network of commit 832b6b2):
training loss 0.09-0.10 at the end, as configs/digits.py's DDPM++, but FD@355 1.65 (the
held-out digits' floor 0.116; DDPM++ 0.370) and visibly noisier samples: on 16 tokens of 2x2
pixels, without convolutions, the fine detail of 8x8 digits is learned more slowly. Not tuned.
"""

import ml_collections

from configs import default, digits


def get_config() -> ml_collections.ConfigDict:
  config = digits.get_config()
  model = config.model
  generic = set(default.get_config().model.keys())
  for key in [k for k in model.keys() if k not in generic]:  # DDPM++'s architecture keys
    del model[key]
  model.name = "dit"
  model.dit_size = "S"
  model.hidden_size = 64
  model.depth = 4
  model.num_heads = 4
  model.patch_size = 2
  model.learn_sigma = False
  return config
