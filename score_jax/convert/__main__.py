"""`python -m score_jax.convert`: see `score_jax.convert.cli`."""

import sys

from score_jax.run import xla_flags

xla_flags.apply_defaults()  # before JAX starts a backend

from score_jax.convert.cli import main  # pylint: disable=wrong-import-position

sys.exit(main())
