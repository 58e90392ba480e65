"""EDM2 img64-xl (train_edm2.py preset edm2-img64-xl): 1,119,276,837 parameters.

  python main.py --config=configs/edm2_img64_xl.py --workdir=runs/edm2_img64_xl --mode=train \\
      --config.data.path=/data/imagenet64

ImageNet 64x64 pixels (data.dataset = 'images'; data.path: a folder of class subfolders, EDM's
dataset_tool .zip or an .npz of uint8 images), class-conditional (1000 classes). EDM2's
magnitude-preserving U-Net (models/edm2.py) with 384 channels, dropout 0.1, EDM2's loss at ln
sigma ~ N(-0.8, 1.6^2), Adam (0.9, 0.99) at 0.007 ramped up over 10M images and decayed as 1 /
sqrt(step / 35000), batch 2048 for 640 Mi images (327,680 steps), bfloat16 compute, post-hoc EMA
profiles 0.05 and 0.10 (configs/_families.py `edm2_imagenet`). Not trained here: ImageNet needs
accelerators.
"""

import ml_collections

from configs import _families as families, default


def get_config() -> ml_collections.ConfigDict:
  return families.edm2_imagenet(default.get_config(), "img64-xl")
