"""The command-line style of every entry point (main.py, score_jax.convert,
score_jax.convert.phema, score_jax.metrics.inception).

absl flags on a FlagValues of their own (so a library module defines no
global flags when imported), positional arguments after them, and one line on
standard error for a mistake the user can fix: usage errors exit with 2,
user errors (`score_jax.errors.UserError`, a missing or existing file) with 1;
Ctrl-C prints one line (training's says which checkpoint it saved) and exits
with 130 (128 + SIGINT, the shell's convention); anything unexpected keeps its
traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple

from absl import flags

from score_jax.errors import UserError

__all__ = ["parse", "report_user_errors", "USAGE_ERROR", "USER_ERROR", "INTERRUPTED"]

USAGE_ERROR, USER_ERROR, INTERRUPTED = 2, 1, 130


def parse(argv: Optional[Sequence[str]], define: Callable[[flags.FlagValues, List[str]], None],
          usage: str, num_args: int) -> Optional[Tuple[flags.FlagValues, List[str]]]:
  """(flag values, positional arguments) of argv, or None after printing the usage line.

  define(fv, argv) declares the flags on fv; argv[0] is the program name.
  """
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  define(fv, argv)
  try:
    rest = fv(argv)[1:]
  except flags.Error as e:
    print(f"{e}\nusage: {usage}", file=sys.stderr)
    return None
  if len(rest) != num_args:
    print(f"usage: {usage}", file=sys.stderr)
    return None
  return fv, rest


def report_user_errors(fn: Callable[[], int]) -> int:
  """fn()'s exit status; a user error is printed in one line and gives USER_ERROR, Ctrl-C
  (KeyboardInterrupt) gives INTERRUPTED."""
  try:
    return fn()
  except (UserError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR
  except KeyboardInterrupt as e:
    print(str(e) or "Interrupted (Ctrl-C).", file=sys.stderr)
    return INTERRUPTED


def print_next_steps(config_arg: str, workdir: str, step: int, snapshot_freq: int,
                     otherwise: str) -> None:
  """Prints the main.py lines that sample and evaluate checkpoint `step` of a written workdir;
  --mode=eval numbers checkpoints by step / snapshot_freq, so it needs a multiple (else
  `otherwise`, a hint, follows the explanation)."""
  print(f"Sample: python main.py {config_arg} --workdir={workdir} --mode=sample")
  if step > 0 and step % snapshot_freq == 0:
    k = step // snapshot_freq
    print(f"Evaluate: python main.py {config_arg} --workdir={workdir} --mode=eval "
          f"--config.eval.begin_ckpt={k} --config.eval.end_ckpt={k}")
  else:
    print(f"(--mode=eval numbers checkpoints by step / training.snapshot_freq = {snapshot_freq}; "
          f"step {step} is not a multiple, so {otherwise}.)")
