"""The documented command lines: --help of every entry point, one-line --config mistakes,
printed next commands that work when pasted, a workdir's config.json as --config, and the
default location of the FID Inception weights."""

import json
import os
import subprocess
import sys
import types

import pytest

from score_jax.convert import cli as convert_cli
from score_jax.convert import inception as convert_inception
from score_jax.convert import phema as convert_phema
from score_jax.metrics import inception
from score_jax.run import cli, entry, settings
from score_jax.run.eval_metrics import fid

from helpers import ROOT, env, main_command


def _main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=env(1))


@pytest.mark.parametrize("entry_main, argv0, flag", [
    (convert_cli.main, "convert", "--from"), (convert_phema.main, "phema", "--sigma_rel"),
    (lambda argv: convert_inception.main(argv[1:]), "inception", None)])
@pytest.mark.parametrize("help_flag", ["--help", "-h", "--helpfull"])
def test_converters_print_usage_and_flags_on_help(entry_main, argv0, flag, help_flag, capsys):
  with pytest.raises(SystemExit) as exit_:
    entry_main([argv0, help_flag])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m score_jax.convert")
  if flag:
    assert f"\n  {flag}:" in out and "\nflags:\n" in out
  else:
    assert "DST default" in out and inception.PUBLISHED_URL in out


def test_main_help_and_config_mistakes_are_one_line():
  proc = _main("--help")
  assert proc.returncode == 0 and "--workdir" in proc.stdout and "--config" in proc.stdout
  proc = _main("--config=configs/toy.py", "--workdir=/nonexistent/w", "--config.training.n_iter=5")
  assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
  assert "did you mean training.n_iters?" in proc.stderr
  proc = _main("--config=configs/nope.py", "--workdir=/nonexistent/w")
  assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
  assert "--config=configs/nope.py does not exist" in proc.stderr


def test_config_argv_is_checked_before_absl(tmp_path):
  toy = os.path.join(ROOT, "configs", "toy.py")
  with pytest.raises(cli.ConfigArgError, match="configs/nope.py does not exist"):
    cli.check_config_argv(["main.py", "--config", "configs/nope.py"])
  with pytest.raises(cli.ConfigArgError, match="is a folder"):
    cli.check_config_argv(["main.py", f"--config={tmp_path}"])
  with pytest.raises(cli.ConfigArgError, match=r"the config has no key 'traning'; did you mean "
                                               r"training\?"):
    cli.check_config_argv(["main.py", f"--config={toy}", "--config.traning.n_iters=5"])
  with pytest.raises(cli.ConfigArgError, match="model has no key 'nff'; did you mean model.nf"):
    cli.check_config_argv(["main.py", f"--config={toy}", "--config.model.nff=5"])
  argv = ["main.py", f"--config={toy}", "--config.training.n_iters=5", "--workdir=w"]
  assert cli.check_config_argv(argv) == argv  # nothing to change
  # A workdir's config.json is the config, and overrides apply to it.
  raw = settings.from_config(_toy_config(**{"training.n_iters": 7})).to_json()
  (tmp_path / "config.json").write_text(raw)
  s, workdir, mode = main_command(f"python main.py --config={tmp_path}/config.json "
                                  "--config.training.batch_size=48 --config.model.hidden_sizes=16 "
                                  "--config.model.hidden_sizes=8 --workdir=w --mode=sample")
  assert (s.training.n_iters, s.training.batch_size, workdir, mode) == (7, 48, "w", "sample")
  assert tuple(s.model.get("hidden_sizes")) == (16, 8)  # a tuple override, as on the .py
  expected = json.loads(raw)  # the rest as saved
  expected["training"]["batch_size"], expected["model"]["hidden_sizes"] = 48, [16, 8]
  assert json.loads(s.to_json()) == expected


def _toy_config(**changes):
  from helpers import config  # pylint: disable=g-import-not-at-top
  return config("toy", **changes)


def test_printed_next_steps_load_the_run_they_name(toy_run, capsys):
  """After training (main.py) the printed commands name WORKDIR/config.json: pasted, they
  give the run's own settings (the overrides included) and the checkpoint's eval index."""
  workdir = toy_run[0]
  entry.print_trained_next_steps(workdir)
  lines = capsys.readouterr().out.strip().splitlines()
  assert [ln.split(":")[0] for ln in lines] == ["Sample", "Evaluate"]
  saved = json.loads(settings.from_json(os.path.join(workdir, "config.json")).to_json())
  s, w, m = main_command(lines[0])
  assert (json.loads(s.to_json()), w, m) == (saved, workdir, "sample")
  s, w, m = main_command(lines[1])
  saved["eval"]["begin_ckpt"] = saved["eval"]["end_ckpt"] = 2  # step 20 / snapshot_freq 10
  assert (json.loads(s.to_json()), w, m) == (saved, workdir, "eval")
  # A step that is neither a multiple of snapshot_freq nor the last one has no eval index.
  lines = cli.next_steps("runs/x y", 25, 10, 30, "rerun")
  assert lines[0] == ("Sample: python main.py --config='runs/x y/config.json' "
                      "--workdir='runs/x y' --mode=sample")
  assert "step 25 is not a multiple, so rerun." in lines[1]
  assert "--config.eval.begin_ckpt=3" in cli.next_steps("w", 25, 10, 25, "")[1]


def test_fid_finds_the_converted_inception_weights_at_the_default_location(tmp_path,
                                                                          monkeypatch, capsys):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  default = str(tmp_path / "cache" / "score_jax" / "inception" / "inception_fid.npz")
  assert inception.default_weights_path() == default
  plan = lambda name, path="": types.SimpleNamespace(
      eval=types.SimpleNamespace(inception_path=path),
      data=types.SimpleNamespace(name=name, pixel_dataset=name, is_images=True))
  assert fid.weights_path(plan("cifar10")) == "" and not fid.METRIC.enabled(plan("cifar10"))
  assert "python -m score_jax.convert.inception" in fid.METRIC.why_off(plan("cifar10"))
  # The one command: SRC alone writes the default location, where eval then looks.
  written = []

  def convert_pth(src, dst):  # the conversion itself: test_inception.py
    written.append((src, dst))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    open(dst, "wb").close()
    return {}

  monkeypatch.setattr(convert_inception, "convert_pth", convert_pth)
  assert convert_inception.main(["pt_inception.pth"]) == 0
  assert written == [("pt_inception.pth", default)]
  assert "finds them there" in capsys.readouterr().out
  assert os.path.isfile(default)
  assert fid.weights_path(plan("cifar10")) == default and fid.METRIC.enabled(plan("cifar10"))
  assert fid.weights_path(plan("cifar10", "mine.npz")) == "mine.npz"  # eval.inception_path wins
  assert fid.weights_path(plan("digits")) == ""  # the digits have their own FD



def test_digits_fd_at_any_sample_count_compares_with_the_floor_at_equal_n():
  """benchmarks/digits_fd.py reports FD@M, M = min(samples, 355): at 355 held-out digits it
  is the metric's own floor; at fewer it lies above (FD's small-N bias), as documented."""
  from benchmarks import digits_fd  # pylint: disable=g-import-not-at-top
  from score_jax.data.digits import load_digits  # pylint: disable=g-import-not-at-top
  from score_jax.metrics import digits  # pylint: disable=g-import-not-at-top

  metric = digits.default_metric()
  held_out = load_digits("test")[0]
  assert digits_fd.fd_at(metric, held_out, 355) == pytest.approx(metric.floor, rel=1e-9)
  fd_100 = digits_fd.fd_at(metric, held_out, 100)  # three disjoint sets of 100
  assert fd_100 == pytest.approx(sum(metric.fd(held_out[k * 100:(k + 1) * 100])
                                     for k in range(3)) / 3, rel=1e-9)
  assert fd_100 > 2 * metric.floor


@pytest.mark.slow  # ~4 min on 2 CPU cores: a digits run trained for 20 steps, sampled 3 times
def test_readme_digits_commands_work_as_printed(tmp_path):
  """main.py train prints its next commands; the README's inpaint row works without
  sample.images_path; two samplers give two named outputs; digits_fd runs below 355 samples."""
  import json as json_lib  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "digits")
  short = ["--config.training.n_iters=20", "--config.training.snapshot_freq=10",
           "--config.training.snapshot_freq_for_preemption=10", "--config.training.eval_freq=1000",
           "--config.training.snapshot_sampling=False"]
  proc = _main("--config=configs/digits.py", f"--workdir={workdir}", *short)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sample = next(ln for ln in proc.stdout.splitlines() if ln.startswith("Sample: "))
  fast = ["--config.sample.task=inpaint", "--config.sample.num=8",
          "--config.sampling.method=heun", "--config.sampling.num_steps=4"]
  for extra in ([], ["--config.sampling.method=ddim"], []):
    proc = _main(*shlex.split(sample.split(": ", 1)[1])[2:], *fast, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(f for f in os.listdir(os.path.join(workdir, "sample")) if f.endswith(".json"))
  metas = [json_lib.load(open(os.path.join(workdir, "sample", f))) for f in names]
  assert [m["sampler"] for m in metas] == ["ddim", "heun", "heun"]
  assert names[1:] == [f"inpaint_step20_heun_nfe{metas[1]['nfe']}.json",
                       f"inpaint_step20_heun_nfe{metas[1]['nfe']}_2.json"]  # not overwritten
  import numpy as np  # pylint: disable=g-import-not-at-top
  from score_jax.data.digits import load_digits  # pylint: disable=g-import-not-at-top
  out = np.load(os.path.join(workdir, "sample", names[1].replace(".json", ".npz")))
  np.testing.assert_array_equal(out["inputs"], load_digits("test")[0][:8])  # the test digits
  proc = subprocess.run([sys.executable, "benchmarks/digits_fd.py", f"--workdir={workdir}",
                         "--samples=60", "--samplers=ddim", "--nfe=3"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| sampler | NFE | digits FD | FD@60 |" in proc.stdout
  assert "| DDIM, 3 steps | " in proc.stdout
