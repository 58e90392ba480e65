"""EDM2 img64-l (train_edm2.py preset edm2-img64-l): 777,492,325 parameters.

  python main.py --config=configs/edm2_img64_l.py --workdir=runs/edm2_img64_l --mode=train \\
      --config.data.path=/data/imagenet64

ImageNet 64x64 pixels (data.dataset = 'images'; data.path: a folder of class subfolders, EDM's
dataset_tool .zip or an .npz of uint8 images), class-conditional (1000 classes). EDM2's
magnitude-preserving U-Net (models/edm2.py) with 320 channels, dropout 0.1, EDM2's loss at ln
sigma ~ N(-0.8, 1.6^2), Adam (0.9, 0.99) at 0.008 ramped up over 10M images and decayed as 1 /
sqrt(step / 35000), batch 2048 for 1024 Mi images (524,288 steps), bfloat16 compute, post-hoc
EMA profiles 0.05 and 0.10 (configs/_families.py `edm2_imagenet`). Not trained here: ImageNet
needs accelerators.
"""

import ml_collections

from configs import _families as families, default


def get_config() -> ml_collections.ConfigDict:
  return families.edm2_imagenet(default.get_config(), "img64-l")
