"""`python -m score_jax.convert.inception SRC [DST]`: pytorch-fid's published FID Inception
weights (.pth, read without torch) -> the .npz that `score_jax.metrics.inception` loads.

SRC is pt_inception-2015-12-05-6726825d.pth, downloaded from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Without DST the weights go to ~/.cache/score_jax/inception/inception_fid.npz
($XDG_CACHE_HOME/score_jax/... when set), where --mode=eval finds them when
eval.inception_path is empty."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import numpy as np

from score_jax.convert import torch_pickle
from score_jax.metrics import inception
from score_jax.metrics.inception import PUBLISHED_WEIGHTS, Params
from score_jax.run import cli

__all__ = ["convert_pth", "main"]


def convert_pth(src: str | os.PathLike, dst: str | os.PathLike) -> Params:
  """Converts pytorch-fid's .pth (zip or legacy torch format) to our .npz."""
  state = torch_pickle.load_state_dict(src)
  params = inception.convert_torch_state_dict(state)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  inception.save_inception_params(dst, params)
  return params


_USAGE = (f"python -m score_jax.convert.inception SRC [DST]  (SRC: pytorch-fid's "
          f"{PUBLISHED_WEIGHTS}; DST default: {inception.default_weights_path()})")


def _define_flags(fv, argv) -> None:
  del fv, argv  # positional arguments only: SRC and DST


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m score_jax.convert.inception SRC [DST]`: the published .pth -> the documented
  .npz (DST default: `inception.default_weights_path()`, where eval looks).

  argv: the arguments after the program name (default sys.argv[1:]).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  num_args = 1 if len([a for a in argv if not a.startswith("-")]) == 1 else 2
  parsed = cli.parse(["score_jax.convert.inception", *argv], _define_flags, _USAGE, num_args,
                     doc=__doc__)
  if parsed is None:
    return cli.USAGE_ERROR
  _, paths = parsed
  src, dst = paths[0], (paths[1] if len(paths) == 2 else inception.default_weights_path())

  def run() -> int:
    try:
      params = convert_pth(src, dst)
    except ValueError as e:  # not the FID Inception weights: the message lists what differs
      print(f"error: {e}", file=sys.stderr)
      return cli.USER_ERROR
    n = sum(int(np.prod(s)) for s in inception.param_shapes().values())
    print(f"wrote {dst}: {len(jax.tree_util.tree_leaves(params))} arrays, {n:,} parameters")
    if os.path.abspath(dst) == os.path.abspath(inception.default_weights_path()):
      print("--mode=eval finds them there when eval.inception_path is empty.")
    else:
      print(f"Use them with --config.eval.inception_path={dst}")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  sys.exit(main())
