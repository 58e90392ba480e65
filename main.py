"""Entry point: flags only, then one call into the library.

  python main.py --config=configs/toy.py --workdir=runs/toy --mode=train

A mistake in what was asked for (a config key or value, a path, a missing
dataset or checkpoint) prints one line naming the fix and exits with status 1;
anything unexpected keeps its traceback.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), or a workdir's config.json; override any key "
    "with --config.<section>.<key>=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples, metrics.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
flags.DEFINE_string("coordinator_address", "",
                    "host:port of process 0, for multi-process runs without a cluster manager.")
flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host or localhost).")
flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).")
flags.DEFINE_string("compilation_cache", "auto",
                    "Folder that keeps compiled programs across runs, so a restart or rerun of the "
                    "same config and mode skips compiling; 'auto': $JAX_COMPILATION_CACHE_DIR or "
                    "~/.cache/score_jax/jax_cache/<machine>; 'none': off.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from score_jax.run import cli
  from score_jax.run import entry as run  # imported late so --help stays fast

  def go() -> int:
    run.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
            compilation_cache=FLAGS.compilation_cache)
    return 0

  sys.exit(cli.report_user_errors(go))


if __name__ == "__main__":
  from score_jax.run import xla_flags  # before JAX starts: XLA reads its flags once
  xla_flags.apply_defaults()
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_main_argv(FLAGS))
