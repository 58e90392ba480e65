"""training.sharding = 'fsdp': the train state split over the devices (score_jax.run.sharding).

The session has 4 simulated CPU devices (conftest.py). An fsdp run must take the same steps
as the replicated one, with each device holding about a quarter of the state, and its
checkpoints must load on another device count.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from score_jax.run import checkpoints, sharding, train
from score_jax.run import plan as plan_lib
from score_jax.run import state as run_state
from score_jax.run.settings import from_config as S

# The network the tests train: a config and its changes (any of helpers.config). A DiT of
# width 64 and one block on the 8x8 digits (2x2 patches): its attention, MLP and adaLN kernels
# hold nearly all of its bytes; biases, norms and small tables are below
# sharding.MIN_SHARDED_SIZE and stay whole.
NETWORK = ("digits_dit", {"model.depth": 1, "training.batch_size": 16, "optim.warmup": 0,
                          "model.ema_rate": 0.9})
STEPS = 3


def _settings(mode):
  name, changes = NETWORK
  return S(helpers.config(name, changes, **{"training.sharding": mode}))


def _batches(plan):
  rng = np.random.default_rng(0)
  shape = plan.data.shape(plan.loop.batch_size)
  for _ in range(STEPS):
    x = rng.normal(size=shape).astype(np.float32)
    yield train.global_batch(plan, {"image": x, "label": np.zeros(shape[:1], np.int32)})


@pytest.fixture(scope="module")
def runs():
  """{mode: (plan, state after STEPS steps, losses)} for 'replicated' and 'fsdp', compiled
  with most XLA optimizations off (conftest.py: fast_compile) alike for both modes."""
  jax.config.update("jax_disable_most_optimizations", True)
  out = {}
  for mode in ("replicated", "fsdp"):
    plan = plan_lib.make_plan(_settings(mode))
    step = train.make_train_step(plan)
    state = run_state.init_state(plan, jax.random.PRNGKey(0))
    key = jax.device_put(jax.random.PRNGKey(3), plan.replicated)
    losses = []
    for x, y in _batches(plan):
      state, metrics = step(state, x, y, key)
      losses.append(float(metrics["loss"]))
    out[mode] = (plan, state, losses)
  try:
    yield out
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()


def _assert_same_state(a, b):
  # Both runs sum the same per-device gradients; only the order of the cross-device sums
  # may differ, a float32 round-off of ~1e-7 relative per gradient. Adam divides the
  # moments, so that relative error carries into updates of size lr = 1e-3 (configs/digits),
  # three of them: |diff| <~ 3 * 1e-3 * 1e-6, far inside atol = 1e-6 (and rtol 1e-5 for
  # the moments). A wrong shard (say, a gradient not summed over the devices) moves a
  # parameter by a whole update, ~1e-4.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_fsdp_trains_like_replicated_with_a_quarter_of_the_state_per_device(runs):
  rep_plan, rep_state, rep_losses = runs["replicated"]
  plan, state, losses = runs["fsdp"]
  assert dict(plan.mesh.shape) == {"data": 1, "fsdp": 4}
  assert dict(rep_plan.mesh.shape) == {"data": 4, "fsdp": 1}
  assert int(state.step) == STEPS
  np.testing.assert_allclose(losses, rep_losses, rtol=1e-6)
  _assert_same_state(jax.device_get(rep_state), jax.device_get(state))

  # Each device's bytes, read from the arrays' own shards, against the count from the
  # shapes: arrays of at least MIN_SHARDED_SIZE elements with an axis of a multiple of 4
  # are split in 4, the rest whole. The replicated run holds everything on every device.
  for tree in (state.params, state.opt_state, state.ema_params):
    leaves = jax.tree.leaves(tree)
    total = sum(a.nbytes for a in leaves)
    want = sum(a.nbytes // 4 if a.size >= sharding.MIN_SHARDED_SIZE
               and any(d % 4 == 0 for d in a.shape) else a.nbytes for a in leaves)
    have = sharding.device_bytes(tree)
    assert set(have) == set(jax.devices())
    assert set(have.values()) == {want}
    assert want < 0.27 * total  # about a quarter: the kernels hold nearly all the bytes
  assert set(sharding.device_bytes(rep_state.params).values()) == {
      sum(a.nbytes for a in jax.tree.leaves(rep_state.params))}
  # The blocks' MLP kernels are split along their wider axis: 64 -> 256 along the outputs,
  # 256 -> 64 along the inputs.
  fc1 = [a for a in jax.tree.leaves(state.params) if a.shape == (64, 256)]
  fc2 = [a for a in jax.tree.leaves(state.params) if a.shape == (256, 64)]
  assert fc1 and all(a.sharding.spec == P(None, "fsdp") for a in fc1)
  assert fc2 and all(a.sharding.spec == P("fsdp", None) for a in fc2)


def test_fsdp_checkpoint_written_on_four_devices_resumes_on_two(runs, tmp_path):
  plan4, state4, _ = runs["fsdp"]
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(STEPS, state4)
  ckpt.close()
  mesh2 = sharding.make_mesh(2, jax.devices()[:2])
  plan2 = plan_lib.make_plan(_settings("fsdp"), need_data=False, mesh=mesh2)
  restored = {}
  # Into a replicated run's state too (training.sharding changed on resume).
  for n, plan in ((2, plan2), ("replicated", runs["replicated"][0])):
    restored[n] = checkpoints.restore(str(tmp_path / "checkpoints"), STEPS,
                                      run_state.abstract_state(plan))
  for n in (2, "replicated"):  # copies, bit for bit
    for want, got in zip(jax.tree.leaves(jax.device_get(state4)),
                         jax.tree.leaves(jax.device_get(restored[n]))):
      np.testing.assert_array_equal(got, want)
  for leaf in jax.tree.leaves(restored["replicated"]):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
  # Evaluation and sampling read whole EMA parameters (load_run, the teacher).
  ema = run_state.restore_ema_params(plan4, str(tmp_path / "checkpoints"), STEPS)
  for want, got in zip(jax.tree.leaves(jax.device_get(state4.ema_params)), jax.tree.leaves(ema)):
    assert got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), want)
  big = [a for a in jax.tree.leaves(restored[2].params) if a.size >= sharding.MIN_SHARDED_SIZE]
  assert big and all(a.sharding.mesh.shape["fsdp"] == 2 and len(a.sharding.device_set) == 2
                     and a.addressable_shards[0].data.size == a.size // 2 for a in big)
  # The steps that follow on 2 devices: test_fsdp_run_resumes_on_fewer_devices_through_main.


def test_fsdp_size_two_of_four_devices_halves_the_state_and_replicates_it_along_data():
  """training.fsdp_size = 2: a 2 x 2 mesh; the abstract state (nothing compiled) puts half
  of each split array on each device, the same half on the two devices of a 'data' row."""
  plan = plan_lib.make_plan(
      _settings("fsdp").replace(training={"fsdp_size": 2}), need_data=False)
  assert dict(plan.mesh.shape) == {"data": 2, "fsdp": 2}
  params = run_state.abstract_state(plan).params
  leaves = jax.tree.leaves(params)
  want = sum(a.size * 4 // 2 if a.size >= sharding.MIN_SHARDED_SIZE
             and any(d % 2 == 0 for d in a.shape) else a.size * 4 for a in leaves)
  assert set(sharding.device_bytes(params).values()) == {want}
  kernel = next(a for a in leaves if a.shape == (64, 256))
  index = kernel.sharding.devices_indices_map(kernel.shape)
  for row in plan.mesh.devices:  # the devices of one 'fsdp' group hold different halves
    assert index[row[0]] != index[row[1]]
  for column in plan.mesh.devices.T:  # along 'data', the same half
    assert index[column[0]] == index[column[1]]


@pytest.mark.parametrize("shape,size,spec", [
    ((3, 3, 64, 128), 4, P(None, None, None, "fsdp")),  # a convolution: output channels
    ((1024, 6), 4, P("fsdp", None)),  # the only axis 4 divides
    ((128, 128), 4, P(None, "fsdp")),  # equal axes: the last one
    ((1000, 30), 8, P("fsdp", None)),
    ((1001, 31), 4, P()),  # no axis divides
    ((16, 16), 4, P()),  # below MIN_SHARDED_SIZE
    ((4096,), 1, P()),  # no fsdp axis
])
def test_fsdp_spec_splits_the_largest_divisible_axis(shape, size, spec):
  assert sharding.fsdp_spec(shape, size) == spec


def _main(workdir, *overrides, devices):
  """A main.py training of the toy config on `devices` simulated devices, fsdp over all."""
  cmd = [sys.executable, os.path.join(helpers.ROOT, "main.py"),
         "--config=" + os.path.join(helpers.ROOT, "configs/toy.py"), f"--workdir={workdir}",
         "--mode=train", "--config.training.sharding=fsdp", "--config.training.batch_size=32",
         "--config.training.log_freq=1", "--config.training.eval_freq=2",
         "--config.training.snapshot_freq=2", "--config.model.hidden_sizes=(64,64)",
         "--config.model.num_scales=10", "--config.sampling.batch_size=32",
         "--config.model.phema_sigma_rels=(0.1,)", "--config.training.phema_snapshot_freq=2",
         *overrides]
  proc = subprocess.run(cmd, env=helpers.env(devices), cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow  # four main.py runs: ~1 minute on 2 CPU cores
def test_fsdp_run_resumes_on_fewer_devices_through_main(tmp_path):
  """main.py with training.sharding = 'fsdp': 2 steps on 4 devices, then resumed on 2 up to
  step 4, logs the losses of 4 uninterrupted steps on 4 devices; snapshot sampling, the
  eval loss and post-hoc EMA snapshots (all of which gather the split state) run on the way.
  The losses agree to float32 round-off of the cross-device sums (rtol 1e-5, see
  `_assert_same_state`); a run that lost or mangled state at the resume would not."""
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  _main(whole, "--config.training.n_iters=4", devices=4)
  _main(resumed, "--config.training.n_iters=2", devices=4)
  _main(resumed, "--config.training.n_iters=4", devices=2)
  a, b = _logged(whole), _logged(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[k] for k in range(1, 5)], [a[k] for k in range(1, 5)], rtol=1e-5)
  for step in (2, 4):
    for workdir in (whole, resumed):
      assert os.path.isfile(os.path.join(workdir, "samples", f"step_{step}.png"))
  for name in ("phema-0000000002.npz", "phema-0000000004.npz"):
    x, y = (np.load(os.path.join(w, "phema", name)) for w in (whole, resumed))
    keys = [k for k in x.files if k.startswith("ema0/")]
    assert keys and sorted(keys) == sorted(k for k in y.files if k.startswith("ema0/"))
    for k in keys:  # whole arrays gathered from the shards; averages of the parameters above
      assert x[k].shape == y[k].shape and x[k].size > 0
      np.testing.assert_allclose(y[k], x[k], rtol=1e-4, atol=1e-6)
