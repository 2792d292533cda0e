"""The command line is checked before torch is imported (a refused one answers at once); ``import
fastkd`` is light and still registers the CIFAR nets in timm, whichever of the two comes first."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastkd.distillers import CE, KD
from fastkd.methods import Method, methods

MAIN = Path(__file__).resolve().parents[1] / "train" / "main.py"


def python(code):
    """``code`` run in a fresh interpreter (this one has torch imported); its stdout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


HEAVY = {"torch", "timm", "triton", "torchvision"}


def refusal_without_torch(argv):
    """``python -X importtime train/main.py argv``: (exit status, its error output, the heavy
    top-level modules it imported, sorted)."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(MAIN), *argv],
                          capture_output=True, text=True)
    lines = done.stderr.splitlines()
    imported = {line.rpartition("|")[2].strip() for line in lines
                if line.startswith("import time:")}
    message = "\n".join(line for line in lines if not line.startswith("import time:"))
    return done.returncode, message, sorted(HEAVY & imported)


@pytest.mark.parametrize("argv, error", [
    (["--epochs", "-1"], "--epochs must be a positive number, got -1"),
    (["--epocs", "3", "--lr=0.1", "--no-such-flag"],
     "unrecognized arguments: --epocs 3 --no-such-flag (--epocs: did you mean --epochs?)"),
    (["--distiller", "nope"], "argument --distiller: invalid choice: 'nope'"),
    (["--ldrld-top-d", "x"], "argument --ldrld-top-d: invalid int value: 'x'"),
    (["--distiller", "kd", "--ldrld-alpha", "2"], "--ldrld-alpha would change nothing"),
    (["--hcd-cfm", "conv", "--distiller", "hcd"], "invalid choice: 'conv'"),
    (["--config", "missing.yaml"], "--config missing.yaml does not exist"),
    (["--dataset", "imagenet", "--model", "resnet50", "--distiller", "ce"],
     "--dataset imagenet needs --data-dir"),
    (["--scale", "0.5", "2"], "--scale must be two area fractions"),
    (["--model-kwargs", "img_size"], "--model-kwargs takes KEY=VALUE pairs, got 'img_size'"),
    (["--teacher-checkpoint", "x.pth", "--teacher-pretrained"], "exclude each other"),
    (["--eval-only", "missing.pth"], "--eval-only missing.pth does not exist"),
    (["--eval-only", str(MAIN), "--lr", "0.5"], "--lr would change nothing with --eval-only"),
])
def test_a_refused_command_line_imports_no_torch(argv, error):
    status, message, imported = refusal_without_torch(argv)
    assert status in (1, 2) and error in message and imported == [], (status, message, imported)


def test_what_only_timm_knows_is_checked_after_the_flags():
    """What the loss alone knows (its own options' rules, checked on a batch of the data's
    classes) comes after the flags too: test_under_torchrun_a_refusal_is_printed_once."""
    status, message, imported = refusal_without_torch(["--model", "resnet_nope"])
    assert status in (1, 2) and "--model resnet_nope is not a timm model" in message
    assert "torch" in imported
    # The flags are checked first: a bad number is refused without timm, beside a bad name.
    assert refusal_without_torch(["--model", "resnet_nope", "--lr", "0"])[2] == []


@pytest.mark.parametrize("argv, error, status, usage_lines", [
    (["--epocs", "3"], "(--epocs: did you mean --epochs?)", 2, 1),
    (["--version"], "fastkd-train ", 0, 0),  # not a refusal: said once too
    # Refused after the flags, with torch imported: the loss's own check of its options.
    (["--dataset", "synthetic", "--num-classes", "10", "--img-size", "32", "--model",
      "resnet20", "--distiller", "ldrld", "--ldrld-top-d", "0", "--teacher", "resnet20",
      "--allow-untrained-teacher"],
     "error: --ldrld-top-d: top_d must be an integer in 1..10 (the classes), got 0", 1, 0),
])
def test_under_torchrun_a_refusal_is_printed_once(tmp_path, argv, error, status, usage_lines):
    """Every process of the job refuses the same settings; the first alone says so, and exits
    first (the others wait silently), so that torchrun cannot stop it before it printed.
    ``--version`` and ``--help`` are printed once too."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(MAIN), *argv, "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert output.count(error) == 1, output
    assert output.count("usage: fastkd-train") == usage_lines, output
    assert "(process 1 of the node" not in output
    if status == 0:
        assert done.returncode == 0, output
    else:  # torchrun's report of the first process's exit
        assert done.returncode != 0
        assert f"(exitcode: {status}) local_rank: 0" in done.stderr, done.stderr


def test_a_refusal_met_by_another_process_alone_is_still_said(monkeypatch):
    """Had the first process not refused (settings that differ by node, a file missing on
    one), torchrun does not stop the others, which then say it themselves."""
    from fastkd.engine import refusal

    monkeypatch.setattr(refusal, "REPORT_WAIT_S", 0)
    refused = refusal.Refused("error: --resume x.pth: no such file")
    assert refusal.exit_status(refused, 0) == "error: --resume x.pth: no such file"
    assert refusal.exit_status(refused, 1).startswith(
        "error: --resume x.pth: no such file (process 1 of the node, pid ")


def test_importing_fastkd_imports_no_torch_until_its_losses_are_used():
    """Then timm, imported after fastkd, has the CIFAR nets (the import hook's order)."""
    assert python("import sys, fastkd; light = 'torch' not in sys.modules; "
                  "loss = fastkd.LDRLDLoss(); from fastkd import kd_loss; import timm; "
                  "print(light, 'torch' in sys.modules, type(loss).__module__, "
                  "'ldrld_loss' in dir(fastkd), kd_loss.__module__, timm.is_model('resnet8x4'), "
                  "timm.create_model('wrn_16_2', num_classes=3).__module__)") == (
        "True True fastkd.losses True fastkd.functional True fastkd.models.cifar")


def test_importing_timm_then_fastkd_registers_the_nets():
    assert python("import timm, fastkd; print(timm.is_model('resnet8x4'), "
                  "timm.create_model('wrn_16_2', num_classes=3).__module__)") == (
        "True fastkd.models.cifar")


def test_a_process_of_its_own_starts_up_without_the_collector_then_freezes_it():
    """``main()`` on the process's own command line (``train/main.py``, ``fastkd-train``)
    parses and imports with the garbage collector off, then freezes what is alive
    (``cli.start_up``); ``main(argv)`` from a caller's code leaves its collector alone."""
    assert python(
        "import gc, sys; from fastkd.engine import cli; parse = cli.parse_once_per_job; seen = []\n"
        "def watched(*args):\n"
        "    seen.append(gc.isenabled())\n"
        "    return parse(*args)\n"
        "cli.parse_once_per_job = watched\n"
        "for argv in (['--version'], None):\n"
        "    sys.argv = ['fastkd-train', '--version']\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        seen += [gc.isenabled(), gc.get_freeze_count() > 1000]\n"
        "print(seen)").splitlines()[-1] == "[True, True, False, False, True, True]"


def test_the_registry_describes_each_built_in_method_as_its_class_declares():
    """The command line reads each method's record before its class is imported; loading the
    class checks that the two agree."""
    for name, method in methods().items():
        distiller_class = method.load()
        assert (method.options_class, method.needs_teacher, method.needs_hard_labels) == (
            distiller_class.options_class, distiller_class.needs_teacher,
            distiller_class.needs_hard_labels), name
    wrong = Method("kd", "fastkd.distillers.kd:KD", needs_teacher=False)
    with pytest.raises(TypeError, match="method 'kd': fastkd.distillers.kd:KD declares"):
        wrong.load()
    assert Method("ce", CE, needs_teacher=False).load() is CE and KD.needs_teacher


def test_model_kwargs_parse_as_timm_parses_them():
    """``--model-kwargs`` is read without timm, as timm's own ``ParseKwargs`` reads it."""
    import argparse

    from timm.utils import ParseKwargs

    from fastkd.engine.config import build_parser

    values = ["drop_rate=0.1", "act_layer=gelu", "dims=(1, 2)", "name=a=b", "flag=True", ""]
    timm_parser = argparse.ArgumentParser()
    timm_parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    expected = timm_parser.parse_args(["--model-kwargs", *values]).model_kwargs
    assert build_parser().parse_args(["--model-kwargs", *values]).model_kwargs == expected
    assert expected["dims"] == (1, 2) and expected["name"] == "a=b"
