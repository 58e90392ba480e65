"""`python -m score_jax.convert --from=pytorch|flax|edm|edm2|dit|sit --config=... SRC DST`: a
checkpoint of the 2021 reference (Flax or PyTorch), an NVlabs/edm or NVlabs/edm2 network pickle,
or a facebookresearch/DiT or willisma/SiT checkpoint -> a score_jax workdir."""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

import ml_collections

from score_jax.convert.reference_layout import FORMATS

__all__ = ["convert", "main"]


def convert(src: str, dst: str, config: ml_collections.ConfigDict, fmt: str, *,
            weights: str = "ema", step: Optional[int] = None) -> Dict[str, Any]:
  """`reference.convert` (fmt 'pytorch' | 'flax'), `edm.convert` (fmt 'edm'), `edm2.convert`
  (fmt 'edm2'), `dit.convert` (fmt 'dit') or `sit.convert` (fmt 'sit')."""
  if fmt == "sit":
    from score_jax.convert import sit  # pylint: disable=g-import-not-at-top
    return sit.convert(src, dst, config, weights=weights, step=step)
  if fmt == "dit":
    from score_jax.convert import dit  # pylint: disable=g-import-not-at-top
    return dit.convert(src, dst, config, weights=weights, step=step)
  if fmt == "edm2":
    from score_jax.convert import edm2  # pylint: disable=g-import-not-at-top
    return edm2.convert(src, dst, config, weights=weights, step=step)
  if fmt == "edm":
    from score_jax.convert import edm  # pylint: disable=g-import-not-at-top
    return edm.convert(src, dst, config, weights=weights, step=step)
  from score_jax.convert import reference  # pylint: disable=g-import-not-at-top
  return reference.convert(src, dst, config, fmt, weights=weights, step=step)


# ---------------------------------------------------------------------------
# Command line


_USAGE = ("python -m score_jax.convert --from=pytorch|flax|edm|edm2|dit|sit "
          "--config=configs/<paper config>.py [--weights=ema|model] [--step=N] SRC DST")


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  # sys_argv: the --config.<key>=value overrides are found in argv, not sys.argv.
  config_flags.DEFINE_config_file("config", None, "The paper config SRC was trained with.",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_enum("from", None, list(FORMATS) + ["edm", "edm2", "dit", "sit"],
                    "Format of SRC: the reference's Flax checkpoint_<n>, its PyTorch twin's "
                    "checkpoint_<n>.pth, an NVlabs/edm or NVlabs/edm2 network pickle (.pkl), or a "
                    "facebookresearch/DiT or willisma/SiT checkpoint or released network (.pt).",
                    flag_values=fv)
  flags.DEFINE_enum("weights", "ema", ["ema", "model"], "EMA weights (preferred) or the raw ones.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Step of the written checkpoint (default: SRC's step).",
                       flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m score_jax.convert ... SRC DST`; returns the exit status (score_jax.run.cli)."""
  from score_jax.run import cli

  argv = list(sys.argv if argv is None else argv)
  parsed = cli.parse(argv, _define_flags, _USAGE, 2, doc=__doc__)
  if parsed is None or parsed[0]["from"].value is None or parsed[0].config is None:
    if parsed is not None:
      print(f"usage: {_USAGE}", file=sys.stderr)
    return cli.USAGE_ERROR
  fv, (src, dst) = parsed
  config = fv.config
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines

  def run() -> int:
    result = convert(src, dst, config, fv["from"].value, weights=fv.weights, step=fv.step)
    freq = int(config.training.snapshot_freq)
    print(f"Wrote {result['checkpoint']} ({result['tensors']} tensors, {result['weights']} "
          "weights).")
    cli.print_next_steps(dst, result["step"],
                         f"rerun with --step=<a multiple of {freq}> to evaluate this one")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  sys.exit(main())
