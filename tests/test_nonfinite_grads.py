"""optim.nonfinite_grads = 'zero': EDM's handling of non-finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax.run import programs

from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.run.settings import from_config as S

from configs import toy


def test_zero_nonfinite_replaces_nan_and_infinities_with_edm_bounds():
  grads = {"a": jnp.array([np.nan, np.inf, -np.inf, 2.5, -3e6], jnp.float32),
           "b": {"c": jnp.full((2, 2), np.nan)}}
  out = train.zero_nonfinite(grads)
  np.testing.assert_array_equal(np.asarray(out["a"]), np.array([0.0, 1e5, -1e5, 2.5, -3e6],
                                                               np.float32))
  np.testing.assert_array_equal(np.asarray(out["b"]["c"]), np.zeros((2, 2)))


def _step_after_a_good_one(mode):
  """A toy run's state after one good step, and the step on a batch with a NaN."""
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = (16,)
    config.training.batch_size = 8
    config.optim.warmup = 0
    config.optim.nonfinite_grads = mode
  setup = plan_lib.make_plan(S(config))
  step = train.make_train_step(setup)
  key = jax.device_put(jax.random.PRNGKey(5), setup.replicated)
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  y = np.zeros((8,), np.int32)
  state, _ = step(run_state.init_state(setup, jax.random.PRNGKey(0)),
                  *train.global_batch(setup, {"image": x, "label": y}), key)
  good = jax.device_get(state)
  x[3, 1] = np.nan  # a NaN loss: every gradient entry is NaN
  state, metrics = step(state, *train.global_batch(setup, {"image": x, "label": y}), key)
  return setup, good, jax.device_get(state), jax.device_get(metrics)


def test_zero_takes_an_adam_step_with_zero_gradient():
  """'zero': the step is taken with zero gradients, which after a good step still moves the
  weights by Adam's momentum (optax's update of a zero gradient), and the run goes on.
  ('skip', the default, leaves every array of the state as it was and reports finite=False:
  tests/test_train.py's test_train_step_applies_adam_and_ema_and_skips_a_non_finite_step.)"""
  setup, good, state, metrics = _step_after_a_good_one("zero")
  assert bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 2
  zeros = jax.tree.map(jnp.zeros_like, good.params)
  updates, opt_state = setup.tx.update(zeros, good.opt_state, good.params)
  params = optax.apply_updates(good.params, updates)
  for want, got in ((params, state.params), (opt_state, state.opt_state)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state.params)))
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state))
