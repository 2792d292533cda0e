"""A user's own method: README's reverse-KL example, registered from Python and installed as an
entry point (``fastkd.methods``) for ``train/main.py``; the registry's refusals."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from trainer_helpers import FAST, MODEL, in_process

import fastkd
from fastkd.distillers import CE, Distiller, build_distiller, methods
from fastkd.engine.config import build_parser
from fastkd.methods import _METHODS as REGISTERED
from fastkd.methods import _load_entry_points as load_entry_points

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(first_line):
    """The fenced code block of README.md whose first line is ``first_line``."""
    blocks = re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S)
    return next(block for block in blocks if block.startswith(first_line + "\n"))


@pytest.fixture()
def reverse_kl(tmp_path):
    """README's reverse_kl.py, written out and imported; registered as "rkd" for the test."""
    path = tmp_path / "reverse_kl.py"
    path.write_text(readme_block("# reverse_kl.py"))
    spec = importlib.util.spec_from_file_location("reverse_kl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    REGISTERED.pop("rkd", None)


def test_a_registered_method_builds_computes_and_shows_in_help(reverse_kl):
    fastkd.register_method("rkd", reverse_kl.ReverseKL)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    task = build_distiller("rkd", student, teacher, temperature=2.0, weight=3.0).train()
    images, target = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 4])
    result = task(images, target)
    student_logits, teacher_logits = student(images), teacher(images)
    # KL(ps || pt) is kl_div with the roles swapped: input log pt, target log ps.
    reverse_kl_value = F.kl_div(F.log_softmax(teacher_logits / 2, 1),
                                F.log_softmax(student_logits / 2, 1), log_target=True,
                                reduction="batchmean") * 4
    torch.testing.assert_close(result["kd"], 3.0 * reverse_kl_value.detach())
    torch.testing.assert_close(result["loss"].detach(),
                               F.cross_entropy(student_logits, target).detach() + result["kd"])
    text = build_parser().format_help()
    assert "rkd options (with --distiller rkd)" in text and "--rkd-weight" in text
    assert "rkd" in re.search(r"--distiller \{([^}]*)\}", text).group(1).split(",")


def test_the_registry_refuses_what_it_cannot_train(reverse_kl):
    with pytest.raises(ValueError, match="method name must be lower case .* got 'Reverse-KL'"):
        fastkd.register_method("Reverse-KL", reverse_kl.ReverseKL)
    with pytest.raises(TypeError, match="must be a fastkd.distillers.Distiller subclass"):
        fastkd.register_method("rkd", torch.nn.Linear)
    with pytest.raises(ValueError, match=r"method 'ce' is already registered \(CE\)"):
        fastkd.register_method("ce", reverse_kl.ReverseKL)
    fastkd.register_method("ce", CE)  # the same class again: nothing changes

    class Untyped(Distiller):
        options_class = dict

    with pytest.raises(TypeError, match="options_class must be a dataclass deriving from"):
        fastkd.register_method("untyped", Untyped)
    assert set(methods()) == {"ce", "kd", "dkd", "ldrld", "hcd"}


def test_an_installed_entry_point_trains_with_the_trainer(tmp_path, demo_dir, teacher_checkpoint,
                                                        monkeypatch):
    """A package that declares the method in the entry-point group ``fastkd.methods`` (here its
    metadata and module on sys.path, as an installed distribution lays them out), found by the
    trainer's command line (in this interpreter: the registry reads the entry points afresh)."""
    site = tmp_path / "site"
    (site / "fastkd_rkd-0.1.dist-info").mkdir(parents=True)
    (site / "reverse_kl.py").write_text(readme_block("# reverse_kl.py"))
    (site / "fastkd_rkd-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fastkd-rkd\nVersion: 0.1\n")
    entry_points = readme_block('[project.entry-points."fastkd.methods"]')
    (site / "fastkd_rkd-0.1.dist-info" / "entry_points.txt").write_text(
        entry_points.replace('[project.entry-points."fastkd.methods"]', "[fastkd.methods]")
        .replace('"', ""))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "reverse_kl", raising=False)
    load_entry_points.cache_clear()
    try:
        help_text = in_process(["--help"])
        assert "--rkd-weight" in help_text.stdout, help_text.stderr[-2000:]
        refused = in_process(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "rkd",
                              "--rkd-temperature", "0", "--teacher", MODEL, "--output",
                              str(tmp_path / "refused"), *FAST])
        assert refused.returncode == 1 and (
            "error: --rkd-temperature: temperature must be positive, got 0.0" in refused.stderr)
        assert not (tmp_path / "refused").exists()  # refused before any work
        result = in_process(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "rkd",
                             "--rkd-weight", "2", "--teacher", MODEL,
                             "--teacher-checkpoint", teacher_checkpoint, "--output",
                             str(tmp_path), "--experiment", "rkd", *FAST])
    finally:  # the other tests see the built-in methods only
        REGISTERED.pop("rkd", None)
        load_entry_points.cache_clear()
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "rkd" / "args.yaml").read_text())
    assert (saved["distiller"], saved["rkd_weight"], saved["rkd_temperature"]) == ("rkd", 2.0, 4.0)
    summary = (tmp_path / "rkd" / "summary.csv").read_text().splitlines()
    assert "train_kd" in summary[0] and len(summary) == 2
