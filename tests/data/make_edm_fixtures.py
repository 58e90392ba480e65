"""Writes tests/data/edm/: small EDM network snapshots made by EDM's own code.

  python -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 numpy requests click pillow psutil
  /work/torchenv/bin/python tests/data/make_edm_fixtures.py /path/to/edm

EDM is NVlabs/edm (a checkout, not vendored here). The networks are built by
its own classes, constructed the way its training loop constructs them
(`dnnlib.util.construct_class_by_name` of `training.networks.EDMPrecond` with
the network keywords of its train.py for --arch=ddpmpp / ncsnpp, shrunk, and
the dataset's interface keywords), and written the way its training loop
writes a network snapshot: a dict of the EMA network, the loss, the
augmentation pipeline and the dataset keywords, every torch module replaced
by `copy.deepcopy(module).eval().requires_grad_(False)` on the CPU, then
`pickle.dump` (Python's default protocol, 4).

One change to what the snapshot holds: EDM's persistent classes embed the
source code of their module in every pickle (`module_src`). Before pickling,
this script sets each persistent class's recorded source to a one-line
placeholder that names the file and the EDM commit, so the committed
fixtures hold none of EDM's code. Everything else (the layout of the
persistent-object records, tensors over storages stored inline in torch's
legacy byte format, ModuleDicts, OrderedDicts, numpy scalars, `_init_kwargs`)
is as EDM writes it; score_jax's reader treats module_src as inert text either
way.

EDM initializes the last convolution of every branch near zero (1e-5 times
xavier) and all biases at zero, which would hide mapping errors, so every
parameter is redrawn at random before the snapshot (weights N(0, 1 / fan_in),
vectors their value plus N(0, 0.2^2)); the Fourier frequencies are EDM's own
random buffer and the resampling filters are left as EDM built them.

Per network, tests/data/edm/<name>/ gets
* network-snapshot-000000.pkl: the snapshot (checked to load back through
  EDM's own unpickling, the sources put back by an import hook, and to give
  the same denoiser output);
* outputs.npz: fixed inputs and EDM's outputs on them, NHWC / [B]:
  x [B, H, W, C], sigma [B], class_labels [B, label_dim] (one-hot; absent for
  unconditional networks), augment_labels [B, 9]; c_in_x = c_in x and c_noise
  as EDMPrecond computes them; F = net.model(c_in x, c_noise, class_labels)
  (the raw SongUNet), F_aug = the same with augment_labels; D = net(x, sigma,
  class_labels) (EDM's denoiser), D_aug with augment_labels; for conditional
  networks also F_null and D_null, with class_labels=None (EDM's zero label).
and edm/manifest.json records the EDM commit, the torch, numpy and Python
versions, each network's keywords and parameter count, and file sizes.
"""

import argparse
import copy
import hashlib
import json
import os
import pickle
import platform
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 3
RESOLUTION = 16
SIGMAS = (0.002, 0.7, 80.0)  # EDM's sampling range ends and a middle level

# train.py's network keywords for --arch=ddpmpp / ncsnpp (its CIFAR-10 settings),
# shrunk: 8 channels, three resolutions of 16, 8, 4 px, one block each, attention at 8 px.
SHRINK = dict(model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8])
ARCH = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}
# name -> (arch, label_dim)
FIXTURES = {"ddpmpp_uncond": ("ddpmpp", 0), "ncsnpp_cond": ("ncsnpp", 10)}


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _placeholder_sources(persistence, commit):
  """Each persistent class records `# <module file> of NVlabs/edm <commit>: not stored ...`.

  Returns {placeholder: real source}, for `_check_with_edm`.
  """
  real = {}
  for cls in persistence._decorators:  # pylint: disable=protected-access
    module = cls.__module__.replace(".", "/") + ".py"
    placeholder = f"# {module} of NVlabs/edm {commit}: not stored in this fixture\n"
    real[placeholder] = cls._orig_module_src
    cls._orig_module_src = placeholder
  return real


def _restore_sources(persistence, real):
  for cls in persistence._decorators:  # pylint: disable=protected-access
    cls._orig_module_src = real.get(cls._orig_module_src, cls._orig_module_src)


def _check_with_edm(pkl, persistence, real, torch, x, sigma, onehot, expected):
  """Loads the snapshot with EDM's own unpickling (the real sources put back by
  an import hook) and checks that it computes the recorded denoiser output."""
  hook = lambda meta: (meta.update(module_src=real.get(meta.module_src, meta.module_src)), meta)[1]
  persistence._import_hooks.append(hook)  # pylint: disable=protected-access
  try:
    with open(pkl, "rb") as f:
      net = pickle.load(f)["ema"]
  finally:
    persistence._import_hooks.remove(hook)  # pylint: disable=protected-access
  with torch.no_grad():
    d = _nhwc(net(x, sigma, onehot))
  if not np.array_equal(d, expected):
    raise RuntimeError(f"{pkl}: EDM's own unpickling gives another D (max diff "
                       f"{np.abs(d - expected).max()})")


def _perturb(net, torch, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in net.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise * (p[0].numel() ** -0.5))
      else:
        p.add_(0.2 * noise)


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def make(edm, name, out_dir, commit, torch, modules, seed):
  dnnlib, persistence = modules
  arch, label_dim = FIXTURES[name]
  network_kwargs = dict(class_name="training.networks.EDMPrecond", **ARCH[arch], **SHRINK,
                        augment_dim=9, dropout=0.13, use_fp16=False)
  interface_kwargs = dict(img_resolution=RESOLUTION, img_channels=3, label_dim=label_dim)
  torch.manual_seed(seed)
  net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
  _perturb(net, torch, seed + 1)
  loss_fn = dnnlib.util.construct_class_by_name(class_name="training.loss.EDMLoss")
  augment_pipe = dnnlib.util.construct_class_by_name(
      class_name="training.augment.AugmentPipe", p=0.12, xflip=1e8, yflip=1, scale=1,
      rotate_frac=1, aniso=1, translate_frac=1)
  dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset",
                        path="datasets/cifar10-32x32.zip", use_labels=bool(label_dim),
                        xflip=False, cache=True, resolution=RESOLUTION, max_size=50000)
  ema = copy.deepcopy(net).eval().requires_grad_(False)

  # The training loop's snapshot.
  data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
  for key, value in data.items():
    if isinstance(value, torch.nn.Module):
      value = copy.deepcopy(value).eval().requires_grad_(False)
      data[key] = value.cpu()
    del value
  folder = os.path.join(out_dir, name)
  os.makedirs(folder, exist_ok=True)
  pkl = os.path.join(folder, "network-snapshot-000000.pkl")
  real = _placeholder_sources(persistence, commit)
  try:
    with open(pkl, "wb") as f:
      pickle.dump(data, f)
  finally:
    _restore_sources(persistence, real)
  with open(pkl, "rb") as f:
    protocol = f.read(2)[1]

  # EDM's outputs on fixed inputs, with the network as it was pickled.
  net = data["ema"]
  gen = torch.Generator().manual_seed(seed + 2)
  sigma = torch.tensor(SIGMAS, dtype=torch.float32)
  y = torch.rand([BATCH, 3, RESOLUTION, RESOLUTION], generator=gen) * 2 - 1
  x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen)
  aug = torch.randn([BATCH, 9], generator=gen)
  classes = torch.tensor([1, 7, 3])[:BATCH]
  onehot = torch.nn.functional.one_hot(classes, 10).to(torch.float32) if label_dim else None
  sd = net.sigma_data
  s = sigma.reshape(-1, 1, 1, 1)
  c_in = 1 / (sd**2 + s**2).sqrt()
  c_noise = sigma.log() / 4
  out = dict(x=_nhwc(x), sigma=sigma.numpy(), augment_labels=aug.numpy(),
             c_in_x=_nhwc(c_in * x), c_noise=c_noise.numpy())
  with torch.no_grad():
    out["F"] = _nhwc(net.model(c_in * x, c_noise, class_labels=onehot))
    out["F_aug"] = _nhwc(net.model(c_in * x, c_noise, class_labels=onehot, augment_labels=aug))
    out["D"] = _nhwc(net(x, sigma, onehot))
    out["D_aug"] = _nhwc(net(x, sigma, onehot, augment_labels=aug))
    if label_dim:
      out["class_labels"] = onehot.numpy()
      zero = torch.zeros([1, label_dim])
      out["F_null"] = _nhwc(net.model(c_in * x, c_noise, class_labels=zero))
      out["D_null"] = _nhwc(net(x, sigma, None))
  _check_with_edm(pkl, persistence, real, torch, x, sigma, onehot, out["D"])
  npz = os.path.join(folder, "outputs.npz")
  np.savez_compressed(npz, **out)
  n_params = sum(p.numel() for p in net.parameters())
  return {
      "network_kwargs": network_kwargs, "interface_kwargs": interface_kwargs,
      "parameters": int(n_params), "tensors": len(net.state_dict()),
      "pickle_protocol": int(protocol),
      "files": {os.path.relpath(p, out_dir): {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
                for p in (pkl, npz)},
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("edm", help="a checkout of NVlabs/edm")
  ap.add_argument("--out", default=os.path.join(HERE, "edm"))
  args = ap.parse_args()
  edm = os.path.abspath(args.edm)
  commit = subprocess.run(["git", "-C", edm, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  sys.path.insert(0, edm)
  import torch  # pylint: disable=import-outside-toplevel
  import dnnlib  # pylint: disable=import-outside-toplevel
  from torch_utils import persistence  # pylint: disable=import-outside-toplevel
  import training.augment, training.loss, training.networks  # noqa: F401  pylint: disable=import-outside-toplevel,multiple-imports
  torch.set_num_threads(1)
  manifest = {
      "edm": {"repository": "NVlabs/edm", "commit": commit},
      "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
      "resolution": RESOLUTION, "batch": BATCH, "sigmas": list(SIGMAS),
      "fixtures": {},
  }
  for i, name in enumerate(FIXTURES):
    manifest["fixtures"][name] = make(edm, name, args.out, commit, torch, (dnnlib, persistence),
                                      seed=100 * (i + 1))
    print(name, manifest["fixtures"][name]["parameters"], "parameters")
  with open(os.path.join(args.out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")


if __name__ == "__main__":
  main()
