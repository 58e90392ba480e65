"""A workdir nothing corrupts: one training at a time (WORKDIR/.lock), damaged checkpoints
skipped, Ctrl-C saves, messages above the progress bar."""

import glob
import io
import json
import logging
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import score_jax
from score_jax.run import checkpoints, cli, lock, progress, train, writers
from score_jax.run.settings import from_config as S


def _one_line(e):
  text = str(e.value)
  assert "\n" not in text, text
  return text


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _truncate_data(step_dir):
  """Cuts every data file of a checkpoint to half its size (a copy or write cut short)."""
  for path in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


# --- one training per workdir ---


def test_a_second_training_is_refused_in_one_line_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  held = lock.WorkdirLock(workdir).acquire()
  try:
    assert json.load(open(os.path.join(workdir, ".lock")))["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirLockedError) as e:
      lock.WorkdirLock(workdir).acquire()
    assert f"pid {os.getpid()}" in _one_line(e) and "another --workdir" in str(e.value)
    # The whole training refuses before writing anything.
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(S(helpers.config("toy", helpers.TINY_TOY)), workdir)
    assert sorted(os.listdir(workdir)) == [".lock"]
    assert cli.report_user_errors(lambda: lock.WorkdirLock(workdir).acquire()) == cli.USER_ERROR
  finally:
    held.release()
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  lock.WorkdirLock(workdir).acquire().release()  # free again


def test_a_lock_left_by_a_killed_training_is_taken_over_with_a_warning(tmp_path, caplog):
  path = tmp_path / ".lock"
  path.write_text(json.dumps({"pid": 4194304, "host": "gone-host", "since": "2024-01-01T00:00"}))
  with caplog.at_level(logging.WARNING):
    held = lock.WorkdirLock(str(tmp_path)).acquire()
  assert "pid 4194304 on gone-host" in caplog.text and "Took over" in caplog.text
  assert json.loads(path.read_text())["pid"] == os.getpid()
  held.release()
  assert not path.exists()


# --- damaged checkpoints ---


def test_a_damaged_checkpoint_is_skipped_and_told_apart_from_another_configs(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  state = lambda s: {"step": jnp.int32(s), "w": jnp.arange(5000.0) * s, "b": jnp.ones(3) * s}
  ck = checkpoints.Checkpointer(directory, keep_period=10, async_save=False)
  ck.save(10, state(10))
  ck.save(20, state(20))
  ck.close()
  _truncate_data(os.path.join(directory, "20"))

  ck = checkpoints.Checkpointer(directory, keep_period=10, async_save=False)
  with pytest.raises(checkpoints.DamagedCheckpointError) as e:
    ck.restore(20, state(0))
  assert "Checkpoint 20" in _one_line(e) and "damaged" in str(e.value)
  # Other shapes are another config's checkpoint, not damage.
  other = {"step": jnp.int32(0), "w": jnp.zeros(7), "b": jnp.ones(3)}
  with pytest.raises(checkpoints.CheckpointMismatchError):
    ck.restore(10, other)
  with caplog.at_level(logging.WARNING):
    restored = ck.restore_latest(state(0))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(5000.0) * 10)
  assert "Checkpoint 20" in caplog.text and "Using checkpoint 10" in caplog.text
  # The writer moved the damaged one aside (kept, not deleted); step 20 can be saved again.
  assert ck.all_steps() == [10] and os.path.isdir(str(tmp_path / "checkpoints_damaged" / "20"))
  ck.save(20, state(20))
  ck.close()
  assert checkpoints.finished_steps(directory) == [10, 20]

  # A checkpoint whose metadata is gone is damaged too; every one damaged is one line.
  os.remove(os.path.join(directory, "20", "default", "manifest.ocdbt"))
  _truncate_data(os.path.join(directory, "10"))
  with pytest.raises(checkpoints.DamagedCheckpointError) as e:
    checkpoints.restore_intact(directory, lambda s: checkpoints.restore(directory, s, state(0)))
  assert "Every checkpoint" in _one_line(e)


def test_load_run_falls_back_to_the_newest_intact_checkpoint(toy_run, tmp_path, caplog):
  workdir = helpers.copy_run(toy_run[0], str(tmp_path / "run"))
  _truncate_data(os.path.join(workdir, "checkpoints", "20"))
  with caplog.at_level(logging.WARNING):
    run = score_jax.load_run(workdir)
  assert run.step == 10 and "Checkpoint 20" in caplog.text and "Using checkpoint 10" in caplog.text
  with pytest.raises(checkpoints.DamagedCheckpointError) as e:
    score_jax.load_run(workdir, step=20)
  assert "Checkpoint 20" in _one_line(e)
  assert cli.report_user_errors(lambda: score_jax.load_run(workdir, 20)) == cli.USER_ERROR


def test_training_skips_a_damaged_checkpoint_and_ctrl_c_saves_then_resumes_exactly(
    toy_run, tmp_path, monkeypatch, caplog):
  """The session's run with its newest checkpoint (20) damaged: training resumes from 10, keeps
  20 aside, Ctrl-C at step 13 saves step 14, and the resumed run ends where the session's
  uninterrupted one did, bit for bit."""
  workdir = helpers.copy_run(toy_run[0], str(tmp_path / "run"))
  _truncate_data(os.path.join(workdir, "checkpoints", "20"))
  scalars = writers.MetricWriter.scalars

  def ctrl_c_at_step_13(self, step, values):  # called on the main thread at each log step
    scalars(self, step, values)
    if step == 13:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(writers.MetricWriter, "scalars", ctrl_c_at_step_13)
  settings = S(helpers.config("toy", helpers.TINY_TOY, **{"training.log_freq": 1}))
  previous = signal.getsignal(signal.SIGINT)
  with caplog.at_level(logging.WARNING), pytest.raises(train.TrainingInterrupted) as e:
    train.train_and_evaluate(settings, workdir)
  assert signal.getsignal(signal.SIGINT) is previous
  assert "Using checkpoint 10" in caplog.text
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["20"]
  # The signal lands during step 13's logging; step 14 is the first to see it, saves and stops.
  assert "saved checkpoint 14" in _one_line(e)
  assert checkpoints.finished_steps(os.path.join(workdir, "checkpoints")) == [10, 14]
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  assert cli.report_user_errors(lambda: (_ for _ in ()).throw(e.value)) == cli.INTERRUPTED

  monkeypatch.setattr(writers.MetricWriter, "scalars", scalars)
  _assert_same_state(train.train_and_evaluate(settings, workdir), toy_run[1])
  assert checkpoints.finished_steps(os.path.join(workdir, "checkpoints")) == [10, 20]


# --- messages and the progress bar ---


def test_messages_print_above_the_progress_bar_not_into_its_line(monkeypatch):
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  handler = logging.StreamHandler(sys.stderr)
  logging.getLogger().addHandler(handler)
  try:
    with progress.progress_bar(10, 0, True, "train") as bar:
      bar.update(3)
      bar.refresh()
      logging.getLogger().warning("a message")
      print("printed", end="", file=sys.stderr)
      print(" in two writes", file=sys.stderr)
      bar.update(3)
  finally:
    logging.getLogger().removeHandler(handler)
  assert sys.stderr is err and handler.stream is err
  lines = [line.split("\r")[-1] for line in err.getvalue().split("\n")]
  assert "a message" in lines and "printed in two writes" in lines
  assert any("6/10" in line for line in lines)
