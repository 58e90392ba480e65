"""The command-line style of every entry point (main.py, score_jax.convert,
score_jax.convert.phema, score_jax.convert.inception).

absl flags on a FlagValues of their own (so a library module defines no
global flags when imported), positional arguments after them, and one line on
standard error for a mistake the user can fix: usage errors exit with 2,
user errors (`score_jax.errors.UserError`, a missing or existing file) with 1;
Ctrl-C prints one line (training's says which checkpoint it saved) and exits
with 130 (128 + SIGINT, the shell's convention); anything unexpected keeps its
traceback. --help (-h, --helpfull) prints the
usage line and the flags and exits with 0.

`--config` (ml_collections' config file flag) is checked before absl parses
it (`check_config_argv`): a file that does not exist and an override of a key
the config lacks (`--config.training.n_iter=5`) are one line each, and a
workdir's own config.json is read as the config (through
`score_jax/run/workdir_config.py`), so a printed next command that names it
carries every override the run was made with.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from absl import flags

from score_jax.errors import UserError

__all__ = ["parse", "report_user_errors", "check_config_argv", "parse_main_argv",
           "print_next_steps", "next_steps", "ConfigArgError", "USAGE_ERROR", "USER_ERROR",
           "INTERRUPTED"]

USAGE_ERROR, USER_ERROR, INTERRUPTED = 2, 1, 130
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-helpshort")
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workdir_config.py")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_OVERRIDE_ARG = re.compile(r"^--?(no)?config\.([^=]+)")


class ConfigArgError(UserError, ValueError):
  """--config names no file, or an override names a key the config lacks."""


def _config_value(argv: Sequence[str]) -> Tuple[int, Optional[str]]:
  """(index in argv, value) of the --config argument; (-1, None) if absent."""
  for i, arg in enumerate(argv):
    if _CONFIG_ARG.match(arg):
      if "=" in arg:
        return i, arg.split("=", 1)[1]
      return i, (argv[i + 1] if i + 1 < len(argv) else None)
  return -1, None


def _key_error(config, path: str) -> Optional[str]:
  """Why `path` (a.b.c) names no key of config, or None if it does."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
      hint = f"; did you mean {'.'.join(done + close)}?" if close else (
          f"; its keys: {', '.join(sorted(map(str, keys)))}" if keys else "")
      return f"--config.{path}: {where} has no key {part!r}{hint}"
    node, done = node[part], done + [part]
  return None


def check_config_argv(argv: Sequence[str]) -> List[str]:
  """argv with --config checked before absl and ml_collections parse it.

  A config path that does not exist, or an override --config.a.b of a key the
  config lacks, raises ConfigArgError (one line naming the fix). A workdir's
  config.json becomes `workdir_config.py:<path>`, which loads it as the config.

  Raises:
    ConfigArgError: as above.
  """
  argv = list(argv)
  i, value = _config_value(argv)
  if value is None:
    return argv
  path = value.split(":", 1)[0]
  if not os.path.isfile(path):
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    raise ConfigArgError(f"--config={value} {what}; pass a config file, e.g. "
                         "--config=configs/toy.py, or a workdir's config.json.")
  if path.endswith(".json"):
    value = f"{WORKDIR_CONFIG}:{value}"
    if "=" in argv[i]:
      argv[i] = f"{argv[i].split('=', 1)[0]}={value}"
    else:
      argv[i + 1] = value
  overrides = [m.group(2) for m in map(_OVERRIDE_ARG.match, argv) if m]
  if overrides:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    load = ["config_check", f"--config={value}"]  # the config alone, without the overrides
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=load)
    fv(load)
    config = fv.config
    for override in overrides:
      problem = _key_error(config, override)
      if problem:
        raise ConfigArgError(f"{problem} (every key and its default: configs/default.py)")
  return argv


def _help_requested(argv: Sequence[str]) -> bool:
  args = list(argv[1:])
  args = args[:args.index("--")] if "--" in args else args
  return any(a in HELP_FLAGS for a in args)


def _print_help(fv: flags.FlagValues, usage: str, doc: str = "") -> None:
  text = f"usage: {usage}\n"
  if doc:
    text += f"\n{doc.strip()}\n"
  lines = fv.get_help(include_special_flags=False).splitlines()
  flag_help = "\n".join(ln for ln in lines if ln.startswith(" "))  # not the module headers
  if flag_help:
    text += f"\nflags:\n{flag_help}\n"
  print(text, end="")


def parse(argv: Optional[Sequence[str]], define: Callable[[flags.FlagValues, List[str]], None],
          usage: str, num_args: int,
          doc: str = "") -> Optional[Tuple[flags.FlagValues, List[str]]]:
  """(flag values, positional arguments) of argv, or None after printing the usage line.

  define(fv, argv) declares the flags on fv; argv[0] is the program name.
  --help / -h / --helpfull print the usage line, `doc` and the flags, then
  exit with status 0 (SystemExit, like absl's app.run).
  """
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  if _help_requested(argv):
    define(fv, [argv[0]])
    _print_help(fv, usage, doc)
    raise SystemExit(0)
  try:
    argv = check_config_argv(argv)
  except ConfigArgError as e:
    print(f"error: {e}", file=sys.stderr)
    return None
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


def next_steps(workdir: str, step: int, snapshot_freq: int, n_iters: int,
               otherwise: str) -> List[str]:
  """The main.py lines that sample and evaluate checkpoint `step` of a written workdir.

  They name the workdir's config.json, so they carry every override the run
  was written with. --mode=eval numbers checkpoints by step / snapshot_freq
  (the final step n_iters is the index past the last multiple), so a step that
  is neither gets an explanation ending in `otherwise`, a hint.
  """
  w = shlex.quote(workdir)
  common = f"python main.py --config={shlex.quote(os.path.join(workdir, 'config.json'))} --workdir={w}"
  lines = [f"Sample: {common} --mode=sample"]
  if step > 0 and (step % snapshot_freq == 0 or step == n_iters):
    k = -(-step // snapshot_freq)
    lines.append(f"Evaluate: {common} --mode=eval --config.eval.begin_ckpt={k} "
                 f"--config.eval.end_ckpt={k}")
  else:
    lines.append(f"(--mode=eval numbers checkpoints by step / training.snapshot_freq = "
                 f"{snapshot_freq}; step {step} is not a multiple, so {otherwise}.)")
  return lines


def print_next_steps(workdir: str, step: int, otherwise: str) -> None:
  """Prints `next_steps` of checkpoint `step` of a workdir that holds its config.json."""
  from score_jax import files  # pylint: disable=g-import-not-at-top

  training = files.read_json(os.path.join(workdir, "config.json"))["training"]
  for line in next_steps(workdir, step, int(training["snapshot_freq"]), int(training["n_iters"]),
                         otherwise):
    print(line)


def parse_main_argv(fv: flags.FlagValues) -> Callable[[List[str]], List[str]]:
  """absl `app.run`'s flags_parser for main.py: fv(argv) after `check_config_argv`; a mistake
  in the flags is one line on standard error (exit status 1); --help (-h; --helpfull for
  absl's flags too) prints the usage and flags and exits with 0."""

  def parse(argv: List[str]) -> List[str]:
    if _help_requested(argv):  # absl's own --help exits with 1
      from absl import app  # pylint: disable=g-import-not-at-top
      full = any(a.endswith("helpfull") for a in argv)
      app.usage(shorthelp=not full, writeto_stdout=True, exitcode=0)
    try:
      argv = check_config_argv(argv)
      return fv(argv)
    except ConfigArgError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(USER_ERROR) from None
    except flags.Error as e:
      msg = " ".join(str(e).split())
      print(f"error: {msg} (python main.py --help lists the flags)", file=sys.stderr)
      raise SystemExit(USER_ERROR) from None

  return parse
