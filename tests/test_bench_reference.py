"""benchmarks/bench_reference.py: its table states what it measured, and its score_jax side
times the training step.

The reference side needs a checkout of yang-song/score_sde_pytorch and a Python with
torch; it runs only where SCORE_JAX_REFERENCE (the checkout) and SCORE_JAX_TORCH_PYTHON
(that Python) are set.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from score_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_reference.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_reference_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows(text):
  """The cells of every Markdown table row in text (header and rule lines left out)."""
  lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines
          if not line.startswith("| network")]


def _median_range(cell):
  """'12.3 (4.50-20.1)' -> (12.3, 4.5, 20.1)."""
  median, rest = cell.split(" (")
  low, high = rest.rstrip(")").split("-")
  return float(median), float(low), float(high)


def _close_to_printed(printed, value):
  # The table prints 3 significant figures (or whole ms above 100): half a unit in the
  # last printed digit is at most 0.5% of the value.
  return abs(printed - value) <= 0.005 * abs(value) + 1e-9


def _check_row(cells, result):
  """A step row against the raw timings in result (independent numpy medians)."""
  ref, jax_times = result.get("ref"), np.concatenate(result["jax"]["times"]) * 1000
  median, low, high = _median_range(cells[5])
  assert _close_to_printed(median, np.median(jax_times))
  assert _close_to_printed(low, jax_times.min()) and _close_to_printed(high, jax_times.max())
  assert low <= median <= high
  assert cells[2].endswith(f"{result['jax']['params'] / 1e6:.4g}M")
  if ref is None:
    assert cells[4] == cells[6] == cells[7] == cells[9] == "-"
    return
  ref_times = np.concatenate(ref["times"]) * 1000
  ref_median, _, _ = _median_range(cells[4])
  assert _close_to_printed(ref_median, np.median(ref_times))
  # The ratio is reference / score_jax of the medians: the printed medians agree with it
  # to their rounding (0.5% each, so 1% for the quotient) plus the ratio's own 0.005.
  ratio = float(cells[6])
  assert abs(ratio - ref_median / median) <= 0.01 * ratio + 0.005
  per_round = [np.median(r) / np.median(j) for r, j in zip(ref["times"], result["jax"]["times"])]
  low, high = map(float, cells[7].split("-"))
  assert abs(low - min(per_round)) <= 0.005 and abs(high - max(per_round)) <= 0.005


def test_summary_table_and_parts(bench):
  rng = np.random.default_rng(0)
  ref = rng.uniform(3.0, 4.0, size=(3, 2)).tolist()  # seconds: 3 rounds x 2 steps
  ours = rng.uniform(0.02, 0.05, size=(3, 2)).tolist()
  fwd_ref, fwd_ours = rng.uniform(1, 2, size=(3, 2)).tolist(), [[0.01, 0.011]] * 3
  grad_ref, grad_ours = rng.uniform(2, 3, size=(3, 2)).tolist(), [[0.015, 0.016]] * 3
  result = {
      "config": "x", "label": "Net", "batch": 8, "summary": bench.summarize(ref, ours),
      "ref": {"params": 1234567, "flops": 5e11, "first_step_s": 9.0, "times": ref,
              "cpu": [7.0, 7.5]},
      "jax": {"params": 1234567, "flops": 4.9e11, "compile_s": 40.0, "times": ours,
              "cpu": [0.1, 0.2]},
      "parts": {"forward": {"summary": bench.summarize(fwd_ref, fwd_ours),
                            "ref_cpu": [1.0, 1.5], "jax_cpu": [0.01, 0.02]},
                "gradient": {"summary": bench.summarize(grad_ref, grad_ours),
                             "ref_cpu": [3.0, 3.5], "jax_cpu": [0.05, 0.06]}}}
  s = result["summary"]
  assert s["ratio"] == pytest.approx(np.median(ref) / np.median(ours), rel=1e-12)
  (cells,) = _rows(bench.table_row(result))
  _check_row(cells, result)
  assert cells[3] == "490 / 500" and cells[8] == "7.25 / 0.15" and cells[10] == "9.0 / 40.0"
  assert float(cells[9]) == pytest.approx(7.25 / 0.15, abs=0.005)
  rows = {r[2]: r for r in _rows("\n".join(bench.parts_rows(result)))}
  for part, (r, o) in {"forward (loss)": (fwd_ref, fwd_ours),
                       "forward + backward": (grad_ref, grad_ours)}.items():
    assert _close_to_printed(float(rows[part][3]), 1000 * np.median(r))
    assert _close_to_printed(float(rows[part][4]), 1000 * np.median(o))
  backward = 1000 * (np.median(grad_ours) - np.median(fwd_ours))
  assert _close_to_printed(float(rows["backward (difference)"][4]), backward)
  update = 1000 * (np.median(ref) - np.median(grad_ref))
  assert _close_to_printed(float(rows["update etc. (difference)"][3]), update)
  # CPU seconds: medians of the parts' own CPU times, and their differences.
  assert rows["forward (loss)"][7] == "1.25 / 0.015" and rows["forward (loss)"][8] == "83.33"
  assert rows["backward (difference)"][7] == "2 / 0.04"  # 3.25 - 1.25, 0.055 - 0.015
  assert rows["update etc. (difference)"][7] == "4 / 0.095"  # 7.25 - 3.25, 0.15 - 0.055
  # score_jax alone: the reference's cells are empty.
  alone = {k: v for k, v in result.items() if k not in ("ref", "parts")}
  alone["summary"] = bench.summarize(None, ours)
  (cells,) = _rows(bench.table_row(alone))
  _check_row(cells, alone)


def test_bad_paths_are_one_line_errors(bench, tmp_path):
  with pytest.raises(UserError, match="not a checkout of yang-song/score_sde_pytorch"):
    bench.main([f"--reference={tmp_path}", f"--torch_python={sys.executable}"])
  (tmp_path / "losses.py").write_text("")
  with pytest.raises(UserError, match="not an executable"):
    bench.main([f"--reference={tmp_path}", f"--torch_python={tmp_path / 'python'}"])
  with pytest.raises(UserError, match="unknown nope"):
    bench.main(["--no_reference", "--configs=tiny,nope"])
  with pytest.raises(UserError, match="exists; pass a new path"):
    bench.main(["--no_reference", f"--json={tmp_path / 'losses.py'}"])


def test_score_jax_side(bench, tmp_path, capsys, fast_compile):
  # Most XLA optimizations off: the test reads what was timed and counted, not how fast.
  out = tmp_path / "times.json"
  bench.main(["--configs=tiny", "--no_reference", "--repeats=2", "--steps=1", "--warmup=1",
              f"--json={out}"])
  (result,) = json.loads(out.read_text())["results"]
  (cells,) = _rows(capsys.readouterr().out)
  _check_row(cells, result)
  # What was timed is the training step: it advanced the state once per warm-up and timed
  # step (1 + 2 rounds x 1).
  assert result["jax"]["final_step"] == 3
  assert [len(r) for r in result["jax"]["times"]] == [1, 1]
  assert result["jax"]["flops"] > 0 and result["jax"]["params"] == 2801


@pytest.mark.skipif(not (os.environ.get("SCORE_JAX_REFERENCE") and
                         os.environ.get("SCORE_JAX_TORCH_PYTHON")),
                    reason="needs SCORE_JAX_REFERENCE (a score_sde_pytorch checkout) and "
                    "SCORE_JAX_TORCH_PYTHON (a Python with torch)")
def test_beside_the_reference(tmp_path):
  out = tmp_path / "times.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, f"--reference={os.environ['SCORE_JAX_REFERENCE']}",
       f"--torch_python={os.environ['SCORE_JAX_TORCH_PYTHON']}", "--configs=tiny",
       "--repeats=2", "--steps=1", "--warmup=1", f"--json={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (result,) = json.loads(out.read_text())["results"]
  (cells,) = _rows(proc.stdout)
  _check_row(cells, result)
  # The same network on both sides, and the reference took its own steps.
  assert result["ref"]["params"] == result["jax"]["params"] == 2801
  assert cells[2] == "0.002801M / 0.002801M"
  assert result["ref"]["flops"] > 0 and [len(r) for r in result["ref"]["times"]] == [1, 1]
