"""Writes tests/data/reference/: small checkpoints made by the reference's own code.

  python -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 numpy scipy ml_collections absl-py
  /work/torchenv/bin/python tests/data/make_reference_checkpoints.py /path/to/score_sde_pytorch

The reference is yang-song/score_sde_pytorch (a checkout, not vendored here).
Everything below that builds, trains and saves a network is the reference's
own code: its config files (shrunk), `models.utils.create_model` (the
network wrapped in DataParallel, as its run_lib does), `ExponentialMovingAverage`,
`losses.get_optimizer` / `optimization_manager` / `get_step_fn`, `sde_lib`,
`models.utils.get_score_fn` and `utils.save_checkpoint`. Only two things are
shimmed, and neither touches the networks' arithmetic:

* `op/` compiles CUDA kernels when imported (`torch.utils.cpp_extension.load`);
  on CPU its `upfirdn2d` runs `upfirdn2d_native` and never calls them, so
  `load` is replaced by a stub while the reference is imported.
* `utils.py` imports tensorflow for `restore_checkpoint` only; an empty module
  stands in for it while utils.py is imported, so that `utils.save_checkpoint`
  itself writes the files (no tensorflow needed).

Per network, tests/data/reference/<name>/ gets
* checkpoint_<step>.pth: `utils.save_checkpoint` of the training state after
  the reference's initialization with every trainable tensor perturbed by
  N(0, 0.1^2) noise (the initialization has zero biases and zero-initialized
  convolutions, which would hide mapping errors), then either steps of its
  training step (`get_step_fn`: Adam moments in the optimizer state, EMA
  updated) or, for a smaller file, one EMA update and a fresh optimizer. The
  EMA started from the initialization, so the EMA weights differ from the raw
  ones.
* outputs.npz: fixed inputs and the reference's outputs, all NHWC / [B]:
  x [B, H, W, C]; t [B]; labels [B] (what its score function fed the network);
  for w in (ema, model): net_<w> = the network's output on (x, labels) (for VE
  NCSN++ it includes the reference's in-network division by sigma) and
  score_<w> = `get_score_fn(sde, model, train=False, continuous=...)(x, t)`,
  with the EMA weights (`ema.copy_to`, as its sampling does) or the raw ones.
and reference/manifest.json records the reference commit, torch version and
the config changes.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import types
import zlib

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 3  # also the training batch
SMALL = {  # NCSN++ / DDPM++: 8 px, two resolutions, attention at 4 px (and in the middle)
    "data.image_size": 8,
    "model.nf": 4,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
}
T_CONTINUOUS = (0.013, 0.47, 0.93)
T_DISCRETE = (0.013, 0.4711, 0.93)  # fractional DDPM labels t (N - 1); no ties in VE's rounding
# name: (reference config module, changes beyond SMALL, t fed to the score function,
#        training steps: > 0 runs the reference's training step (Adam moments in the
#        optimizer state, EMA updated), 0 perturbs once and updates the EMA, leaving
#        the optimizer fresh: a smaller file)
NETWORKS = {
    # DDPM++ cont. (VP): positional embedding, BigGAN blocks, no FIR, no pyramid.
    "ddpmpp_continuous": ("configs.vp.cifar10_ddpmpp_continuous", {}, T_CONTINUOUS, 0),
    # The same network after two of the reference's training steps: Adam's moments in the
    # optimizer state and, as in every checkpoint the reference saved after training
    # began, a numpy float64 learning rate in its param_groups (its warmup computes
    # lr * np.minimum(step / warmup, 1.0)).
    "ddpmpp_trained": ("configs.vp.cifar10_ddpmpp_continuous", {}, T_CONTINUOUS, 2),
    # NCSN++ cont. (VE): Fourier embedding, FIR, residual input pyramid.
    "ncsnpp_continuous": ("configs.ve.cifar10_ncsnpp_continuous", {}, T_CONTINUOUS, 0),
    # NCSN++ (VE, discrete SMLD): positional embedding of the noise index.
    "ncsnpp_discrete": ("configs.ve.cifar10_ncsnpp", {}, T_DISCRETE, 0),
    # NCSN++ as for FFHQ 256: output_skip and input_skip pyramids (sum), 2000 noise levels.
    "ncsnpp_skip": ("configs.ve.ffhq_256_ncsnpp_continuous", {"data.num_channels": 3},
                    T_CONTINUOUS, 0),
    # DDPM (VP, discrete): Ho et al.'s U-Net; its GroupNorms have 32 groups, so 32
    # channels at least; no residual blocks on the way down (the blocks up and in the
    # middle are the same class) keep the file at 1.3 MB.
    "ddpm": ("configs.vp.ddpm.cifar10", {"model.nf": 32, "model.ch_mult": (1, 1),
                                         "model.num_res_blocks": 0}, T_DISCRETE, 0),
}


class _NoCudaOp:
  """What `torch.utils.cpp_extension.load` returns while the reference is imported."""

  def __init__(self, name):
    self.name = name

  def __getattr__(self, attr):
    raise RuntimeError(f"the CUDA op {self.name}.{attr} is not built on CPU")


def import_reference(ref):
  """Imports the reference's modules from checkout `ref` (CPU, no CUDA build, no tensorflow)."""
  import torch.utils.cpp_extension as cpp_extension

  sys.path.insert(0, os.path.abspath(ref))
  load = cpp_extension.load
  cpp_extension.load = lambda name, *args, **kwargs: _NoCudaOp(name)
  try:
    mods = {name: importlib.import_module(name) for name in (
        "op", "models.utils", "models.ncsnpp", "models.ddpm", "models.ncsnv2", "models.ema",
        "losses", "sde_lib")}
  finally:
    cpp_extension.load = load
  # The stub is in sys.modules only while utils.py is imported (torch._dynamo,
  # which Adam imports, looks tensorflow up and must not find it).
  had_tf = "tensorflow" in sys.modules
  sys.modules.setdefault("tensorflow", types.ModuleType("tensorflow"))
  try:
    mods["utils"] = importlib.import_module("utils")
  finally:
    if not had_tf:
      del sys.modules["tensorflow"]
  return types.SimpleNamespace(**{k.replace("models.", "m_").replace(".", "_"): v
                                  for k, v in mods.items()})


def reference_commit(ref):
  try:
    return subprocess.run(["git", "-C", ref, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def get_config(module, changes):
  config = importlib.import_module(module).get_config()
  for key, value in {**SMALL, **changes}.items():
    section, name = key.split(".")
    config[section][name] = value
  config.device = torch.device("cpu")
  config.training.batch_size = BATCH
  return config


def get_sde(R, config):
  """As the reference's run_lib.train."""
  sde_name = config.training.sde.lower()
  if sde_name == "vpsde":
    return R.sde_lib.VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max,
                           N=config.model.num_scales)
  if sde_name == "subvpsde":
    return R.sde_lib.subVPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max,
                              N=config.model.num_scales)
  return R.sde_lib.VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max,
                         N=config.model.num_scales)


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32)


def make(R, name, out_dir, seed):
  module, changes, ts, train_steps = NETWORKS[name]
  config = get_config(module, changes)
  torch.manual_seed(seed)
  # As the reference's run_lib.train: model, EMA, optimizer, state.
  score_model = R.m_utils.create_model(config)
  ema = R.m_ema.ExponentialMovingAverage(score_model.parameters(), decay=config.model.ema_rate)
  optimizer = R.losses.get_optimizer(config, score_model.parameters())
  state = dict(optimizer=optimizer, model=score_model, ema=ema, step=0)
  # Random weights instead of the near-zero initialization.
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in score_model.parameters():
      if p.requires_grad:
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  sde = get_sde(R, config)
  size, channels = config.data.image_size, config.data.num_channels
  rng = np.random.default_rng(seed)
  if train_steps:
    step_fn = R.losses.get_step_fn(
        sde, train=True, optimize_fn=R.losses.optimization_manager(config),
        reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
        likelihood_weighting=config.training.likelihood_weighting)
    for _ in range(train_steps):
      batch = nchw(rng.uniform(size=(BATCH, size, size, channels)).astype(np.float32))
      batch = batch * 2.0 - 1.0 if config.data.centered else batch  # datasets.get_data_scaler
      step_fn(state, batch)
  else:  # the perturbation stands in for an optimizer step
    ema.update(score_model.parameters())
    state["step"] += 1
  os.makedirs(out_dir, exist_ok=True)
  ckpt = os.path.join(out_dir, f"checkpoint_{state['step']}.pth")
  R.utils.save_checkpoint(ckpt, state)

  # Fixed inputs and the reference's outputs.
  x = rng.standard_normal((BATCH, size, size, channels)).astype(np.float32)
  if not config.data.centered:
    x = (0.5 + 0.5 * x).astype(np.float32)
  t = np.asarray(ts, np.float32)
  xt, tt = nchw(x), torch.from_numpy(t)
  continuous = config.training.continuous
  if isinstance(sde, R.sde_lib.VESDE):  # as get_score_fn computes them
    labels = (sde.marginal_prob(torch.zeros_like(xt), tt)[1] if continuous
              else torch.round((sde.T - tt) * (sde.N - 1)).long())
  else:
    labels = tt * 999 if continuous else tt * (sde.N - 1)
  arrays = {"x": x, "t": t, "labels": labels.numpy()}

  def outputs(which):
    model_fn = R.m_utils.get_model_fn(score_model, train=False)
    score_fn = R.m_utils.get_score_fn(sde, score_model, train=False, continuous=continuous)
    with torch.no_grad():
      arrays[f"net_{which}"] = nhwc(model_fn(xt, labels))
      arrays[f"score_{which}"] = nhwc(score_fn(xt, tt))

  outputs("model")
  ema.store(score_model.parameters())
  ema.copy_to(score_model.parameters())
  outputs("ema")
  ema.restore(score_model.parameters())
  np.savez_compressed(os.path.join(out_dir, "outputs.npz"), **arrays)
  n_params = sum(p.numel() for p in score_model.parameters())
  diff = max(float((s - p.detach()).abs().max()) for s, p in zip(
      ema.shadow_params, [p for p in score_model.parameters() if p.requires_grad]))
  return {
      "reference_config": module,
      "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in {**SMALL, **changes}.items()},
      "checkpoint": os.path.basename(ckpt),
      "step": state["step"],
      "train_steps": train_steps,
      "parameters": n_params,
      "max_abs_ema_minus_model": diff,
      "seed": seed,
      "sigmas": [float(config.model.sigma_max), float(config.model.sigma_min),
                 int(config.model.num_scales)],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("reference", help="checkout of yang-song/score_sde_pytorch")
  parser.add_argument("--out", default=os.path.join(HERE, "reference"))
  parser.add_argument("--only", nargs="*", default=sorted(NETWORKS))
  args = parser.parse_args()
  torch.set_num_threads(1)
  R = import_reference(args.reference)
  manifest = {
      "made_by": "tests/data/make_reference_checkpoints.py",
      "reference": "https://github.com/yang-song/score_sde_pytorch",
      "reference_commit": reference_commit(args.reference),
      "torch": torch.__version__,
      "numpy": np.__version__,
      "layout": "outputs.npz: x, net_*, score_* are NHWC [B, H, W, C]; t, labels [B]",
      "networks": {},
  }
  for name in sorted(NETWORKS):
    if name in args.only:
      seed = zlib.crc32(name.encode()) % 10_000  # per network, whatever else is listed
      manifest["networks"][name] = make(R, name, os.path.join(args.out, name), seed=seed)
      print(name, manifest["networks"][name])
  path = os.path.join(args.out, "manifest.json")
  if set(args.only) != set(NETWORKS) and os.path.exists(path):  # keep the others' entries
    with open(path) as f:
      manifest["networks"] = {**json.load(f)["networks"], **manifest["networks"]}
  with open(path, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")


if __name__ == "__main__":
  main()
