"""Private helpers of `score_jax.data.datasets`, one module per concept.

Import the public API from `score_jax.data.datasets`; names here may change.
"""
