"""Writes tests/data/dinov2/ with facebookresearch/dinov2's and NVlabs/edm2's own code (torch,
outside the project).

    /work/venvs/dit/bin/python tests/data/make_dinov2_fixture.py /path/to/dinov2 /path/to/edm2

1. vitl14_shapes.json: the name -> shape of every tensor in the state dict of the ViT-L/14
   that `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` builds (dinov2's
   hub/backbones.py `dinov2_vitl14(pretrained=False)`, on torch's meta device: no memory, no
   download). The published dinov2_vitl14_pretrain.pth holds exactly these tensors.
2. vit_tiny.pth: a tiny ViT built by the same hub function (`_make_dinov2_model`, with a
   'vit_tiny' registered beside dinov2's `vit_large`: its code, smaller widths embed_dim 16,
   depth 2, 2 heads of 8); everything else as ViT-L/14: patch 14, MLP ratio 4, LayerScale,
   the 518 px = 37 x 37 position table that dinov2 interpolates to 16 x 16 at 224 px, with its
   0.1 offset), random weights everywhere (dinov2 starts LayerScale at a constant, biases and
   the mask token at 0, LayerNorm at the identity, the class token near 0), saved as the hub
   file is: torch.save(model.state_dict()).
3. features.npz: fixed uint8 images, NHWC (images_32: 3 random 32 x 32 images, upsampled to
   224; images_512: 2 images of 512 x 512, random 64 x 64 images repeated 8 x 8, downsampled
   to 224 with antialiasing) and their features by EDM2's calculate_metrics.DINOv2Detector
   __call__ (its default resize_mode='torch': bicubic antialiased resize to 224, x / 255,
   ImageNet mean / std, the model's output = the class token after the final norm), run on
   the tiny ViT in place of the downloaded ViT-L/14; pos_embed_224: the tiny ViT's
   interpolate_pos_encoding at 224 x 224 [1, 257, 16].

EDM2's dnnlib imports `requests` (for downloads only); a stub module stands in for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import types

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dinov2")
TINY = dict(embed_dim=16, depth=2, num_heads=2)
SEED = 20240614


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _commit(path: str) -> str:
  return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                        text=True).stdout.strip() or "unknown"


def main() -> None:
  dinov2_dir, edm2_dir = (os.path.abspath(p) for p in sys.argv[1:3])
  sys.path[:0] = [dinov2_dir, edm2_dir]
  sys.modules.setdefault("requests", types.ModuleType("requests"))
  import torch
  from dinov2.hub.backbones import _make_dinov2_model, dinov2_vitl14  # facebookresearch/dinov2
  from dinov2.models import vision_transformer as vits
  import calculate_metrics  # NVlabs/edm2

  with torch.device("meta"):
    large = dinov2_vitl14(pretrained=False)
  shapes = {k: list(v.shape) for k, v in large.state_dict().items()}

  # vit_large's own code with smaller widths, registered beside it for the hub function.
  vits.vit_tiny = lambda **kw: vits.DinoVisionTransformer(
      **TINY, mlp_ratio=4, block_fn=vits.partial(vits.Block, attn_class=vits.MemEffAttention),
      **kw)
  torch.manual_seed(SEED)
  model = _make_dinov2_model(arch_name="vit_tiny", pretrained=False, init_values=0.5).eval()
  gen = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      fan_in = p.shape[1] if p.ndim == 2 else 1
      if name.endswith("proj.weight") and p.ndim == 4:  # patch embedding [D, 3, 14, 14]
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
      elif name in ("cls_token", "pos_embed", "mask_token"):
        p.copy_(torch.randn(p.shape, generator=gen))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("gamma"):  # LayerScale around its init value 0.5
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:  # Linear weights [out, in]; qkv larger, for attention far from uniform
        gain = 2.0 if "qkv" in name else 1.0
        p.copy_(gain * torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))

  os.makedirs(OUT, exist_ok=True)
  pth = os.path.join(OUT, "vit_tiny.pth")
  torch.save(model.state_dict(), pth)

  rng = np.random.default_rng(SEED)
  images_32 = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  images_512 = np.repeat(np.repeat(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8), 8, 1),
                         8, 2)
  detector = calculate_metrics.DINOv2Detector.__new__(calculate_metrics.DINOv2Detector)
  detector.feature_dim, detector.resize_mode, detector.model = TINY["embed_dim"], "torch", model
  with torch.no_grad():
    feats = {f"features_{k}": detector(torch.from_numpy(v).permute(0, 3, 1, 2)).numpy()
             for k, v in (("32", images_32), ("512", images_512))}
    tokens = torch.zeros(1, 257, TINY["embed_dim"])
    pos_224 = model.interpolate_pos_encoding(tokens, 224, 224).numpy()
  npz = os.path.join(OUT, "features.npz")
  np.savez_compressed(npz, images_32=images_32, images_512=images_512, pos_embed_224=pos_224,
                      **feats)
  with open(os.path.join(OUT, "vitl14_shapes.json"), "w") as f:  # one tensor a line
    f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
            + "\n}\n")
  manifest = {
      "dinov2": {"repository": "facebookresearch/dinov2", "commit": _commit(dinov2_dir)},
      "edm2": {"repository": "NVlabs/edm2", "commit": _commit(edm2_dir)},
      "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
      "seed": SEED, "tiny": {**TINY, "init_values": 0.5, "img_size": 518, "patch_size": 14},
      "tiny_parameters": sum(p.numel() for p in model.parameters()),
      "vitl14_parameters": sum(p.numel() for p in large.parameters()),
      "files": {os.path.basename(p): {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
                for p in (pth, npz)},
  }
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
  main()
