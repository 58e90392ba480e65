"""Private helpers of `score_jax.datasets`, one module per concept.

Import the public API from `score_jax.datasets`; names here may change.
"""
