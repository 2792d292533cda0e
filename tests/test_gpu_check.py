"""The GPU check's CPU-safe parts: ``bench/gpu_check.sh --dry-run`` and the end-to-end
section's handling of a real trainer run (``bench/trainer_e2e.py``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)
import trainer_e2e  # noqa: E402


def test_dry_run_sets_up_every_section(tmp_path):
    result = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "=== trainer-e2e: exit 0" in result.stdout
    assert "=== collect: exit 0" in result.stdout
    report = json.loads((tmp_path / "trainer_e2e.json").read_text())
    names = [run[0] for run in report["runs"]]
    assert names == ["gpu-decode", "cpu-decode", "synthetic-ldrld", "synthetic-ce", "sigterm",
                     "fp16", "hcd", "compile", "cached"]
    markdown = (tmp_path / "trainer_e2e.md").read_text()
    assert all(f"| {name} |" in markdown for name in names)
    assert "gpu-decode / cpu-decode: unmeasured (target >= 2.0)" in markdown
    assert "cached / gpu-decode (live teacher): unmeasured (target >= 1.4)" in markdown


@pytest.mark.parametrize("arguments, message", [
    (["--only", "tests", "OUT"], "--only takes trainer, kernels or cache, got 'tests'"),
    (["--fast", "OUT"], "unknown option '--fast'"),
    ([], "usage: bench/gpu_check.sh"),
    (["OUT", "OTHER"], "one OUTDIR expected, got 'OUT' and 'OTHER'"),
    (["OUT"], "no CUDA GPU here"),  # without --dry-run it measures a GPU
])
def test_bad_options_are_refused_before_any_work(tmp_path, arguments, message):
    if message == "no CUDA GPU here" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), *arguments],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_run_is_measured_from_its_summary(tmp_path, monkeypatch):
    """A real (CPU, gloo) trainer run under torchrun: its closing report is recognised, it is not
    taken for a hang, and its figures come from summary.csv."""
    # One thread, as the suite's other runs (trainer_helpers.ENV): torchrun leaves a single
    # process's thread count alone, and two threads beside the other xdist worker's spin idle.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = ["--dataset", "synthetic", "--model", "resnet20", "--distiller", "ce",
               "--num-classes", "10", "--img-size", "32", "--synthetic-samples", "64", "-b", "16",
               "--epochs", "2", "--log-interval", "2"]
    run_dir = tmp_path / "runs" / "tiny"
    result = trainer_e2e.measure("tiny", options, str(run_dir), str(tmp_path / "tiny.log"),
                                 cap=240)
    assert result["exit"] == 0, result.get("log_tail")
    assert result["hung_at_exit"] is False
    assert result["epoch"] == 1 and result["images_per_s"] > 0
    assert 0 <= result["data_wait"] < 1
    assert result["process_group"] == "process group: gloo, 1 process on cpu"
    assert trainer_e2e.CLOSING_REPORT.search((tmp_path / "tiny.log").read_text())


@pytest.mark.parametrize("ratio, met", [(2.5, True), (1.5, False)])
def test_targets_are_ratios_against_their_bounds(ratio, met):
    results = {"gpu-decode": {"images_per_s": 1000.0 * ratio},
               "cpu-decode": {"images_per_s": 1000.0}}
    checks = {what: (value, bound, ok) for what, value, bound, ok
              in trainer_e2e.targets(results, {})}
    assert checks["gpu-decode / cpu-decode"] == (pytest.approx(ratio), 2.0, met)
    assert checks["synthetic ce / train_throughput.py ce"] == (None, 0.95, False)
