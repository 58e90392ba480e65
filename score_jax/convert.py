"""Convert the 2021 reference's released checkpoints into score_jax checkpoints.

  python -m score_jax.convert --from=pytorch --config=configs/ve_cifar.py checkpoint_24.pth runs/ve_cifar
  python -m score_jax.convert --from=flax --config=configs/vp_cifar.py checkpoint_26 runs/vp_cifar
  python main.py --config=configs/ve_cifar.py --workdir=runs/ve_cifar --mode=sample

The reference (yang-song/score_sde, JAX/Flax, and its twin
yang-song/score_sde_pytorch) released trained weights of the paper's configs
in two formats:

* Flax (`checkpoint_<n>`): msgpack of the training state written by
  `flax.training.checkpoints`; the network under `params_ema` (EMA weights) and
  `optimizer.target`, with Flax's automatic module names
  (`ResnetBlockBigGANpp_3/Conv_0/kernel`). Read with `flax.serialization`.
* PyTorch (`checkpoint_<n>.pth`): a dict with `model` (the state dict of the
  DataParallel-wrapped network: `module.all_modules.<i>.<param>` for NCSN++,
  DDPM++ and DDPM, `module.res1.0.conv1.weight` etc. for NCSNv2, and the
  buffer `module.sigmas`), `ema` (`shadow_params`: the trainable tensors, in
  the order of `model.parameters()`, which skips buffers), `optimizer` and
  `step`. Read with the torch-free reader `score_jax.torch_pickle`: torch is
  not needed.

Every PyTorch network registers the buffer `sigmas` = the reference's
`get_sigmas(config)`, exp(linspace(log sigma_max, log sigma_min, num_scales))
of its training config's model section. It is no network parameter (nothing
maps onto it) but it fixes three config keys: a buffer that differs from the
config's noise levels means the wrong --config, and the conversion stops
naming the file's and the config's values of model.sigma_max, sigma_min and
num_scales.

The map between a reference network and score_jax's is an explicit list of
`Entry`s, one per tensor, built by walking the config's architecture in the
reference's construction order (the order of `all_modules` and of
`model.parameters()`); `check_spec` compares it with `jax.eval_shape` of
score_jax's own initialization. Layouts: PyTorch convolutions are OIHW
(score_jax and Flax: HWIO), `nn.Linear` weights are [out, in] (Dense kernels
[in, out]), the reference's NIN layers are score_jax Dense layers with the same
[in, out] matrix, GroupNorm's weight is Flax's scale, and the Flax reference's
InstanceNorm++ parameters have shape [1, 1, 1, C] (score_jax [C]).

A file is converted only if its tensors are exactly the reference network's:
a missing, unexpected or differently shaped tensor stops the conversion with
an error naming it (`ReferenceLayoutError`). The result is a normal score_jax
workdir, DST/checkpoints/<step>, whose parameters and EMA parameters are both
the converted weights (EMA weights unless --weights=model), with a fresh
optimizer state; `--mode=sample` and `--mode=eval` load it. DST is written in
a temporary folder beside it and renamed into place; an existing checkpoint
is never overwritten.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from score_jax import files

__all__ = [
    "FORMATS",
    "Entry",
    "Spec",
    "ReferenceLayoutError",
    "UnsupportedConfigError",
    "reference_spec",
    "reference_shapes",
    "check_spec",
    "check_tensors",
    "check_sigmas",
    "check_compatible",
    "PYTORCH_BUFFERS",
    "tensors_to_params",
    "params_to_tensors",
    "load_reference",
    "write_workdir",
    "convert",
    "main",
]

FORMATS = ("pytorch", "flax")
Shape = Tuple[int, ...]


class ReferenceLayoutError(ValueError):
  """A file's tensors are not exactly those of the config's reference network."""


class UnsupportedConfigError(ValueError):
  """The config's network cannot hold this reference format's weights."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: where it lives in score_jax and in the reference file.

  Attributes:
    ours: path in score_jax's params tree, e.g. ('ResnetBlockBigGAN_0', 'Conv_0', 'kernel').
    shape: its shape in score_jax.
    name: its name in the reference file: a Flax path joined by '/'
      ('ResnetBlockBigGANpp_0/Conv_0/kernel') or a PyTorch state-dict key
      without the DataParallel 'module.' prefix ('all_modules.3.Conv_0.weight').
    ref_shape: its shape in the reference file.
    kind: layout change, 'conv' | 'dense' | 'inorm' | 'plain' (see `_to_ours`).
    trainable: False for the Fourier features (not in PyTorch's EMA list).
  """
  ours: Tuple[str, ...]
  shape: Shape
  name: str
  ref_shape: Shape
  kind: str
  trainable: bool = True


# ---------------------------------------------------------------------------
# Layouts


def _ref_layout_shape(kind: str, fmt: str, shape: Shape) -> Shape:
  """The reference's shape of a score_jax tensor of `shape`."""
  if fmt == "pytorch":
    if kind == "conv":
      h, w, i, o = shape
      return (o, i, h, w)
    if kind == "dense":
      return (shape[1], shape[0])
    return tuple(shape)
  if kind == "inorm":
    return (1, 1, 1) + tuple(shape)
  return tuple(shape)


def _to_ours(kind: str, fmt: str, a: Any) -> Any:
  """Reference layout -> score_jax layout (numpy arrays or traced jax arrays)."""
  if fmt == "pytorch":
    if kind == "conv":
      return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind == "dense":
      return a.transpose(1, 0)  # nn.Linear [out, in] -> Dense [in, out]
    return a
  if kind == "inorm":
    return a.reshape(a.shape[-1:])  # [1, 1, 1, C] -> [C]
  return a


def _to_ref(kind: str, fmt: str, a: Any) -> Any:
  """score_jax layout -> reference layout (inverse of `_to_ours`)."""
  if fmt == "pytorch":
    if kind == "conv":
      return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if kind == "dense":
      return a.transpose(1, 0)
    return a
  if kind == "inorm":
    return a.reshape((1, 1, 1) + tuple(a.shape))
  return a


# ---------------------------------------------------------------------------
# Architecture walks: every tensor, in the reference's construction order.


@dataclasses.dataclass(frozen=True)
class _Param:
  ours: Tuple[str, ...]
  shape: Shape
  flax: str
  torch: str
  torch_shape: Shape
  kind: str
  trainable: bool = True


@dataclasses.dataclass(frozen=True)
class _Scope:
  """A module's name in score_jax, in the Flax reference and in the PyTorch twin."""
  ours: Tuple[str, ...]
  flax: str
  torch: str

  def child(self, ours: str, flax: Optional[str] = None, torch: Optional[str] = None) -> "_Scope":
    flax = ours if flax is None else flax
    torch = flax if torch is None else torch
    return _Scope(self.ours + (ours,), f"{self.flax}/{flax}" if self.flax else flax,
                  f"{self.torch}.{torch}" if self.torch else torch)


class _Collector:
  """The parameter list of one network, in PyTorch parameter order."""

  def __init__(self):
    self.params: List[_Param] = []

  def add(self, s: _Scope, ours: str, flax: str, torch: str, shape: Shape, kind: str,
          torch_shape: Optional[Shape] = None, trainable: bool = True) -> None:
    shape = tuple(int(d) for d in shape)
    if torch_shape is None:
      torch_shape = _ref_layout_shape(kind, "pytorch", shape)
    self.params.append(_Param(s.ours + (ours,), shape, f"{s.flax}/{flax}",
                              f"{s.torch}.{torch}", tuple(torch_shape), kind, trainable))

  def conv(self, s: _Scope, cin: int, cout: int, k: int = 3, *, bias: bool = True,
           flax_weight: str = "kernel", torch_io: Optional[Tuple[int, int]] = None) -> None:
    """A convolution; torch_io = the PyTorch twin's (in, out) where its widths differ."""
    tin, tout = torch_io or (cin, cout)
    self.add(s, "kernel", flax_weight, "weight", (k, k, cin, cout), "conv", (tout, tin, k, k))
    if bias:
      self.add(s, "bias", "bias", "bias", (cout,), "plain", (tout,))

  def dense(self, s: _Scope, cin: int, cout: int) -> None:
    """nn.Dense <-> nn.Dense / nn.Linear."""
    self.add(s, "kernel", "kernel", "weight", (cin, cout), "dense")
    self.add(s, "bias", "bias", "bias", (cout,), "plain")

  def nin(self, s: _Scope, cin: int, cout: int) -> None:
    """score_jax's Dense <-> the reference's NIN (W [in, out], b) in both formats."""
    self.add(s, "kernel", "W", "W", (cin, cout), "plain")
    self.add(s, "bias", "b", "b", (cout,), "plain")

  def group_norm(self, s: _Scope, c: int) -> None:
    self.add(s, "scale", "scale", "weight", (c,), "plain")
    self.add(s, "bias", "bias", "bias", (c,), "plain")

  def instance_norm(self, s: _Scope, c: int, plus: bool) -> None:
    """InstanceNorm(++): PyTorch's parameter order alpha, gamma, beta; Flax's are [1, 1, 1, C]."""
    if plus:
      self.add(s, "alpha", "alpha", "alpha", (c,), "inorm", (c,))
      self.add(s, "gamma", "gamma", "gamma", (c,), "inorm", (c,))
      self.add(s, "beta", "beta", "beta", (c,), "inorm", (c,))
    else:  # the Flax reference's InstanceNorm2d (the PyTorch twin's has no parameters)
      self.add(s, "gamma", "scale", "scale", (c,), "inorm", (c,))
      self.add(s, "beta", "bias", "bias", (c,), "inorm", (c,))


class _TopLevel:
  """Auto-names of the modules of a network's top level, as Flax counts them.

  In the PyTorch twin each top-level module is the next entry of the
  `all_modules` list, parameters or not (a FIR resampler without a conv still
  takes an index), as each Flax module takes the next number of its class.
  The exception: the input_skip / output_skip pyramids' resamplers (no conv)
  are the twin's attributes `pyramid_downsample` / `pyramid_upsample`, outside
  `all_modules` (`in_torch=False`), while Flax still counts them.
  """

  def __init__(self):
    self._ours: collections.Counter = collections.Counter()
    self._flax: collections.Counter = collections.Counter()
    self._index = 0

  def next(self, ours_cls: str, flax_cls: Optional[str] = None, in_torch: bool = True) -> _Scope:
    flax_cls = ours_cls if flax_cls is None else flax_cls
    ours = f"{ours_cls}_{self._ours[ours_cls]}"
    flax = f"{flax_cls}_{self._flax[flax_cls]}"
    self._ours[ours_cls] += 1
    self._flax[flax_cls] += 1
    torch = f"all_modules.{self._index}" if in_torch else "<outside all_modules>"
    self._index += in_torch
    return _Scope((ours,), flax, torch)


def _ncsnpp_params(model: Any, image_size: int, channels: int) -> List[_Param]:
  """NCSN++ / DDPM++ (reference `ncsnpp.py`) and DDPM (reference `ddpm.py`)."""
  from score_jax.models.ddpm import DDPM

  ddpm = isinstance(model, DDPM)
  biggan = model.resblock_type == "biggan"
  nf, ch_mult, nrb = model.nf, tuple(model.ch_mult), model.num_res_blocks
  num_resolutions = len(ch_mult)
  resolutions = [image_size // 2**i for i in range(num_resolutions)]
  temb_dim = 4 * nf if model.conditional else None
  out, top = _Collector(), _TopLevel()
  if biggan:
    res_cls = ("ResnetBlockBigGAN", "ResnetBlockBigGANpp")
  else:
    res_cls = ("ResnetBlockDDPM", "ResnetBlockDDPM" if ddpm else "ResnetBlockDDPMpp")
  attn_cls = ("AttnBlock", "AttnBlock" if ddpm else "AttnBlockpp")

  def resblock(cin: int, cout: Optional[int] = None, *, resample: bool = False) -> None:
    cout = cout or cin
    s = top.next(*res_cls)

    def temb_dense():
      if temb_dim:
        out.dense(s.child("Dense_0"), temb_dim, cout)

    layers = {
        "GroupNorm_0": lambda: out.group_norm(s.child("GroupNorm_0"), cin),
        "Conv_0": lambda: out.conv(s.child("Conv_0"), cin, cout),
        "Dense_0": temb_dense,
        "GroupNorm_1": lambda: out.group_norm(s.child("GroupNorm_1"), cout),
        "Conv_1": lambda: out.conv(s.child("Conv_1"), cout, cout),
    }
    # The order both reference blocks (ResnetBlockDDPM, ResnetBlockBigGANpp,
    # ResnetBlockDDPMpp) register their layers in, and so their state dicts'.
    for name in ("GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1"):
      layers[name]()
    if biggan and (cin != cout or resample):
      out.conv(s.child("Conv_2"), cin, cout, 1)
    elif not biggan and cin != cout:  # the reference's NIN is score_jax's next Dense
      out.nin(s.child("Dense_1" if temb_dim else "Dense_0", "NIN_0"), cin, cout)

  def attn(c: int) -> None:
    s = top.next(*attn_cls)
    out.group_norm(s.child("GroupNorm_0"), c)
    for i in range(4):  # q, k, v, out
      out.nin(s.child(f"Dense_{i}", f"NIN_{i}"), c, c)

  def resampler(cls: str, cin: int, cout: int, with_conv: bool, in_torch: bool = True) -> None:
    s = top.next(cls, in_torch=in_torch)
    if not with_conv:
      return
    assert in_torch
    if model.fir:  # fused FIR conv; the Flax reference names its kernel 'weight'
      out.conv(s.child("Conv2d_0"), cin, cout, flax_weight="weight")
    else:
      out.conv(s.child("Conv_0"), cin, cout)

  def conv(cin: int, cout: int) -> None:
    out.conv(top.next("Conv"), cin, cout)

  def group_norm(c: int) -> None:
    out.group_norm(top.next("GroupNorm"), c)

  # Noise-level embedding.
  embed_dim = nf
  if model.conditional and model.embedding_type == "fourier":
    s = top.next("GaussianFourierProjection")
    out.add(s, "W", "W", "W", (nf,), "plain", trainable=False)  # requires_grad=False in PyTorch
    embed_dim = 2 * nf
  if model.conditional:
    out.dense(top.next("Dense"), embed_dim, 4 * nf)
    out.dense(top.next("Dense"), 4 * nf, 4 * nf)

  # Downsampling path.
  pyramid_ch = channels
  conv(channels, nf)
  hs_c = [nf]
  in_ch = nf
  for i_level in range(num_resolutions):
    for _ in range(nrb):
      out_ch = nf * ch_mult[i_level]
      resblock(in_ch, out_ch)
      in_ch = out_ch
      if resolutions[i_level] in model.attn_resolutions:
        attn(in_ch)
      hs_c.append(in_ch)
    if i_level != num_resolutions - 1:
      if biggan:
        resblock(in_ch, resample=True)
      else:
        resampler("Downsample", in_ch, in_ch, model.resamp_with_conv)
      if model.progressive_input == "input_skip":  # the twin's pyramid_downsample
        resampler("Downsample", pyramid_ch, pyramid_ch, False, in_torch=False)
        out.conv(top.next("Combine").child("Conv_0"), pyramid_ch, in_ch, 1)
        if model.progressive_combine == "cat":
          in_ch *= 2
      elif model.progressive_input == "residual":
        resampler("Downsample", pyramid_ch, in_ch, True)
        pyramid_ch = in_ch
      hs_c.append(in_ch)

  in_ch = hs_c[-1]
  resblock(in_ch)
  attn(in_ch)
  resblock(in_ch)

  # Upsampling path.
  pyramid_ch = 0
  for i_level in reversed(range(num_resolutions)):
    for _ in range(nrb + 1):
      out_ch = nf * ch_mult[i_level]
      resblock(in_ch + hs_c.pop(), out_ch)
      in_ch = out_ch
    if resolutions[i_level] in model.attn_resolutions:
      attn(in_ch)
    if model.progressive != "none":
      if i_level == num_resolutions - 1:
        group_norm(in_ch)
        pyramid_ch = channels if model.progressive == "output_skip" else in_ch
        conv(in_ch, pyramid_ch)
      elif model.progressive == "output_skip":  # the twin's pyramid_upsample
        resampler("Upsample", pyramid_ch, pyramid_ch, False, in_torch=False)
        group_norm(in_ch)
        conv(in_ch, channels)
      else:  # residual
        resampler("Upsample", pyramid_ch, in_ch, True)
        pyramid_ch = in_ch
    if i_level != 0:
      if biggan:
        resblock(in_ch, resample=True)
      else:
        resampler("Upsample", in_ch, in_ch, model.resamp_with_conv)
  assert not hs_c
  if model.progressive != "output_skip":
    group_norm(in_ch)
    conv(in_ch, channels)
  return out.params


# NCSNv2 (reference `ncsnv2.py`) per image-size family: the PyTorch twin's
# names of the residual stages, (channel multiplier, dilation) per stage, and
# the RefineBlocks from the deepest stage up: their PyTorch names and width
# multipliers as score_jax and the JAX reference build them (`mult`) and as
# the PyTorch twin does (`torch_mult`: below 96 px its third RefineBlock is nf
# wide, not 2 nf). The twin registers its RefineBlocks in the order of
# _NCSNV2_REFINE_ORDER (refine31 after refine3).
_NCSNV2 = {
    64: dict(stages=("res1", "res2", "res3", "res4"),
             blocks=((1, 1), (2, 1), (2, 2), (2, 4)),
             refine=("refine1", "refine2", "refine3", "refine4"),
             mult=(2, 2, 2, 1), torch_mult=(2, 2, 1, 1)),
    128: dict(stages=("res1", "res2", "res3", "res4", "res5"),
              blocks=((1, 1), (2, 1), (2, 1), (4, 2), (4, 4)),
              refine=("refine1", "refine2", "refine3", "refine4", "refine5"),
              mult=(4, 2, 2, 1, 1), torch_mult=(4, 2, 2, 1, 1)),
    256: dict(stages=("res1", "res2", "res3", "res31", "res4", "res5"),
              blocks=((1, 1), (2, 1), (2, 1), (2, 1), (4, 2), (4, 4)),
              refine=("refine1", "refine2", "refine31", "refine3", "refine4", "refine5"),
              mult=(4, 2, 2, 2, 1, 1), torch_mult=(4, 2, 2, 2, 1, 1)),
}
_NCSNV2_REFINE_ORDER = ("refine1", "refine2", "refine3", "refine31", "refine4", "refine5")


def _ncsnv2_params(model: Any, image_size: int, channels: int) -> List[_Param]:
  """NCSNv2 RefineNet, in the PyTorch twin's parameter order (attribute names, no all_modules)."""
  family = 64 if image_size < 96 else 128 if image_size <= 128 else 256
  arch = _NCSNV2[family]
  nf, plus = model.nf, model.normalization == "InstanceNorm++"
  norm_cls = "InstanceNorm2dPlus" if plus else "InstanceNorm2d"
  out = _Collector()
  root = _Scope((), "", "")
  out.conv(root.child("Conv_0", "Conv_0", "begin_conv"), channels, nf)
  out.instance_norm(root.child("InstanceNorm2dPlus_0", f"{norm_cls}_0", "normalizer"), nf, plus)
  out.conv(root.child("Conv_1", "Conv_1", "end_conv"), nf, channels)

  def residual_block(s: _Scope, cin: int, cout: int, down: bool, dilation: int) -> None:
    # Flax creation order: norm, [shortcut conv when not resampling], conv1, norm,
    # conv2, [shortcut when resampling]; PyTorch order: conv1, normalize2, conv2,
    # shortcut, normalize1.
    norm = lambda i, torch, c: out.instance_norm(
        s.child(f"InstanceNorm2dPlus_{i}", f"{norm_cls}_{i}", torch), c, plus)
    if down:
      out.conv(s.child("Conv_0", torch="conv1"), cin, cin)
      norm(1, "normalize2", cin)
      if dilation > 1:
        out.conv(s.child("Conv_1", torch="conv2"), cin, cout)
        out.conv(s.child("Conv_2", torch="shortcut"), cin, cout)
      else:
        out.conv(s.child("_ConvMeanPool_0", "ConvMeanPool_0", "conv2").child("Conv_0", "Conv_0", "conv"),
                 cin, cout)
        out.conv(s.child("_ConvMeanPool_1", "ConvMeanPool_1", "shortcut").child("Conv_0", "Conv_0", "conv"),
                 cin, cout, 1)
    else:
      k = 0 if cin == cout else 1  # the shortcut conv comes first
      out.conv(s.child(f"Conv_{k}", torch="conv1"), cin, cout)
      norm(1, "normalize2", cout)
      out.conv(s.child(f"Conv_{k + 1}", torch="conv2"), cout, cout)
      if cin != cout:
        out.conv(s.child("Conv_0", torch="shortcut"), cin, cout, 3 if dilation > 1 else 1)
    norm(0, "normalize1", cin)

  feats = []
  in_ch, block = nf, 0
  for i, (stage, (mult, dilation)) in enumerate(zip(arch["stages"], arch["blocks"])):
    for j in range(2):
      s = root.child(f"_ResidualBlock_{block}", f"ResidualBlock_{block}", f"{stage}.{j}")
      residual_block(s, in_ch, mult * nf, i > 0 and j == 0, dilation)
      in_ch, block = mult * nf, block + 1
    feats.append(in_ch)

  # RefineBlocks from the deepest stage up; the JAX reference (and score_jax)
  # and the PyTorch twin may differ in width (see _NCSNV2).
  blocks = []
  prev = prev_t = None
  for j, (name, mult, tmult) in enumerate(zip(arch["refine"], arch["mult"], arch["torch_mult"])):
    feat = feats[len(feats) - 1 - j]
    ins = [feat] if prev is None else [feat, prev]
    tins = [feat] + ([] if prev_t is None else [prev_t])
    blocks.append((j, name, ins, tins, mult * nf, tmult * nf, j == len(feats) - 1))
    prev, prev_t = mult * nf, tmult * nf
  blocks.sort(key=lambda b: _NCSNV2_REFINE_ORDER.index(b[1]))
  for j, name, ins, tins, feat_out, tfeat_out, end in blocks:
    s = root.child(f"_RefineBlock_{j}", f"RefineBlock_{j}", name)
    n = len(ins)
    msf0 = 4 * n
    crp0 = msf0 + (n if n > 1 else 0)
    out0 = crp0 + 2
    # PyTorch order: adapt_convs, output_convs, msf, crp; score_jax and Flax
    # create adapt RCUs, MSF, CRP, output RCU (RCU: 2 x (act, 3x3 conv, no bias)).
    for i in range(n):
      for b in range(2):
        for st in range(2):
          out.conv(s.child(f"Conv_{4 * i + 2 * b + st}", f"RCUBlock_{i}/Conv_{2 * b + st}",
                           f"adapt_convs.{i}.{b + 1}_{st + 1}_conv"),
                   ins[i], ins[i], bias=False, torch_io=(tins[i], tins[i]))
    for b in range(3 if end else 1):
      for st in range(2):
        out.conv(s.child(f"Conv_{out0 + 2 * b + st}", f"RCUBlock_{n}/Conv_{2 * b + st}",
                         f"output_convs.{b + 1}_{st + 1}_conv"),
                 feat_out, feat_out, bias=False, torch_io=(tfeat_out, tfeat_out))
    if n > 1:
      for i in range(n):
        out.conv(s.child(f"Conv_{msf0 + i}", f"MSFBlock_0/Conv_{i}", f"msf.convs.{i}"),
                 ins[i], feat_out, torch_io=(tins[i], tfeat_out))
    for st in range(2):
      out.conv(s.child(f"Conv_{crp0 + st}", f"CRPBlock_0/Conv_{st}", f"crp.convs.{st}"),
               feat_out, feat_out, bias=False, torch_io=(tfeat_out, tfeat_out))
  return out.params


# ---------------------------------------------------------------------------
# Specs


@dataclasses.dataclass(frozen=True)
class Spec:
  """Every tensor of a config's reference network in one format, in file order.

  Attributes:
    fmt, family: 'pytorch' | 'flax'; 'ncsnpp' | 'ddpm' | 'ncsnv2'.
    entries: the network's parameters.
    noise_levels: the config's (model.sigma_max, model.sigma_min,
      model.num_scales), from which the PyTorch networks' `sigmas` buffer
      was made; None where the config lacks them.
  """
  fmt: str
  family: str
  entries: Tuple[Entry, ...]
  noise_levels: Optional[Tuple[float, float, int]] = None

  def by_name(self) -> Dict[str, Entry]:
    return {e.name: e for e in self.entries}

  def sigmas(self) -> Optional[np.ndarray]:
    """The reference's `get_sigmas(config)`: float64 [num_scales], largest first."""
    if self.noise_levels is None:
      return None
    sigma_max, sigma_min, num_scales = self.noise_levels
    return _get_sigmas(sigma_max, sigma_min, num_scales)


def _get_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> np.ndarray:
  """The reference's models/utils.py get_sigmas."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


# Buffers the PyTorch networks register beside their parameters. They are in
# the state dict but not in model.parameters() (nor in the EMA's list).
PYTORCH_BUFFERS = ("sigmas",)


def _as_settings(config: Any) -> Any:
  """Settings of a ConfigDict (this module's functions are entry points); settings as they are."""
  from score_jax import settings as settings_lib
  return config if isinstance(config, settings_lib.Settings) else settings_lib.from_config(config)


def _model_and_shape(s: Any):
  from score_jax import programs
  return programs.get_model(s), s.data.shape(1)


def reference_spec(config: ml_collections.ConfigDict, fmt: str) -> Spec:
  """The reference network's tensors for `config` in format `fmt` ('pytorch' | 'flax').

  Pure Python: no arrays are made.

  Raises:
    ValueError: unknown format.
    UnsupportedConfigError: a network the reference has no weights for
      (class-conditional, MLP, or a PyTorch variant whose layers score_jax lacks).
  """
  from score_jax.models.ncsnpp import NCSNpp
  from score_jax.models.ncsnv2 import NCSNv2

  if fmt not in FORMATS:
    raise ValueError(f"Unknown reference format {fmt!r}; choose from {FORMATS}.")
  config = _as_settings(config)
  model, shape = _model_and_shape(config)
  name = config.model.name.lower()
  if int(getattr(model, "num_classes", 0) or 0) > 0:
    raise UnsupportedConfigError("The reference's networks are not class-conditional; set "
                                 "model.num_classes = 0 to convert its checkpoints.")
  if len(shape) != 4:
    raise UnsupportedConfigError(f"model.name={name!r}: the reference released no checkpoints "
                                 "of this network (only NCSN++, DDPM++, DDPM and NCSNv2).")
  _, image_size, _, channels = shape
  if isinstance(model, NCSNpp):
    if not model.conditional and model.embedding_type == "fourier":
      raise UnsupportedConfigError(
          "model.conditional = False with Fourier embeddings: the reference keeps the Fourier "
          "features' W, which score_jax's unconditional network does not have.")
    if fmt == "pytorch" and not model.conditional:
      raise UnsupportedConfigError(
          "model.conditional = False: the PyTorch twin still gives every residual block a "
          "time-embedding layer, which score_jax's unconditional network does not have.")
    params = _ncsnpp_params(model, image_size, channels)
    family = "ddpm" if name == "ddpm" else "ncsnpp"
  elif isinstance(model, NCSNv2):
    if fmt == "pytorch" and model.normalization != "InstanceNorm++":
      raise UnsupportedConfigError(
          f"normalization={model.normalization!r}: the PyTorch twin's plain InstanceNorm has no "
          "parameters (score_jax's has a scale and a bias); convert the Flax checkpoint.")
    params = _ncsnv2_params(model, image_size, channels)
    family = "ncsnv2"
  else:
    raise UnsupportedConfigError(f"model.name={name!r} has no reference checkpoints.")
  levels = tuple(getattr(config.model, k, None) for k in ("sigma_max", "sigma_min", "num_scales"))
  noise_levels = None if None in levels else (float(levels[0]), float(levels[1]), int(levels[2]))
  entries = []
  for p in params:
    if fmt == "pytorch":
      entries.append(Entry(p.ours, p.shape, p.torch, p.torch_shape, p.kind, p.trainable))
    else:
      entries.append(Entry(p.ours, p.shape, p.flax, _ref_layout_shape(p.kind, "flax", p.shape),
                           p.kind, p.trainable))
  return Spec(fmt, family, tuple(entries), noise_levels)


def reference_shapes(spec: Spec) -> Dict[str, Shape]:
  """{reference name: shape} in file order: what a checkpoint of this network holds."""
  return {e.name: e.ref_shape for e in spec.entries}


def check_spec(spec: Spec, config: ml_collections.ConfigDict) -> None:
  """Checks that the spec's score_jax side is exactly the network's parameters.

  Uses `jax.eval_shape` of the network's initialization (no memory, no FLOPs).

  Raises:
    RuntimeError: the walk and the network disagree (a bug in this module).
  """
  from flax import traverse_util
  from score_jax.models import init_model

  config = _as_settings(config)
  model, shape = _model_and_shape(config)
  tree = jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))["params"]
  have = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
  want = {"/".join(e.ours): e.shape for e in spec.entries}
  if have != want or len(want) != len(spec.entries):
    diff = sorted(f"{k} {v}" for k, v in set(have.items()) ^ set(want.items()))
    raise RuntimeError(f"score_jax.convert's map of {config.model.name!r} disagrees with the "
                       f"network's parameters at: {_names(diff)}")


def _names(names: Sequence[str], limit: int = 16) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_tensors(found: Mapping[str, Sequence[int]], spec: Spec, source: str = "the checkpoint") -> None:
  """Checks that `found` ({name: shape}) holds exactly the spec's reference tensors.

  Raises:
    ReferenceLayoutError: naming every missing, unexpected and misshapen tensor.
  """
  expected = reference_shapes(spec)
  missing = [n for n in expected if n not in found]
  extra = [n for n in found if n not in expected]
  wrong = [f"{n} {tuple(found[n])} (expected {expected[n]})" for n in expected
           if n in found and tuple(found[n]) != expected[n]]
  if not (missing or extra or wrong):
    return
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing: {_names(missing)}")
  if extra:
    parts.append(f"{len(extra)} unexpected: {_names(extra)}")
  if wrong:
    parts.append(f"{len(wrong)} with other shapes: {_names(wrong)}")
  raise ReferenceLayoutError(
      f"{source} is not a {spec.fmt} checkpoint of this config's {spec.family} network "
      f"({len(expected)} tensors expected); nothing was converted. " + "; ".join(parts) +
      ". Is --config the config the checkpoint was trained with (e.g. model.nf, ch_mult, "
      "num_res_blocks, data.image_size)?")


def check_sigmas(found: Any, spec: Spec, source: str = "the checkpoint") -> None:
  """Checks a PyTorch network's `sigmas` buffer against the config's noise levels.

  Args:
    found: the buffer (any array-like), as the reference's `get_sigmas(config)`
      made it at training time.
    spec: from `reference_spec(config, 'pytorch')`; nothing is checked where the
      config has no noise levels.
  Raises:
    ReferenceLayoutError: the buffer is not the config's get_sigmas (relative
      tolerance 1e-5: a float32 copy passes), naming the file's and the config's
      model.sigma_max, sigma_min and num_scales.
  """
  expected = spec.sigmas()
  if expected is None:
    return
  try:
    found = np.asarray(found, np.float64)
  except (TypeError, ValueError):
    raise ReferenceLayoutError(f"{source}: its sigmas buffer is not numeric ({type(found).__name__}); "
                               "nothing was converted.") from None
  if found.shape == expected.shape and np.allclose(found, expected, rtol=1e-5, atol=0.0):
    return
  sigma_max, sigma_min, num_scales = spec.noise_levels
  ours = {"sigma_max": sigma_max, "sigma_min": sigma_min, "num_scales": num_scales}
  if found.ndim != 1 or found.size < 2 or not np.all(np.isfinite(found)) or np.any(found <= 0):
    raise ReferenceLayoutError(
        f"{source}: its sigmas buffer (shape {found.shape}) is not a list of noise levels "
        f"get_sigmas could have made; this config's is {num_scales} levels from sigma_max="
        f"{sigma_max:g} down to sigma_min={sigma_min:g}. Nothing was converted.")
  theirs = {"sigma_max": float(found[0]), "sigma_min": float(found[-1]), "num_scales": int(found.size)}
  geometric = np.allclose(found, _get_sigmas(*theirs.values()), rtol=1e-5, atol=0.0)
  differ = [k for k in ours if not np.isclose(theirs[k], ours[k], rtol=1e-5, atol=0.0)]
  show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  if differ and geometric:
    keys = "; ".join(f"model.{k}: {show(theirs[k])} in the checkpoint, {show(ours[k])} in the config"
                     for k in differ)
    fix = " ".join(f"--config.model.{k}={show(theirs[k])}" for k in differ)
    raise ReferenceLayoutError(
        f"{source}: the network's sigmas buffer (the reference's get_sigmas of the config it was "
        f"trained with) does not match this config's noise levels ({keys}). Nothing was converted: "
        f"pass the config the checkpoint was trained with, or override {fix}.")
  raise ReferenceLayoutError(
      f"{source}: the network's sigmas buffer ({found.size} levels from {found[0]:g} to "
      f"{found[-1]:g}) is not get_sigmas(model.sigma_max={show(sigma_max)}, model.sigma_min="
      f"{show(sigma_min)}, model.num_scales={num_scales}) of this config"
      + ("" if geometric else ", nor of any other (the levels are not geometric)")
      + "; nothing was converted.")


def check_compatible(spec: Spec) -> None:
  """Checks that every reference tensor fits score_jax's tensor after the layout change.

  Raises:
    UnsupportedConfigError: the reference network's widths differ from
      score_jax's for this config (the PyTorch twin's NCSNv2 below 96 px).
  """
  bad = [f"{e.name} {e.ref_shape} (score_jax {'/'.join(e.ours)} {e.shape})" for e in spec.entries
         if _ref_layout_shape(e.kind, spec.fmt, e.shape) != e.ref_shape]
  if bad:
    hint = ""
    if spec.family == "ncsnv2":
      hint = (" score_jax's NCSNv2 follows the JAX reference, whose third RefineBlock is 2 nf "
              "wide; the PyTorch twin's is nf wide. Convert the JAX (--from=flax) checkpoint.")
    raise UnsupportedConfigError(
        f"The {spec.fmt} reference network of this config differs from score_jax's in "
        f"{len(bad)} tensors: {_names(bad)}.{hint}")


def tensors_to_params(tensors: Mapping[str, Any], spec: Spec) -> Dict[str, Any]:
  """Reference tensors -> score_jax's nested params (float32).

  Works on numpy arrays, and under `jax.eval_shape` on abstract arrays.
  Call `check_tensors` first; this checks only compatibility.
  """
  check_compatible(spec)
  params: Dict[str, Any] = {}
  for e in spec.entries:
    a = tensors[e.name]
    if isinstance(a, np.ndarray):
      if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        raise ReferenceLayoutError(f"{e.name} has dtype {a.dtype}, not floating point.")
      a = np.ascontiguousarray(_to_ours(e.kind, spec.fmt, a.astype(np.float32)))
    else:
      a = _to_ours(e.kind, spec.fmt, a).astype(np.float32)
    node = params
    for key in e.ours[:-1]:
      node = node.setdefault(key, {})
    node[e.ours[-1]] = a
  return params


def params_to_tensors(params: Mapping[str, Any], spec: Spec) -> Dict[str, np.ndarray]:
  """score_jax params -> {reference name: array in the reference layout}, in file order."""
  check_compatible(spec)
  out: Dict[str, np.ndarray] = {}
  for e in spec.entries:
    node: Any = params
    for key in e.ours:
      node = node[key]
    out[e.name] = np.ascontiguousarray(_to_ref(e.kind, spec.fmt, np.asarray(node)))
  return out


# ---------------------------------------------------------------------------
# Reading reference files


def _flatten_flax(tree: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in files.flatten(tree).items()}


def _as_step(value: Any) -> Optional[int]:
  if value is None:
    return None
  try:
    return int(np.asarray(value).reshape(-1)[0])
  except (TypeError, ValueError, IndexError):
    return None


def _load_flax(path: str, spec: Spec, weights: str) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  from flax import serialization

  with open(path, "rb") as f:
    raw = f.read()
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as e:  # noqa: BLE001 - any decoding failure means "not this format"
    raise ReferenceLayoutError(f"{path} is not a Flax msgpack checkpoint ({type(e).__name__}: "
                               f"{e}); for a .pth file use --from=pytorch.") from None
  if not isinstance(state, Mapping):
    raise ReferenceLayoutError(f"{path}: expected a training state dict, found {type(state).__name__}.")
  target = state.get("optimizer", {}).get("target") if isinstance(state.get("optimizer"), Mapping) else None
  ema = state.get("params_ema")
  if weights == "ema" and ema is None and target is not None:
    logging.warning("%s has no params_ema; converting the raw weights (optimizer.target).", path)
  tree, used = (ema, "ema") if weights == "ema" and ema is not None else (target, "model")
  if tree is None:
    raise ReferenceLayoutError(f"{path} has neither params_ema nor optimizer.target (top-level "
                               f"keys: {sorted(state)}); it is not a score_sde training checkpoint.")
  if set(tree) == {"params"}:  # variables collection rather than bare params
    tree = tree["params"]
  tensors = _flatten_flax(tree)
  check_tensors({k: v.shape for k, v in tensors.items()}, spec,
                f"{path} ({'params_ema' if used == 'ema' else 'optimizer.target'})")
  return tensors, _as_step(state.get("step")), used


def _load_pytorch(path: str, spec: Spec, weights: str) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  from score_jax import torch_pickle

  try:
    obj = torch_pickle.load(path)
  except (pickle.UnpicklingError, ValueError, EOFError, KeyError) as e:
    raise ReferenceLayoutError(
        f"score_jax's torch-free reader cannot read {path} ({type(e).__name__}: {e}). For the "
        "reference's Flax checkpoint_<n> use --from=flax. A PyTorch checkpoint holding other "
        "objects than tensors can be slimmed with torch: "
        "c = torch.load(SRC); torch.save({'model': c['model'], 'ema': c['ema'], 'step': "
        "c['step']}, 'slim.pth').") from None
  if not isinstance(obj, Mapping):
    raise ReferenceLayoutError(f"{path}: expected a dict, found {type(obj).__name__}.")
  if "model" in obj:
    model = obj["model"]
  elif obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    model = obj  # a bare state dict
  else:
    raise ReferenceLayoutError(f"{path} has no 'model' state dict (top-level keys: {sorted(map(str, obj))}).")
  model = collections.OrderedDict((str(k), np.asarray(v)) for k, v in model.items()
                                  if isinstance(v, np.ndarray))
  if model and all(k.startswith("module.") for k in model):  # DataParallel
    model = collections.OrderedDict((k[len("module."):], v) for k, v in model.items())
  expected = spec.by_name()
  # The buffers (sigmas) are not parameters; what is left is model.parameters()
  # in their order. A file without them (a slimmed state dict) is accepted.
  buffers = {n: model.pop(n) for n in PYTORCH_BUFFERS if n in model and n not in expected}
  check_tensors({k: v.shape for k, v in model.items()}, spec, f"{path} (model)")
  if "sigmas" in buffers:
    check_sigmas(buffers["sigmas"], spec, path)
  step = _as_step(obj.get("step"))
  ema = obj.get("ema")
  shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
  if weights != "ema" or shadow is None:
    if weights == "ema":
      logging.warning("%s has no EMA weights; converting the raw model weights.", path)
    return dict(model), step, "model"
  # The EMA keeps the trainable tensors in the order of model.parameters(),
  # which is the state dict's order without its buffers (removed above).
  order = [n for n in model if expected[n].trainable]
  if len(shadow) != len(order):
    raise ReferenceLayoutError(
        f"{path}: ema.shadow_params holds {len(shadow)} tensors, the model {len(order)} trainable "
        "ones; nothing was converted (convert the raw weights with --weights=model).")
  tensors = dict(model)
  bad = []
  for i, (name, value) in enumerate(zip(order, shadow)):
    value = np.asarray(value)
    if value.shape != model[name].shape:
      bad.append(f"ema.shadow_params.{i} {value.shape} (for {name} {model[name].shape})")
    tensors[name] = value
  if bad:
    raise ReferenceLayoutError(f"{path}: EMA tensors do not fit the model's: {_names(bad)}; "
                               "nothing was converted.")
  return tensors, step, "ema"


def load_reference(path: str, spec: Spec, weights: str = "ema"
                   ) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  """Reads a reference checkpoint and checks its tensors against `spec`.

  Args:
    path: `checkpoint_<n>` (Flax) or `checkpoint_<n>.pth` (PyTorch) file.
    spec: from `reference_spec(config, fmt)`.
    weights: 'ema' (the EMA weights, or the raw ones with a warning where
      the file has none) or 'model' (the raw weights).
  Returns:
    ({reference name: array}, the file's training step or None, 'ema' | 'model').
  Raises:
    FileNotFoundError: no such file.
    ReferenceLayoutError: unreadable, or tensors missing, unexpected or misshapen.
  """
  if weights not in ("ema", "model"):
    raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}.")
  loader = _load_pytorch if spec.fmt == "pytorch" else _load_flax
  return loader(path, spec, weights)


# ---------------------------------------------------------------------------
# Writing the score_jax workdir


def _existing_steps(ckpt_dir: str) -> List[str]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(os.listdir(ckpt_dir))


def write_workdir(dst: str, config: ml_collections.ConfigDict, params: Mapping[str, Any],
                  step: int) -> str:
  """Writes `params` as checkpoint `step` of workdir `dst` (params = EMA params).

  The workdir is assembled in a temporary folder beside `dst` and renamed
  into place, so an interrupted conversion leaves no partial `dst`.

  Returns:
    The checkpoint folder, dst/checkpoints/<step>.
  Raises:
    FileExistsError: dst/checkpoints already holds something.
  """
  import jax.numpy as jnp
  from score_jax import checkpoints, programs, train

  config = _as_settings(config)
  dst = os.path.abspath(dst)
  ckpt_dir = os.path.join(dst, "checkpoints")
  if _existing_steps(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} already holds {_names(_existing_steps(ckpt_dir))}; "
                          "refusing to write a converted checkpoint beside (or over) them. "
                          "Choose a new DST.")
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise FileExistsError(f"{dst} exists and is not a folder.")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
  try:
    params = jax.device_put(params)
    tx = programs.get_optimizer(config)
    state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params), ema_params=params)
    ck = checkpoints.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
    try:
      ck.save(step, state)
    finally:
      ck.close()
    train.save_config(config, tmp)
    if not os.path.exists(dst):
      os.rename(tmp, dst)  # atomic: dst appears complete or not at all
    else:  # an existing workdir without checkpoints: move ours in
      os.rename(os.path.join(tmp, "checkpoints"), ckpt_dir)  # (replaces an empty folder)
      if not os.path.exists(os.path.join(dst, "config.json")):
        os.replace(os.path.join(tmp, "config.json"), os.path.join(dst, "config.json"))
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(ckpt_dir, str(step))


def convert(src: str, dst: str, config: ml_collections.ConfigDict, fmt: str, *,
            weights: str = "ema", step: Optional[int] = None) -> Dict[str, Any]:
  """Converts a reference checkpoint into score_jax workdir `dst`.

  Args:
    src: the reference's `checkpoint_<n>` (fmt 'flax') or `.pth` (fmt 'pytorch').
    dst: workdir to create (or one without checkpoints).
    config: the paper config the checkpoint was trained with.
    fmt: 'pytorch' | 'flax'.
    weights: 'ema' (preferred) | 'model'.
    step: step to store the checkpoint at; default the file's training step
      (training.snapshot_freq where the file has none).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step': step, 'weights': 'ema' | 'model',
     'tensors': number converted}.
  Raises:
    FileExistsError, FileNotFoundError, ReferenceLayoutError, UnsupportedConfigError.
  """
  config = _as_settings(config)
  spec = reference_spec(config, fmt)
  check_compatible(spec)
  check_spec(spec, config)
  existing = _existing_steps(os.path.join(os.path.abspath(dst), "checkpoints"))
  if existing:  # fail before the (long) read
    raise FileExistsError(f"{dst}/checkpoints already holds {_names(existing)}; choose a new DST.")
  tensors, file_step, used = load_reference(src, spec, weights)
  params = tensors_to_params(tensors, spec)
  del tensors
  if step is None:
    step = file_step if file_step else config.training.snapshot_freq
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  path = write_workdir(dst, config, params, int(step))
  return {"checkpoint": path, "step": int(step), "weights": used, "tensors": len(spec.entries)}


# ---------------------------------------------------------------------------
# Command line


_USAGE = ("python -m score_jax.convert --from=pytorch|flax --config=configs/<paper config>.py "
          "[--weights=ema|model] [--step=N] SRC DST")


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  # sys_argv: the --config.<key>=value overrides are found in argv, not sys.argv.
  config_flags.DEFINE_config_file("config", None, "The paper config SRC was trained with.",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_enum("from", None, list(FORMATS), "Format of SRC: the reference's Flax "
                    "checkpoint_<n> or its PyTorch twin's checkpoint_<n>.pth.", flag_values=fv)
  flags.DEFINE_enum("weights", "ema", ["ema", "model"], "EMA weights (preferred) or the raw ones.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Step of the written checkpoint (default: SRC's step).",
                       flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m score_jax.convert ... SRC DST`; returns the exit status."""
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  _define_flags(fv, argv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    print(f"{e}\nusage: {_USAGE}", file=sys.stderr)
    return 2
  if len(rest) != 3 or fv["from"].value is None or fv.config is None:
    print(f"usage: {_USAGE}", file=sys.stderr)
    return 2
  config, (src, dst) = fv.config, rest[1:]
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  try:
    result = convert(src, dst, config, fv["from"].value, weights=fv.weights, step=fv.step)
  except (FileExistsError, FileNotFoundError, ReferenceLayoutError, UnsupportedConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  step, freq = result["step"], int(config.training.snapshot_freq)
  config_path = config_flags.get_config_filename(fv["config"])
  print(f"Wrote {result['checkpoint']} ({result['tensors']} tensors, {result['weights']} weights).")
  print(f"Sample: python main.py --config={config_path} --workdir={dst} --mode=sample")
  if step > 0 and step % freq == 0:
    k = step // freq
    print(f"Evaluate: python main.py --config={config_path} --workdir={dst} --mode=eval "
          f"--config.eval.begin_ckpt={k} --config.eval.end_ckpt={k}")
  else:
    print(f"(--mode=eval numbers checkpoints by step / training.snapshot_freq = {freq}; "
          f"rerun with --step=<a multiple of {freq}> to evaluate this one.)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
