"""Writes tests/data/edm2_pickles/: small EDM2 network pickles made by EDM2's own code.

  python -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 numpy click pillow
  /work/torchenv/bin/python tests/data/make_edm2_pickles.py /path/to/edm2

EDM2 is NVlabs/edm2 (a checkout, not vendored here). The networks are its
`training.networks_edm2.Precond` (a magnitude-preserving UNet), constructed as
its training loop constructs them (`dnnlib.util.construct_class_by_name` of
train_edm2.py's network keywords, shrunk, and the dataset's interface keywords),
and written as EDM2 writes the files it publishes:

* `network-snapshot-0000008-0.050.pkl`, `uncond/network-snapshot-0000008.pkl`:
  training_loop.py's snapshot, `pickle.dump` of the EasyDict (encoder,
  dataset_kwargs, loss_fn, ema) with ema = `copy.deepcopy(ema_net).cpu().eval()
  .requires_grad_(False).to(torch.float16)` (the cond network's from
  `training.phema.PowerFunctionEMA.get()`, hence the std suffix; the
  unconditional one as training_loop.py saves a network without an EMA);
* `phema-0000016-0.080.pkl`: reconstruct_phema.py's output, written by its own
  `reconstruct_phema()` from four snapshots of the cond network (stds 0.050 and
  0.100 at 8 and 16 kimg of a two-step "training" that redraws the weights)
  which are not kept. EDM2's released networks (edm2-img512-xs-2147483-0.135.pkl
  ...) are such files.

The cond network is latent-like (4 channels, 10 classes, StabilityVAEEncoder,
whose per-channel scale and bias are numpy arrays in the pickle); the
unconditional one is pixel-like (3 channels, StandardRGBEncoder). Both at 8x8
px; attention at 4 px (and the decoder's first block, as EDM2 always does),
4 channels per head.

EDM2 initializes its gains (every Block's emb_gain, the UNet's out_gain) at
zero, which would hide mapping errors, so they are redrawn at random before the
snapshots; the weights are EDM2's own random initialization.

One change to what the pickles hold: EDM2's persistent classes embed the source
code of their module (`module_src`). Before pickling, this script sets each
persistent class's recorded source to a one-line placeholder naming the file
and the commit, so the committed fixtures hold none of EDM2's code; each file
is checked to load back through EDM2's own unpickling (the sources put back by
an import hook) and to compute the recorded outputs.

outputs.npz (per network; NHWC / [B]): x [B, H, W, C], sigma [B],
class_labels [B, label_dim] (one-hot; conditional only), c_noise, F =
net.unet(c_in x, c_noise, class_labels), D, logvar = net(x, sigma,
class_labels, return_logvar=True) (logvar [B]); conditional also D_null
(class_labels=None: EDM2's zero label). Computed on the CPU (Precond runs float32
off CUDA) from the float16 weights as pickled, and as F_f32, D_f32, logvar_f32,
D_null_f32 from the same weights made float32 (`net.to(torch.float32)`): with
float16 gains EDM2's MPConv rounds gain / sqrt(fan_in) to float16. manifest.json
records the commit, versions, keywords, sizes and hashes.
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
import tempfile
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESOLUTION = 8
SIGMAS = (0.002, 0.7, 80.0)  # EDM2's sampling range ends and a middle level
CLASSES = (1, 7, 3)

# train_edm2.py's network keywords (class name, channels, dropout, fp16), shrunk.
SHRINK = dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=4,
              logvar_channels=8)
FIXTURES = {
    # name -> (interface keywords, network keywords, encoder)
    "cond": (dict(img_resolution=RESOLUTION, img_channels=4, label_dim=10),
             dict(model_channels=4, dropout=0.0, **SHRINK),
             "training.encoders.StabilityVAEEncoder"),
    "uncond": (dict(img_resolution=RESOLUTION, img_channels=3, label_dim=0),
               dict(model_channels=4, dropout=0.1, **dict(SHRINK, channel_mult=[1, 1, 2])),
               "training.encoders.StandardRGBEncoder"),
}


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _placeholder_sources(persistence, commit):
  """Each persistent class records `# <module file> of NVlabs/edm2 <commit>: not stored ...`.

  Returns {placeholder: real source}.
  """
  real = {}
  for cls in persistence._decorators:  # pylint: disable=protected-access
    module = cls.__module__.replace(".", "/") + ".py"
    placeholder = f"# {module} of NVlabs/edm2 {commit}: not stored in this fixture\n"
    real[placeholder] = cls._orig_module_src
    cls._orig_module_src = placeholder
  return real


def _restore_sources(persistence, real):
  for cls in persistence._decorators:  # pylint: disable=protected-access
    cls._orig_module_src = real.get(cls._orig_module_src, cls._orig_module_src)


def _load_with_edm2(pkl, persistence, real):
  """EDM2's own unpickling, the real sources put back by an import hook."""
  hook = lambda meta: (meta.update(module_src=real.get(meta.module_src, meta.module_src)), meta)[1]
  persistence._import_hooks.append(hook)  # pylint: disable=protected-access
  try:
    with open(pkl, "rb") as f:
      return pickle.load(f)
  finally:
    persistence._import_hooks.remove(hook)  # pylint: disable=protected-access


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def _redraw_gains(net, torch, gen):
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("emb_gain") or name.endswith("out_gain"):
        p.copy_(0.5 + 0.5 * torch.randn(p.shape, generator=gen))


def _dump(path, data, persistence, real_holder, commit):
  real = _placeholder_sources(persistence, commit)
  real_holder.update(real)
  try:
    with open(path, "wb") as f:
      pickle.dump(data, f)
  finally:
    _restore_sources(persistence, real)


def _snapshot(ema_net, encoder, dataset_kwargs, loss_fn, dnnlib, torch):
  """training_loop.py's snapshot dict."""
  data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
  data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
  return data


def _outputs(net, label_dim, channels, torch, seed):
  """EDM2's outputs on fixed inputs (float32, CPU)."""
  gen = torch.Generator().manual_seed(seed)
  sigma = torch.tensor(SIGMAS, dtype=torch.float32)
  b = len(SIGMAS)
  y = torch.randn([b, channels, RESOLUTION, RESOLUTION], generator=gen) * 0.5
  x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen)
  onehot = None
  if label_dim:
    onehot = torch.nn.functional.one_hot(torch.tensor(CLASSES), label_dim).to(torch.float32)
  s = sigma.reshape(-1, 1, 1, 1)
  c_in = 1 / (net.sigma_data ** 2 + s ** 2).sqrt()
  c_noise = sigma.log() / 4
  out = dict(x=_nhwc(x), sigma=sigma.numpy(), c_noise=c_noise.numpy())
  if label_dim:
    out["class_labels"] = onehot.numpy()
  # As pickled (float16 weights), and the same weights made float32 (`net.to(torch.float32)`,
  # as reconstruct_phema.py loads them): with float16 gains, MPConv's gain / sqrt(fan_in) is
  # a float16 scalar, rounded to 2^-11 relative.
  for suffix, model in (("", net), ("_f32", copy.deepcopy(net).to(torch.float32))):
    with torch.no_grad():
      out["F" + suffix] = _nhwc(model.unet((c_in * x).to(torch.float32), c_noise, onehot))
      d, logvar = model(x, sigma, onehot, return_logvar=True)
      out["D" + suffix], out["logvar" + suffix] = _nhwc(d), logvar.reshape(-1).numpy()
      if label_dim:
        out["D_null" + suffix] = _nhwc(model(x, sigma, None))
  return out, (x, sigma, onehot)


def _check(pkl, persistence, real, torch, inputs, expected):
  net = _load_with_edm2(pkl, persistence, real)["ema"]
  with torch.no_grad():
    d, logvar = net(*inputs, return_logvar=True)
  if not (np.array_equal(_nhwc(d), expected["D"])
          and np.array_equal(logvar.reshape(-1).numpy(), expected["logvar"])):
    raise RuntimeError(f"{pkl}: EDM2's own unpickling gives other outputs")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  ap.add_argument("edm2", help="a checkout of NVlabs/edm2")
  ap.add_argument("--out", default=os.path.join(HERE, "edm2_pickles"))
  ap.add_argument("--commit", default=None,
                  help="EDM2's commit, where the checkout is an export without .git")
  args = ap.parse_args()
  edm2 = os.path.abspath(args.edm2)
  commit = args.commit or subprocess.run(["git", "-C", edm2, "rev-parse", "HEAD"],
                                         capture_output=True, text=True, check=True).stdout.strip()
  sys.path.insert(0, edm2)
  # training_loop.py imports psutil for its status lines and dnnlib.util imports requests for
  # URLs; neither is used here, so empty modules stand in where they are not installed.
  for missing in ("psutil", "requests"):
    try:
      __import__(missing)
    except ImportError:
      sys.modules[missing] = types.ModuleType(missing)
  import torch  # pylint: disable=import-outside-toplevel
  import dnnlib  # pylint: disable=import-outside-toplevel
  from torch_utils import persistence  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel,multiple-imports
  import training.networks_edm2, training.encoders, training.training_loop, training.phema  # noqa
  # pylint: enable=import-outside-toplevel,multiple-imports
  import reconstruct_phema  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  os.makedirs(os.path.join(args.out, "uncond"), exist_ok=True)
  real = {}
  manifest = {"edm2": {"repository": "NVlabs/edm2", "commit": commit},
              "torch": torch.__version__, "numpy": np.__version__,
              "python": platform.python_version(), "sigmas": list(SIGMAS),
              "classes": list(CLASSES), "fixtures": {}}
  files = {}

  for i, (name, (interface, kwargs, encoder_class)) in enumerate(FIXTURES.items()):
    seed = 100 * (i + 1)
    torch.manual_seed(seed)
    network_kwargs = dnnlib.EasyDict(class_name="training.networks_edm2.Precond", **kwargs,
                                     use_fp16=True)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    gen = torch.Generator().manual_seed(seed + 1)
    _redraw_gains(net, torch, gen)
    encoder = dnnlib.util.construct_class_by_name(class_name=encoder_class)
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                     path=f"datasets/{name}.zip",
                                     use_labels=bool(interface["label_dim"]))
    loss_fn = dnnlib.util.construct_class_by_name(
        class_name="training.training_loop.EDM2Loss", P_mean=-0.4, P_std=1.0)
    entry = {"network_kwargs": network_kwargs, "interface_kwargs": interface,
             "encoder": encoder_class, "parameters": int(sum(p.numel() for p in net.parameters()))}
    if name == "uncond":
      data = _snapshot(net, encoder, dataset_kwargs, loss_fn, dnnlib, torch)
      pkl = os.path.join(args.out, "uncond", "network-snapshot-0000008.pkl")
      _dump(pkl, data, persistence, real, commit)
      out, inputs = _outputs(data.ema, interface["label_dim"], interface["img_channels"], torch,
                             seed + 2)
      npz = os.path.join(args.out, "uncond", "outputs.npz")
      entry["tensors"] = len(data.ema.state_dict())
      pkls = {pkl: npz}
      results = {pkl: (out, inputs)}
    else:
      # A two-step run with PowerFunctionEMA, snapshots at 8 and 16 kimg (nimg 8192, 16384),
      # kept in a temporary folder; reconstruct_phema() makes the published kind of file.
      ema = training.phema.PowerFunctionEMA(net=net, stds=[0.050, 0.100])
      tmp = tempfile.mkdtemp(prefix="edm2-snapshots-")
      batch = 1024
      kept = None
      for cur_nimg in (8192, 16384):
        with torch.no_grad():
          for p in net.parameters():
            if p.ndim:
              p.copy_(torch.randn(p.shape, generator=gen))
        ema.update(cur_nimg=cur_nimg, batch_size=batch)
        for ema_net, suffix in ema.get():
          data = _snapshot(ema_net, encoder, dataset_kwargs, loss_fn, dnnlib, torch)
          path = os.path.join(tmp, f"network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl")
          with open(path, "wb") as f:  # real sources: reconstruct_phema loads these
            pickle.dump(data, f)
          if cur_nimg == 8192 and suffix == "-0.050":
            kept = path
      snap = os.path.join(args.out, "network-snapshot-0000008-0.050.pkl")
      with open(kept, "rb") as f:
        data = pickle.load(f)
      _dump(snap, data, persistence, real, commit)
      in_pkls = reconstruct_phema.list_input_pickles(tmp, in_prefix="network-snapshot")
      real_now = _placeholder_sources(persistence, commit)
      real.update(real_now)
      # reconstruct_phema deep-copies the loaded snapshots (a pickle round trip of the
      # persistent objects): the hook gives those copies the real sources back, while the
      # pickles it writes record the placeholders.
      hook = lambda meta: (meta.update(module_src=real.get(meta.module_src, meta.module_src)),
                           meta)[1]
      persistence._import_hooks.append(hook)  # pylint: disable=protected-access
      try:
        for _ in reconstruct_phema.reconstruct_phema(in_pkls, out_std=[0.080], out_dir=args.out,
                                                     out_prefix="phema", verbose=False):
          pass
      finally:
        persistence._import_hooks.remove(hook)  # pylint: disable=protected-access
        _restore_sources(persistence, real_now)
      phema = os.path.join(args.out, "phema-0000016-0.080.pkl")
      for path in os.listdir(tmp):
        os.remove(os.path.join(tmp, path))
      os.rmdir(tmp)
      entry["tensors"] = len(data.ema.state_dict())
      entry["phema"] = {"inputs": [os.path.basename(p.path) for p in in_pkls],
                        "out_std": 0.080, "out_nimg": 16384}
      pkls, results = {}, {}
      for path, tag in ((snap, "outputs.npz"), (phema, "phema_outputs.npz")):
        netp = _load_with_edm2(path, persistence, real)["ema"]
        results[path] = _outputs(netp, interface["label_dim"], interface["img_channels"], torch,
                                 seed + 2)
        pkls[path] = os.path.join(args.out, tag)
    for pkl, npz in pkls.items():
      out, inputs = results[pkl]
      _check(pkl, persistence, real, torch, inputs[:3], out)
      np.savez_compressed(npz, **out)
      for p in (pkl, npz):
        files[os.path.relpath(p, args.out)] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    manifest["fixtures"][name] = entry
    print(name, entry["parameters"], "parameters")
  manifest["files"] = files
  with open(os.path.join(args.out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  print("total", sum(v["bytes"] for v in files.values()), "bytes")


if __name__ == "__main__":
  main()
