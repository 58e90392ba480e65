"""Entry point: flags only, then one call into the library.

  python main.py --config=configs/toy.py --workdir=runs/toy --mode=train
"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples, metrics.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from score_jax import run  # imported late so --help stays fast
  run.run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  app.run(main)
