"""What a run tells its user: the log's lines, summary.csv, args.yaml and curves.png."""

import csv
import importlib
import re
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from trainer_helpers import MODEL

from fastkd.data.loaders import create_loaders
from fastkd.engine import checkpoint
from fastkd.engine import run as run_module
from fastkd.engine.cli import main
from fastkd.engine.config import parse_args
from fastkd.engine.evaluate import verdict
from fastkd.engine.run_folder import installed_version
from fastkd.optional import importable

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch LDRLD run on synthetic data, 4 steps an epoch, a log line every 2: its folder,
    its log lines and the epochs curves.png was drawn at."""
    output = tmp_path_factory.mktemp("runs")
    capture = pytest.MonkeyPatch()
    lines, drawn = [], []
    capture.setattr("sys.stdout", _Lines(lines))

    plot_curves = run_module.plot_curves

    def drawing(folder, rows, title):
        drawn.append(rows[-1]["epoch"])
        plot_curves(folder, rows, title)

    capture.setattr(run_module, "plot_curves", drawing)
    try:
        with pytest.raises(SystemExit) as stop:
            main(["--dataset", "synthetic", "--num-classes", "10", "--img-size", "32",
                  "--model", MODEL, "--teacher", MODEL, "--allow-untrained-teacher",
                  "--synthetic-samples", "32", "-b", "8", "--epochs", "2", "--lr", "0.01",
                  "--log-interval", "2", "--output", str(output), "--experiment", "run"])
    finally:
        capture.undo()
    assert stop.value.code == 0
    return output / "run", "".join(lines).splitlines(), drawn


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass


def test_each_line_is_timestamped_and_steps_are_logged_at_the_interval(run):
    _, lines, _ = run
    logged = [line for line in lines if re.match(TIMESTAMP, line)]
    assert logged and lines[0] == logged[0]
    steps = [line for line in logged if re.search(r"epoch \d \[\d/4\]", line)]
    assert [re.search(r"\[(\d)/4\]", line).group(1) for line in steps] == ["2", "4"] * 2
    for line in steps:
        assert re.search(r"loss [\d.]+ ce [\d.]+ local [\d.]+ rntk [\d.]+ lr 0\.01 \d+ img/s "
                         r"data \d+% eta \d+ s$", line), line


def test_summary_has_timm_columns_the_loss_parts_and_eval_loss(run):
    folder, _, _ = run
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    for column in ("lr", "train_loss", "train_ce", "train_local", "train_rntk", "eval_loss",
                   "eval_top1", "eval_top5", "data_wait"):
        assert all(float(row[column]) >= 0 for row in rows), column
    # eval_loss: the saved student's mean cross-entropy over the (regenerated) evaluation batch.
    student = timm.create_model(MODEL, num_classes=10)
    checkpoint.load_weights(student, str(folder / "last.pth"))
    _, val = create_loaders("synthetic", batch_size=8, image_size=32, num_classes=10,
                            synthetic_samples=32, seed=42)
    (images, labels), = list(val)
    with torch.no_grad():
        expected = F.cross_entropy(student.eval()(images), labels).item()
    assert float(rows[-1]["eval_loss"]) == pytest.approx(expected, rel=1e-5)


def module_version(module):
    """What ``module`` itself says its version is (importing it), or "not installed"."""
    return importlib.import_module(module).__version__ if importable(module) else "not installed"


def test_versions_of_modules_not_imported_are_read_without_importing_them(monkeypatch):
    """args.yaml names triton's and DALI's versions; a run that has not imported them reads their
    packages' metadata rather than importing them (DALI loads its CUDA libraries)."""
    for module in ("triton", "nvidia.dali"):
        expected = module_version(module)
        monkeypatch.delitem(sys.modules, module, raising=False)
        assert installed_version(module) == expected
        assert module not in sys.modules


def test_args_yaml_names_versions_and_commit_and_reads_back_as_a_config(run):
    folder, _, _ = run
    text = (folder / "args.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert f"torch {torch.__version__}" in header[0]
    for name, module in (("triton", "triton"), ("dali", "nvidia.dali")):
        assert f"{name} {module_version(module)}" in header[0]
    assert re.match(r"# fastkd commit ([0-9a-f]{40}(-dirty)?|unknown)$", header[1])
    saved = yaml.safe_load(text)
    assert saved["num_classes"] == 10 and saved["distiller"] == "ldrld"
    again = parse_args(["--config", str(folder / "args.yaml")])
    assert (again.model, again.lr, again.synthetic_samples) == (MODEL, 0.01, 32)


def test_curves_png_is_written_after_the_last_epoch(run):
    """Not after each epoch: at most every ``CURVES_EVERY_S`` (60 s), which this run is not."""
    folder, _, drawn = run
    assert drawn == [1]
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_pth_is_the_epoch_the_closing_table_calls_best(run):
    """The first of tied epochs is the best, in best.pth as in the table (and in timm)."""
    folder, lines, _ = run
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    best = max(rows, key=lambda row: float(row["eval_top1"]))
    assert any(f"best epoch ({best['epoch']})" in line for line in lines)
    assert torch.load(folder / "best.pth", weights_only=True)["epoch"] == int(best["epoch"]) + 1


@pytest.mark.parametrize("gains,words", [
    ((0.5, 0.2), "beats the CE baseline"),
    ((0.28, 0.0), "beats the CE baseline at the last epoch, not at the best"),
    ((-0.28, 0.28), "beats the CE baseline at the best epoch, not at the last"),
    ((0.0, -1.0), "does not beat the CE baseline")])
def test_the_closing_verdict_follows_both_gains(gains, words):
    """The new-user trial read "+0.28 last, +0.00 best: ... does not beat" and "-0.28 last,
    +0.28 best: ... does not beat" as contradicting their own numbers."""
    assert verdict(*gains) == words
