"""Writes tests/data/edm2/: EDM2's own network, loss and training step on a tiny network, and
the parameter counts of EDM2's ImageNet presets.

  /work/venvs/dit/bin/python tests/data/make_edm2_fixtures.py /path/to/edm2 [--commit=SHA]

EDM2 is NVlabs/edm2 (a checkout, not vendored here; the commit is recorded). torch is
needed only here, in a separate virtualenv (torch 2.13 CPU, numpy); EDM2's `dnnlib` imports
`requests` and its training loop `psutil`, which none of the code used here calls, so empty
stand-in modules are put in their place when they are not installed.

Written:

* counts.json: `sum(p.numel() for p in net.parameters())` of EDM2's
  `training.networks_edm2.Precond(img_resolution=64, img_channels=C, label_dim=1000,
  model_channels=M, dropout=D)` for every preset of train_edm2.py (img512-*: C = 4, the
  latents; img64-*: C = 3), i.e. the network train_edm2.py builds; EDM2's Fourier
  frequencies and phases are buffers, not counted.
* tiny.npz, for a tiny `Precond(img_resolution=8, img_channels=3, label_dim=4,
  model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
  channels_per_head=4, dropout=0, use_fp16=False, logvar_channels=32)` (cosine attention
  with 2 heads at 4x4 and in the bottleneck): EDM2's MP weights
  are randn (random, not degenerate), and its zero-initialized gains (every block's
  emb_gain, the U-Net's out_gain) are redrawn as N(0, 1) + 1 so that they matter.
  Arrays, in EDM2's names and layouts ('.' -> '/' is not applied), prefixed:
  - 'w0/<name>': every parameter and buffer of the network before training;
  - eval mode (`net.eval()`) on fixed inputs: x = 'images' [4, 3, 8, 8], sigma [4], labels [4, 4]
    (one-hot, the last row zero: EDM2's dropped label) -> 'D', 'logvar' of
    `net(x, sigma, labels, return_logvar=True)` and 'F' of
    `net.unet(c_in x, c_noise, labels)`;
  - two training steps exactly as training/training_loop.py takes them (batch 4, one
    accumulation round, loss_scaling 1): `net.train()`, `EDM2Loss(P_mean=-0.4, P_std=1.0)`
    on the batch 'images' [4, 3, 8, 8] with 'labels', its two random draws fixed
    ('rnd_normal' [2, 4, 1, 1, 1], 'noise' [2, 4, 3, 8, 8], stand-ins for torch.randn and
    torch.randn_like while it is called), `loss.sum().mul(1 / 4).backward()`, the rate
    `learning_rate_schedule(cur_nimg, 4, ref_lr=0.01, ref_batches=2, rampup_Mimg=2e-5)` at
    cur_nimg = 12 and 16 ('lr' [2]), nan_to_num of the gradients, `torch.optim.Adam(betas=
    (0.9, 0.99), eps=1e-8)`.step(); 'loss' [2] the two losses (sum / batch), 'g0/<name>'
    the gradients of the first step (w.r.t. the weights its forward projected, in place, by
    forced weight normalization), after the second step 'w2/<name>' the gains and
    'w2n/<name>' EDM2's own normalize() of the MP weights (the projection its next training
    forward would apply; the raw weights are not stored, to keep the file small).
* manifest.json: the EDM2 commit, versions, the tiny network's keywords, file sizes.
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "edm2")

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_channels=4,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=4,
            dropout=0.0, logvar_channels=32)
LR = dict(ref_lr=0.01, ref_batches=2, rampup_Mimg=2e-5)
LOSS = dict(P_mean=-0.4, P_std=1.0)
BATCH = 4
START_NIMG = 12  # two steps: cur_nimg 12 and 16


def _import_edm2(path):
  sys.path.insert(0, path)
  for name in ("requests", "psutil"):
    try:
      __import__(name)
    except ImportError:
      sys.modules[name] = types.ModuleType(name)
  import torch  # pylint: disable=g-import-not-at-top
  from training import networks_edm2, training_loop  # pylint: disable=g-import-not-at-top
  import train_edm2  # pylint: disable=g-import-not-at-top
  return torch, networks_edm2, training_loop, train_edm2


def _np(t):
  return t.detach().cpu().numpy().astype(np.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("edm2", help="a checkout (or `git archive` extract) of NVlabs/edm2")
  parser.add_argument("--commit", default=None,
                      help="its commit, where the folder is not a git checkout")
  args = parser.parse_args()
  torch, N, T, train_edm2 = _import_edm2(os.path.abspath(args.edm2))
  os.makedirs(OUT, exist_ok=True)

  # Parameter counts of every preset (the network train_edm2.py builds).
  counts = {}
  for name, p in train_edm2.config_presets.items():
    if name == "edm2-img512-xxs" or name == "edm2-img64-xs":
      continue  # not among the configs (the paper's smallest ablation sizes)
    channels = 4 if "img512" in name else 3
    with torch.device("meta"):
      net = N.Precond(img_resolution=64, img_channels=channels, label_dim=1000,
                      model_channels=p.channels, dropout=p.dropout)
    counts[name[len("edm2-"):]] = dict(
        img_channels=channels, model_channels=p.channels,
        parameters=int(sum(q.numel() for q in net.parameters())),
        buffers=int(sum(b.numel() for b in net.buffers())))
  with open(os.path.join(OUT, "counts.json"), "w") as f:
    json.dump(counts, f, indent=2, sort_keys=True)
    f.write("\n")

  # The tiny network.
  torch.manual_seed(0)
  net = N.Precond(**TINY)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim == 0:  # emb_gain, out_gain: zero-initialized in EDM2
        p.copy_(torch.randn([]) + 1.0)
  arrays = {f"w0/{k}": _np(v) for k, v in net.state_dict().items()}

  gen = torch.Generator().manual_seed(1)
  images = torch.randn([BATCH, 3, 8, 8], generator=gen) * 0.5
  x = images
  sigma = torch.tensor([0.02, 0.4, 2.5, 30.0])
  labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 0]), 4).float()
  labels[-1] = 0
  net.eval()
  with torch.no_grad():
    d, logvar = net(x, sigma, labels, return_logvar=True)
    s4 = sigma.reshape(-1, 1, 1, 1)
    c_in = 1 / (0.5 ** 2 + s4 ** 2).sqrt()
    f = net.unet(c_in * x, sigma.log() / 4, labels)
  arrays.update(sigma=_np(sigma), labels=_np(labels), D=_np(d),
                logvar=_np(logvar.reshape(-1)), F=_np(f))

  # Two training steps as training_loop.py takes them.
  rnd_normal = torch.randn([2, BATCH, 1, 1, 1], generator=gen)
  noise = torch.randn([2, BATCH, 3, 8, 8], generator=gen)
  loss_fn = T.EDM2Loss(**LOSS)
  optimizer = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), eps=1e-8)
  net.train().requires_grad_(True)
  losses, lrs = [], []
  randn, randn_like = torch.randn, torch.randn_like
  for step in range(2):
    cur_nimg = START_NIMG + step * BATCH
    optimizer.zero_grad(set_to_none=True)
    torch.randn = lambda *a, _r=rnd_normal[step], **k: _r.clone()
    torch.randn_like = lambda t, _z=noise[step]: _z.clone()
    try:
      loss = loss_fn(net=net, images=images, labels=labels)
    finally:
      torch.randn, torch.randn_like = randn, randn_like
    losses.append(float(loss.sum() / BATCH))
    loss.sum().mul(1 / BATCH).backward()
    lr = T.learning_rate_schedule(cur_nimg=cur_nimg, batch_size=BATCH, **LR)
    lrs.append(lr)
    for g in optimizer.param_groups:
      g["lr"] = lr
    for p in net.parameters():
      if p.grad is not None:
        torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    if step == 0:
      arrays.update({f"g0/{k}": _np(p.grad) for k, p in net.named_parameters()})
    optimizer.step()
  params = dict(net.named_parameters())
  arrays.update({f"w2/{k}": _np(p) for k, p in params.items() if p.ndim < 2})
  arrays.update({f"w2n/{k}": _np(N.normalize(p.detach())) for k, p in params.items()
                 if p.ndim >= 2})
  arrays.update(images=_np(images), rnd_normal=_np(rnd_normal.reshape(2, BATCH)),
                noise=_np(noise), loss=np.float64(losses), lr=np.float64(lrs))
  path = os.path.join(OUT, "tiny.npz")
  np.savez_compressed(path, **arrays)

  commit = args.commit or subprocess.run(["git", "-C", args.edm2, "rev-parse", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
  files = {}
  for name in sorted(os.listdir(OUT)):
    if name.endswith((".npz", ".json")) and name != "manifest.json":
      with open(os.path.join(OUT, name), "rb") as f:
        data = f.read()
      files[name] = dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
  manifest = dict(edm2_commit=commit, torch=torch.__version__, numpy=np.__version__,
                  python=platform.python_version(), tiny=TINY, lr=LR, loss=LOSS, batch=BATCH,
                  start_nimg=START_NIMG, losses=losses, lrs=lrs,
                  tiny_parameters=int(sum(p.numel() for p in net.parameters())), files=files)
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
  main()
