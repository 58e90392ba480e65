"""The 2021 reference's networks as explicit lists of tensors: the map `score_jax.convert.reference` uses.

`reference_spec(config, fmt)` walks the config's architecture in the
reference's construction order (the order of `all_modules` and of
`model.parameters()`) and returns one `Entry` per tensor: its path in
score_jax's parameters, its name and shape in the reference's Flax or PyTorch
file, and the layout change between them. `check_spec` compares the walk with
`jax.eval_shape` of score_jax's own initialization. Layouts: PyTorch
convolutions are OIHW (score_jax and Flax: HWIO), `nn.Linear` weights are
[out, in] (Dense kernels [in, out]), the reference's NIN layers are score_jax
Dense layers with the same [in, out] matrix, GroupNorm's weight is Flax's
scale, and the Flax reference's InstanceNorm++ parameters have shape
[1, 1, 1, C] (score_jax [C]).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from score_jax.errors import UserError

__all__ = ["FORMATS", "Entry", "Spec", "ReferenceLayoutError", "UnsupportedConfigError",
           "PYTORCH_BUFFERS", "as_settings", "reference_spec", "reference_shapes", "check_spec",
           "check_entries"]

def _names(names: Sequence[str], limit: int = 16) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_entries(entries: Sequence["Entry"], model: Any, shape: Sequence[int],
                  what: str) -> None:
  """A converter's map (entries' `ours` paths and shapes) against `jax.eval_shape` of the
  network's initialization; `what` names the converter and network in the error.

  Raises:
    RuntimeError: they disagree (a bug in that converter).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from score_jax.models import init_model  # pylint: disable=g-import-not-at-top

  tree = jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))["params"]
  have = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
  want = {"/".join(e.ours): e.shape for e in entries}
  if have != want or len(want) != len(entries):
    diff = sorted(f"{k} {v}" for k, v in set(have.items()) ^ set(want.items()))
    raise RuntimeError(f"{what} disagrees at: {_names(diff)}")


def mismatch(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]
             ) -> List[str]:
  """What differs between a file's tensor shapes and the expected ones, one phrase per kind
  ('3 missing: a, b, c'); empty when they are the same."""
  missing = [n for n in expected if n not in found]
  extra = [n for n in found if n not in expected]
  wrong = [f"{n} {tuple(found[n])} (expected {tuple(expected[n])})" for n in expected
           if n in found and tuple(found[n]) != tuple(expected[n])]
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing: {_names(missing)}")
  if extra:
    parts.append(f"{len(extra)} unexpected: {_names(extra)}")
  if wrong:
    parts.append(f"{len(wrong)} with other shapes: {_names(wrong)}")
  return parts


FORMATS = ("pytorch", "flax")
Shape = Tuple[int, ...]


class ReferenceLayoutError(UserError, ValueError):
  """A file's tensors are not exactly those of the config's reference network."""


class UnsupportedConfigError(UserError, ValueError):
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


def as_settings(config: Any) -> Any:
  """Settings of a ConfigDict (this module's functions are entry points); settings as they are."""
  from score_jax.run import settings as settings_lib
  return config if isinstance(config, settings_lib.Settings) else settings_lib.from_config(config)


def _model_and_shape(s: Any):
  from score_jax.run import builders
  return builders.get_model(s), s.data.shape(1)


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
  config = as_settings(config)
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

  config = as_settings(config)
  model, shape = _model_and_shape(config)
  tree = jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))["params"]
  have = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
  want = {"/".join(e.ours): e.shape for e in spec.entries}
  if have != want or len(want) != len(spec.entries):
    diff = sorted(f"{k} {v}" for k, v in set(have.items()) ^ set(want.items()))
    raise RuntimeError(f"score_jax.convert.reference's map of {config.model.name!r} disagrees with the "
                       f"network's parameters at: {_names(diff)}")
