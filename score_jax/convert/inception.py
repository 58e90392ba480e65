"""`python -m score_jax.convert.inception SRC DST`: pytorch-fid's published FID Inception
weights (.pth, read without torch) -> the .npz that `score_jax.metrics.inception` loads."""

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
  inception.save_inception_params(dst, params)
  return params


_USAGE = f"python -m score_jax.convert.inception SRC DST  (SRC: pytorch-fid's {PUBLISHED_WEIGHTS})"


def _define_flags(fv, argv) -> None:
  del fv, argv  # positional arguments only: SRC and DST


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m score_jax.convert.inception SRC DST`: the published .pth -> the documented .npz.

  argv: the arguments after the program name (default sys.argv[1:]).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  parsed = cli.parse(["score_jax.convert.inception", *argv], _define_flags, _USAGE, 2)
  if parsed is None:
    return cli.USAGE_ERROR
  _, (src, dst) = parsed

  def run() -> int:
    try:
      params = convert_pth(src, dst)
    except ValueError as e:  # not the FID Inception weights: the message lists what differs
      print(f"error: {e}", file=sys.stderr)
      return cli.USER_ERROR
    n = sum(int(np.prod(s)) for s in inception.param_shapes().values())
    print(f"wrote {dst}: {len(jax.tree_util.tree_leaves(params))} arrays, {n:,} parameters")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  sys.exit(main())
