"""Writes tests/data/sit/ with willisma/SiT's own code (torch, outside the project).

    python -m venv /work/venvs/dit
    /work/venvs/dit/bin/pip install torch==2.13.0 timm numpy torchdiffeq scipy
    /work/venvs/dit/bin/python tests/data/make_sit_fixture.py /path/to/SiT

1. A tiny SiT (8x8x4 input, patch 2, width 32, 2 blocks, 4 heads, 10 classes, learn_sigma as
   train.py builds it) registered beside theirs as 'SiT-T/2', with random weights everywhere
   (the authors zero-initialize the adaLN modulations, the final layer and all biases, which
   would make the output 0), one AdamW step on a squared-output loss and one EMA update as
   train.py's update_ema, saved as train.py saves a checkpoint: torch.save({"model", "ema",
   "opt", "args"}) with train.py's arguments (path_type 'Linear', prediction 'velocity').
2. Their networks' outputs on fixed x, t, y (NHWC; their t in [0, 1], 0 noise, 1 data).
3. Their transport (transport.create_transport('Linear', 'velocity') and its Sampler) with the
   EMA network at times 0.1 .. 0.9: the probability-flow drift (Sampler.drift, what their ODE
   sampler integrates), the score (Sampler.score, get_score_from_velocity), the drift and
   diffusion of their SDE sampler with diffusion_form 'SBDM', and two Euler steps of their
   ODE integrator (transport.integrators.ode, torchdiffeq's euler) from t = 0.1 to 0.5.

timm imports torchvision for layers SiT does not use, and the torchvision wheel for torch 2.13
does not load with the CPU build of torch; an import hook below gives timm empty torchvision
modules. SiT's layers (timm's PatchEmbed, Attention, Mlp) are timm's own code.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import platform
import subprocess
import sys
import types

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sit")
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
            num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
SEED = 20240116


class _Absent:
  """A torchvision class SiT never builds."""

  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is not available here")


class _AbsentMeta(type):

  def __getattr__(cls, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return f"{cls.__name__}.{attr}"  # enum members (InterpolationMode.NEAREST) as names


def _module_getattr(attr):
  if attr.startswith("__"):
    raise AttributeError(attr)
  return _AbsentMeta(attr, (_Absent,), {})


class _NoTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Every `torchvision[.x]` import gives an empty package whose names are inert classes."""

  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []
    module.__getattr__ = _module_getattr
    return module

  def exec_module(self, module):
    pass


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
  sit_dir = os.path.abspath(sys.argv[1])
  sys.meta_path.insert(0, _NoTorchvision())
  sys.path.insert(0, sit_dir)
  import timm
  import torch
  import torchdiffeq
  from models import SiT, SiT_models  # willisma/SiT models.py
  from transport import Sampler, create_transport  # willisma/SiT transport/
  from transport.integrators import ode

  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=sit_dir, capture_output=True,
                          text=True).stdout.strip() or "unknown"

  SiT_models["SiT-T/2"] = lambda **kw: SiT(depth=TINY["depth"], hidden_size=TINY["hidden_size"],
                                           patch_size=TINY["patch_size"],
                                           num_heads=TINY["num_heads"], **kw)
  torch.manual_seed(SEED)
  model = SiT_models["SiT-T/2"](input_size=TINY["input_size"], in_channels=TINY["in_channels"],
                                num_classes=TINY["num_classes"], learn_sigma=TINY["learn_sigma"],
                                class_dropout_prob=TINY["class_dropout_prob"])
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "pos_embed":
        continue  # fixed sin-cos
      if p.ndim == 1:
        p.normal_(0.0, 0.3)  # biases (all zero at their init)
      elif "embedding_table" in name:
        p.normal_(0.0, 1.0)
      else:  # Linear / conv kernels, xavier-uniform over [out, in...]
        torch.nn.init.xavier_uniform_(p.view(p.shape[0], -1))
  ema = copy.deepcopy(model).requires_grad_(False)  # as train.py
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)  # as train.py
  gen = torch.Generator().manual_seed(SEED + 1)
  c, s = TINY["in_channels"], TINY["input_size"]
  xb = torch.randn(4, c, s, s, generator=gen)
  model.train()
  tb, yb = torch.tensor([0.05, 0.3, 0.6, 0.95]), torch.tensor([1, 2, 3, 4])
  loss = model(xb, tb, yb).square().mean()
  opt.zero_grad()
  loss.backward()
  opt.step()
  with torch.no_grad():  # train.py's update_ema with decay 0.5 (not 0.9999: visible here)
    ema_params, model_params = dict(ema.named_parameters()), dict(model.named_parameters())
    for name, param in model_params.items():
      ema_params[name].mul_(0.5).add_(param.data, alpha=0.5)
  model.eval()
  ema.eval()

  args = argparse.Namespace(data_path="", results_dir="results", model="SiT-T/2",
                            image_size=8 * TINY["input_size"], num_classes=TINY["num_classes"],
                            epochs=1400, global_batch_size=256, global_seed=0, vae="ema",
                            num_workers=4, log_every=100, ckpt_every=50_000,
                            sample_every=10_000, cfg_scale=4.0, wandb=False, ckpt=None,
                            path_type="Linear", prediction="velocity", loss_weight=None,
                            sample_eps=None, train_eps=None)
  checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": args}
  os.makedirs(OUT, exist_ok=True)
  ckpt_path = os.path.join(OUT, "0000001.pt")  # train.py's f"{checkpoint_dir}/{train_steps:07d}.pt"
  torch.save(checkpoint, ckpt_path)

  x = torch.randn(5, c, s, s, generator=gen)
  t = torch.tensor([0.0, 0.1, 0.35, 0.7, 1.0])  # SiT's time: 0 noise, 1 data
  y = torch.tensor([0, 3, 7, 9, TINY["num_classes"]])  # the last: the null label
  with torch.no_grad():
    out_ema, out_model = ema(x, t, y), model(x, t, y)

  # Their transport, as sample.py builds it with the defaults (Linear, velocity).
  transport = create_transport("Linear", "velocity", None, None, None)
  sampler = Sampler(transport)
  ts = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
  sde_drift, sde_diffusion = sampler._Sampler__get_sde_diffusion_and_drift(
      diffusion_form="SBDM", diffusion_norm=1.0)
  with torch.no_grad():
    drift = sampler.drift(x, ts, ema.forward, y=y)
    score = sampler.score(x, ts, ema.forward, y=y)
    sbdm_drift = sde_drift(x, ts, ema.forward, y=y)
    sbdm_diffusion = sde_diffusion(x, ts).reshape(-1)
    euler = ode(drift=sampler.drift, t0=0.1, t1=0.5, sampler_type="euler", num_steps=3,
                atol=1e-6, rtol=1e-3).sample(x, ema.forward, y=y)  # grid 0.1, 0.3, 0.5
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy().astype(np.float32)
  npz_path = os.path.join(OUT, "outputs.npz")
  np.savez(npz_path, x=nhwc(x), t=t.numpy().astype(np.float32), y=y.numpy().astype(np.int32),
           ema=nhwc(out_ema), model=nhwc(out_model),
           transport_t=ts.numpy().astype(np.float32), drift=nhwc(drift), score=nhwc(score),
           sbdm_drift=nhwc(sbdm_drift), sbdm_diffusion=sbdm_diffusion.numpy().astype(np.float32),
           ode_t=np.array([0.1, 0.3, 0.5], np.float32), ode_euler=nhwc(euler[-1]))

  manifest = {
      "repository": "willisma/SiT", "commit": commit, "torch": torch.__version__,
      "timm": timm.__version__, "torchdiffeq": torchdiffeq.__version__,
      "numpy": np.__version__, "python": platform.python_version(),
      "seed": SEED, "tiny": TINY, "tiny_parameters": sum(p.numel() for p in model.parameters()),
      "tensors": len(model.state_dict()),
      "files": {os.path.basename(p): {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
                for p in (ckpt_path, npz_path)},
  }
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
  main()
