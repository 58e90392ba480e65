"""benchmarks/accelerator.py: its --tiny run leaves complete, consistent records and a table.

The full --tiny run compiles every network of the plan (minutes on 2 CPU cores): `slow`.
The default tier starts the script on its cheapest units (the input pipeline) and reads its
records and table.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")


def _script():
  spec = importlib.util.spec_from_file_location("accelerator_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # the module imports no JAX at top level
  return module


def _run(out, *flags):
  proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(out), *flags],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = json.loads((out / "cpu-tiny.json").read_text())
  table = (out / "cpu-tiny.md").read_text()
  return records, table, proc.stdout


def _rows(table):
  return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_tiny_pipeline_run_records_and_prints_its_table(tmp_path):
  records, table, stdout = _run(tmp_path, "--only", "pipeline")
  assert [r["unit"] for r in records] == ["pipeline-32", "pipeline-32", "pipeline-256",
                                          "pipeline-256"]
  assert {r["mode"] for r in records} == {"prefetch", "host"}
  for r in records:
    assert r["device_kind"] == "cpu" and r["tiny"] is True and not r.get("error"), r
    assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
  assert len(_rows(table)) == len(records)
  assert "unknown device (no MFU)" in table
  assert table in stdout  # printed as well


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  # Batches from 8 on "run out of memory" (simulated): the 8 -> 4 fallback path runs too.
  return _run(tmp_path_factory.mktemp("acc"), "--simulate-oom-batch", "8")


@pytest.mark.slow
def test_tiny_run_measures_everything_with_positive_finite_rates(tiny_run):
  records, _, _ = tiny_run
  by_unit = {}
  for r in records:
    by_unit.setdefault(r["unit"], []).append(r)
  want = ({"pipeline-32", "pipeline-256", "sample-dpm", "sample-pc", "inception", "bpd"}
          | {f"train-{n}-{d}-{b}" for n in ("ddpmpp", "ncsnpp") for d in ("float32", "bfloat16")
             for b in (2, 8, 4)}
          | {f"train-ddpmpp-{o}-{d}-2" for o in ("meanflow", "sct")
             for d in ("float32", "bfloat16")}
          | {"train-dit_xl2-bfloat16-2", "train-dit_xl2-fsdp-bfloat16-2"})
  assert set(by_unit) == want
  for r in records:
    assert r["device_kind"] == "cpu" and r["tiny"] is True
    assert not r.get("skipped"), r  # every objective of benchmarks/_objectives.py exists
    if r["unit"].endswith("-8"):  # the simulated out-of-memory batch: recorded, not measured
      assert r["oom"] is True and "RESOURCE_EXHAUSTED" in r["error"] and "images_per_s" not in r
      continue
    assert not r.get("error"), r
    assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
    assert r["mfu"] is None if "mfu" in r else True  # CPU is not in the peak table
    assert r["peak_memory_gb"] is None  # the CPU backend keeps no memory statistics
  assert {r["mode"] for r in by_unit["pipeline-32"]} == {"prefetch", "host"}


@pytest.mark.slow
def test_tiny_run_figures_are_consistent(tiny_run):
  records, _, _ = tiny_run
  for r in records:
    if r.get("error"):
      continue
    if r.get("skipped"):
      continue
    if r["name"].startswith("train"):
      # images/s is the global batch over the mean step time; the FLOP count is XLA's.
      assert r["per_device_batch"] == int(r["unit"].rsplit("-", 1)[1])
      assert r["batch"] == r["per_device_batch"] * r["device_count"]  # conftest: 4 CPU devices
      assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"], rel=1e-9)
      assert r["flops_per_step"] > 0 and r["compile_s"] > 0 and r["steps_timed"] == 2
      # The optimized and unoptimized programs count the same arithmetic within 2x.
      assert 0.5 < r["flops_per_step"] / r["flops_per_step_lowered"] < 2.0
      assert math.isfinite(r["loss"]) and r["step_memory_gb"] > 0
    if r["name"] == "train meanflow":  # beside the plain step of the same network and dtype
      plain = next(p for p in records if p["unit"] == f"train-ddpmpp-{r['dtype']}-2")
      assert r["time_ratio"] == pytest.approx(r["step_s"] / plain["step_s"], rel=1e-9)
      assert r["memory_ratio"] == pytest.approx(
          r["step_memory_gb"] / plain["step_memory_gb"], rel=1e-9)
      assert r["memory_ratio"] > 1.0  # the tangent's activations come on top
    if r["unit"] == "sample-pc":  # 5 steps timed, reported per 1000 steps
      assert r["steps_timed"] == 5 and r["nfe"] == 10
      assert r["images_per_s"] == pytest.approx(r["batch"] / (r["seconds"] * 200), rel=1e-9)
    if r["unit"] == "sample-dpm":
      assert r["nfe"] == 20
      assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-9)
    if r["unit"] == "bpd":
      assert r["nfe"] > 0 and 0 < r["mean_bpd"] < 100


@pytest.mark.slow
def test_tiny_run_writes_the_table(tiny_run):
  records, table, stdout = tiny_run
  rows = _rows(table)
  assert len(rows) == len(records)
  assert f"| train | ddpmpp | bfloat16 | {4 * records[0]['device_count']} |" in table
  assert "out of memory: MemoryError: RESOURCE_EXHAUSTED" in table
  assert "unknown device (no MFU)" in table
  assert table in stdout  # printed as well


@pytest.mark.slow
def test_one_process_per_measurement(tmp_path):
  # The accelerator default: every measurement in its own process.
  records, table, _ = _run(tmp_path, "--no-one-process", "--only", "inception,pipeline")
  assert [r["unit"] for r in records] == ["pipeline-32", "pipeline-32", "pipeline-256",
                                          "pipeline-256", "inception"]
  assert all(r["images_per_s"] > 0 for r in records) and len(_rows(table)) == 5


def test_plan_puts_the_jvp_steps_beside_the_plain_step_and_their_ratios():
  acc = _script()
  ids = [u["id"] for u in acc.plan(["train", "jvp"], tiny=False)]
  plain = [f"train-{n}-{d}-128" for n in ("ddpmpp", "ncsnpp") for d in ("float32", "bfloat16")]
  jvp = [f"train-ddpmpp-{o}-{d}-128" for o in ("meanflow", "sct")
         for d in ("float32", "bfloat16")]
  assert ids[:8] == plain + jvp  # batch 128 first, the large batches after
  assert [u["id"] for u in acc.plan(["jvp"], tiny=True)] == [i[:-4] + "-2" for i in jvp]
  unit = acc.plan(["jvp"], tiny=False)[1]
  assert acc.describe(unit)["name"] == "train meanflow"
  assert acc.describe(unit)["objective"] == "meanflow" and unit["dtype"] == "bfloat16"
  base = {"network": "ddpmpp", "dtype": "bfloat16", "batch": 128}
  plain_rec = {**base, "name": "train", "objective": "denoising", "step_s": 0.2,
               "step_memory_gb": 10.0}
  other = {**plain_rec, "dtype": "float32", "step_s": 0.4}
  jvp_rec = {**base, "name": "train meanflow", "objective": "meanflow", "step_s": 0.3,
             "step_memory_gb": 12.5}
  ratios = acc.jvp_ratios(jvp_rec, [plain_rec, other])
  assert ratios["time_ratio"] == pytest.approx(1.5) and ratios["memory_ratio"] == pytest.approx(1.25)
  assert ratios["peak_memory_ratio"] is None  # no device statistics (CPU)
  assert ratios["note"] == "1.50x the plain step's time, 1.25x its memory plan"
  ratios = acc.jvp_ratios({**jvp_rec, "peak_memory_gb": 14.0},
                          [{**plain_rec, "peak_memory_gb": 10.0}])
  assert ratios["peak_memory_ratio"] == pytest.approx(1.4)
  assert ratios["note"].endswith(", 1.40x its peak memory")
  assert acc.jvp_ratios(jvp_rec, [other]) == {}  # no plain step of that dtype
  assert acc.jvp_ratios(plain_rec, [plain_rec]) == {}  # the plain step itself


def test_peak_table_and_mfu():
  acc = _script()
  h100 = acc.chip_peak("NVIDIA H100 80GB HBM3")
  assert h100["name"] == "H100 SXM" and h100["bf16"] == 989.5e12 and h100["fp32"] == 67e12
  assert acc.chip_peak("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
  assert acc.chip_peak("NVIDIA H200")["name"] == "H200 SXM"
  assert acc.chip_peak("NVIDIA GH200 480GB")["name"] == "GH200"
  assert acc.chip_peak("NVIDIA A100-SXM4-40GB")["tf32"] == 156e12
  assert acc.chip_peak("NVIDIA L40S")["name"] == "L40S"  # not L4
  assert acc.chip_peak("NVIDIA L4")["name"] == "L4"
  assert acc.chip_peak("NVIDIA A10G") is None  # not A10, not A100
  assert acc.chip_peak("Tesla V100-SXM2-16GB")["bf16"] is None
  assert acc.chip_peak("TPU v4")["bf16"] == 275e12
  assert acc.chip_peak("TPU v5 lite")["name"] == acc.chip_peak("TPU v5e")["name"] == "TPU v5e"
  assert acc.chip_peak("TPU v5p")["name"] == acc.chip_peak("TPU v5")["name"] == "TPU v5p"
  assert acc.chip_peak("TPU v6 lite")["bf16"] == 918e12
  assert acc.chip_peak("cpu") is None
  # float32 runs as TF32 on such GPUs unless the default precision asks for true f32.
  assert acc.peak_for(h100, "float32", "gpu", None) == (494.5e12, "tf32")
  assert acc.peak_for(h100, "float32", "gpu", "highest") == (67e12, "fp32")
  assert acc.peak_for(h100, "bfloat16", "gpu", None) == (989.5e12, "bf16")
  assert acc.peak_for(acc.chip_peak("TPU v4"), "float32", "tpu", None) == (275e12, "fp32")
  assert acc.peak_for(None, "float32", "cpu", None) == (None, None)
  # 100 TFLOP per step in 0.25 s on a 989.5 TFLOP/s chip.
  assert acc.mfu(100e12, 0.25, 989.5e12) == pytest.approx(400 / 989.5)
  assert acc.mfu(None, 0.25, 989.5e12) is None and acc.mfu(1e12, 0.25, None) is None
