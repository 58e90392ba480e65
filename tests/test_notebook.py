"""notebooks/quickstart.ipynb runs top to bottom, and what it reports is sensible.

The notebook is executed with nbclient in a fresh kernel, with its small
settings (SCORE_JAX_NOTEBOOK_SMALL=1), in a temporary working directory so
that its runs/ folder lands there and not in the repository. The notebook
writes a few of its numbers to SCORE_JAX_NOTEBOOK_RESULTS; the checks are
loose enough for the small settings' short training.

Needs the `notebook` extra: pip install -e ".[notebook]".
"""

import json
import math
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _require(module):
  return pytest.importorskip(
      module, reason=f"executing the notebook needs {module}: pip install -e '.[notebook]'")


def test_notebook_is_stored_without_outputs():
  """Outputs stay out of git: the file stays small and diffs stay readable."""
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell["outputs"] and cell["execution_count"] is None, "".join(cell["source"])[:80]


def _check_ode_nfe(nfe):
  """The ODE sampler's NFE is the solver's count: 7 evaluations per attempt until the
  first Tsit5 step is accepted, 6 per later attempt, 1 for the final denoising step
  (tests/test_sampling.py checks the exact count against a runtime counter)."""
  assert 8 <= nfe < 7 * 4096, nfe


@pytest.mark.slow  # ~4 minutes on 2 CPU cores: two short trainings, every sampler compiled
def test_quickstart_notebook_runs_with_small_settings(tmp_path, monkeypatch):
  nbclient, nbformat = _require("nbclient"), _require("nbformat")
  _require("ipykernel")
  results_path = tmp_path / "results.json"
  monkeypatch.setenv("SCORE_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("SCORE_JAX_NOTEBOOK_RESULTS", str(results_path))
  # The kernel imports score_jax and configs/ from this checkout, installed or not.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  # One CPU device (conftest.py simulates several for this process): the
  # notebook's settings divide any device count, and one is fastest here.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, with the traceback, if any cell fails
  print(f"notebook executed in {time.perf_counter() - start:.0f} s")

  assert not list(ROOT.glob("notebooks/runs")), "the notebook wrote into the repository"
  assert (tmp_path / "runs" / "quickstart_small" / "digits" / "metrics.jsonl").is_file()
  r = json.loads(results_path.read_text())
  assert r["settings"] == "small"

  toy = r["toy"]
  data_w = toy["data_mode_weights"]
  for name, run in toy["samplers"].items():
    assert run["finite"], name
    assert run["seconds"] > 0, name
    # Every mode is found with about its weight (2:1 alternating, 1/6 and 1/12),
    # loosely: the small run trains a few hundred steps.
    assert max(abs(a - b) for a, b in zip(run["mode_weights"], data_w)) < 0.06, (name, run)
  nfes = {name.split(" ")[0]: run["nfe"] for name, run in toy["samplers"].items()}
  assert nfes["PC"] == toy["pc_steps"]
  assert nfes["DPM-Solver++"] == toy["dpm_steps"]
  _check_ode_nfe(nfes["probability-flow"])
  # Held-out data are far more likely than points between the modes.
  assert toy["logp_data"] > toy["logp_off_manifold"] + 3.0

  digits = r["digits"]
  for name, run in digits["samplers"].items():
    assert run["finite"], name
  nfes = {name.split(" ")[0]: run["nfe"] for name, run in digits["samplers"].items()}
  assert nfes["PC"] == digits["pc_steps"]
  assert nfes["DPM-Solver++"] == digits["dpm_steps"]
  _check_ode_nfe(nfes["probability-flow"])
  assert math.isfinite(digits["bpd_test"]) and 0 < digits["bpd_test"] < 16
  assert math.isfinite(digits["bpd_shuffled"]) and digits["bpd_nfe"] > 0
  # Inpainting returns the known pixels exactly as given.
  assert digits["inpaint_finite"] and digits["inpaint_known_max_abs_diff"] == 0.0
  assert digits["inpaint_nfe"] == digits["pc_steps"]
  assert digits["classifier_test_accuracy"] > 0.9
  assert digits["cfg_nfe"] == digits["dpm_steps"]
  assert all(0.0 <= a <= 1.0 for a in digits["cfg_accuracy"].values())
