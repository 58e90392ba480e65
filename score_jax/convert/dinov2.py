"""`python -m score_jax.convert.dinov2 SRC [DST] [--num_heads=N]`: DINOv2's published ViT
weights (.pth, read without torch) -> the .npz that `score_jax.metrics.dinov2` loads.

SRC is dinov2_vitl14_pretrain.pth (the file torch.hub.load('facebookresearch/dinov2',
'dinov2_vitl14') downloads), from
https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth
Without DST the weights go to ~/.cache/score_jax/dinov2/dinov2_vitl14.npz
($XDG_CACHE_HOME/score_jax/... when set), where --mode=eval finds them when eval.dinov2_path
is empty. --num_heads: attention heads (default: width / 64, as every published DINOv2 ViT;
16 for ViT-L/14)."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from score_jax import files
from score_jax.convert import torch_pickle
from score_jax.metrics import dinov2
from score_jax.metrics.dinov2 import PUBLISHED_WEIGHTS, Arch, Params

__all__ = ["convert_pth", "convert_torch_state_dict", "converted_shapes", "main"]

HEAD_DIM = 64  # every published DINOv2 ViT (S, B, L, g) has 64-wide heads
_SKIPPED = ("mask_token",)  # masked-image training only; inference never reads it

_Transform = Callable[[np.ndarray], np.ndarray]


def _same(a):
  return a


def _linear(a):  # [out, in] -> [in, out]
  return a.T


def _conv(a):  # [out, in, kh, kw] -> [kh, kw, in, out]
  return a.transpose(2, 3, 1, 0)


def _map(name: str, ndim: int) -> Optional[Tuple[str, _Transform]]:
  """(our flat name, array transform) of one published tensor; None: not part of the ViT."""
  parts = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1.", name).split(".")
  leaf = parts[-1]
  if name in ("cls_token", "pos_embed"):
    return name, _same
  if name == "patch_embed.proj.weight" and ndim == 4:
    return "patch_embed/proj/kernel", _conv
  if leaf == "gamma" and len(parts) == 3 and parts[1] in ("ls1", "ls2"):
    return "/".join(parts), _same
  if leaf not in ("weight", "bias") or len(parts) < 2:
    return None
  path = "/".join(parts[:-1])
  if parts[-2].startswith("norm"):
    return f"{path}/{'scale' if leaf == 'weight' else 'bias'}", _same
  if leaf == "bias":
    return f"{path}/bias", _same
  return (f"{path}/kernel", _linear) if ndim == 2 else None


def _mapped(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[Dict[str, Tuple[str, _Transform]],
                                                           List[str]]:
  table, unmapped = {}, []
  for name, shape in shapes.items():
    if name in _SKIPPED:
      continue
    entry = _map(name, len(shape))
    if entry is None:
      unmapped.append(name)
    else:
      table[name] = entry
  return table, unmapped


def converted_shapes(shapes: Mapping[str, Sequence[int]]) -> Dict[str, Tuple[int, ...]]:
  """Our flat name -> shape of each published tensor name -> shape (the converter's mapping,
  without touching any array)."""
  table, unmapped = _mapped({k: tuple(v) for k, v in shapes.items()})
  if unmapped:
    raise ValueError(f"not part of a DINOv2 ViT: {', '.join(unmapped[:20])}")
  return {dst: fn(np.broadcast_to(np.float32(0), tuple(shapes[src]))).shape
          for src, (dst, fn) in table.items()}


def convert_torch_state_dict(state: Mapping[str, Any],
                             num_heads: Optional[int] = None) -> Tuple[Params, Arch]:
  """Maps a DINOv2 ViT state dict (the hub file's names) onto `score_jax.metrics.dinov2`.

  Linear `<m>.weight` [out, in] -> `<m>/kernel` [in, out]; the patch conv [D, 3, p, p] ->
  [p, p, 3, D]; LayerNorm `weight` -> `scale`; `blocks.<i>.` -> `blocks_<i>/`; `mask_token`
  (training only) is dropped. num_heads: default width / 64 (the published models).

  Raises:
    ValueError: listing every unmapped source name and every missing or mis-shaped parameter
      (register tokens and SwiGLU MLPs, of the other DINOv2 variants, are not supported).
  """
  table, unmapped = _mapped({k: np.shape(v) for k, v in state.items()})
  if unmapped:
    raise ValueError(f"source weights hold {len(unmapped)} tensors that are not part of a "
                     f"DINOv2 ViT with a plain MLP and no register tokens: "
                     f"{', '.join(unmapped[:20])}" + (" ..." if len(unmapped) > 20 else ""))
  flat = {dst: fn(np.asarray(state[src])) for src, (dst, fn) in table.items()}
  shapes = {k: v.shape for k, v in flat.items()}
  if num_heads is None:
    width = int(shapes.get("cls_token", (0,))[-1])
    num_heads = max(width // HEAD_DIM, 1)
  arch = dinov2.arch_from_shapes(shapes, num_heads)
  dinov2.check_shapes(shapes, arch, "converted source weights")
  params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  return files.unflatten(params), arch


def convert_pth(src: str | os.PathLike, dst: str | os.PathLike,
                num_heads: Optional[int] = None) -> Tuple[Params, Arch]:
  """Converts a DINOv2 ViT .pth (torch.save of its state dict) to our .npz."""
  params, arch = convert_torch_state_dict(torch_pickle.load_state_dict(src), num_heads)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  dinov2.save_dinov2_params(dst, params, arch)
  return params, arch


_USAGE = (f"python -m score_jax.convert.dinov2 SRC [DST] [--num_heads=N]  (SRC: "
          f"{PUBLISHED_WEIGHTS}; DST default: {dinov2.default_weights_path()})")


def _define_flags(fv, argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("num_heads", None, "Attention heads (default: width / 64, as every "
                       "published DINOv2 ViT).", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m score_jax.convert.dinov2 SRC [DST]`: the published .pth -> the documented .npz
  (DST default: `dinov2.default_weights_path()`, where eval looks).

  argv: the arguments after the program name (default sys.argv[1:]).
  """
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top

  argv = sys.argv[1:] if argv is None else list(argv)
  num_args = 1 if len([a for a in argv if not a.startswith("-")]) == 1 else 2
  parsed = cli.parse(["score_jax.convert.dinov2", *argv], _define_flags, _USAGE, num_args,
                     doc=__doc__)
  if parsed is None:
    return cli.USAGE_ERROR
  fv, paths = parsed
  src, dst = paths[0], (paths[1] if len(paths) == 2 else dinov2.default_weights_path())

  def run() -> int:
    try:
      params, arch = convert_pth(src, dst, fv.num_heads)
    except ValueError as e:  # not DINOv2 ViT weights: the message lists what differs
      print(f"error: {e}", file=sys.stderr)
      return cli.USER_ERROR
    n = sum(int(np.prod(s)) for s in dinov2.param_shapes(arch).values())
    print(f"wrote {dst}: {len(dinov2.param_shapes(arch))} arrays, {n:,} parameters ({arch})")
    del params
    if os.path.abspath(dst) == os.path.abspath(dinov2.default_weights_path()):
      print("--mode=eval finds them there when eval.dinov2_path is empty.")
    else:
      print(f"Use them with --config.eval.dinov2_path={dst}")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  sys.exit(main())
