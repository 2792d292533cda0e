"""The trainer end to end: real torchrun processes on the demo JPEGs, checkpoints, signals,
resume, options."""

import csv
import os
import re
import shutil
import signal
import sys

import pytest
import timm
import torch
import yaml
from trainer_helpers import (
    FAST,
    MAIN,
    MODEL,
    assert_nothing_outlives_the_run,
    run_main,
    start,
    wait_for,
)

from fastkd.engine import checkpoint
from fastkd.engine.config import parse_args
from fastkd.engine.run_folder import check_not_behind
from fastkd.methods import methods

DISTILLERS = [name for name, method in methods().items() if method.needs_teacher]


def two_process_jobs(inputs):
    """Each distiller under torchrun, with a loader worker a process (conftest's one launch)."""
    return {distiller: ["--dataset", "demo", "--data-dir", inputs.demo_dir, "--distiller",
                        distiller, "--teacher", MODEL, "--teacher-checkpoint",
                        inputs.teacher_checkpoint, "--output", inputs.output(distiller),
                        "--experiment", "run", *FAST, "--workers", "1"]
            for distiller in DISTILLERS}


@pytest.mark.parametrize("distiller", DISTILLERS)
def test_two_process_run_of_each_distiller(demo_dir, two_process_jobs, distiller):
    """Each distiller under torchrun to a clean end: its files, its parts in summary.csv, and
    nothing alive after main() in either process."""
    result, output = two_process_jobs(distiller)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_nothing_outlives_the_run(result)
    folder = os.path.join(output, "run")
    assert {"args.yaml", "summary.csv", "last.pth", "best.pth", "curves.png"} <= set(
        os.listdir(folder))
    with open(os.path.join(folder, "summary.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and 0 <= float(rows[0]["eval_top1"]) <= 100
    a_part = {"kd": "train_kd", "dkd": "train_kd", "ldrld": "train_rntk", "hcd": "train_sce"}
    assert {"train_loss", "train_ce", a_part[distiller]} <= set(rows[0])
    state = torch.load(os.path.join(folder, "last.pth"), weights_only=True)
    assert state["epoch"] == 1 and state["args"]["distiller"] == distiller
    assert yaml.safe_load(open(os.path.join(folder, "args.yaml")))["distiller"] == distiller
    assert f"teacher   {MODEL}" in result.stdout and f"student   {MODEL}" in result.stdout
    if distiller == "kd":
        # The two ranks' BatchNorm statistics are averaged before evaluation (timm's dist-bn
        # reduce), so the saved student scores what the run recorded.
        evaluation = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--eval-only",
                               os.path.join(folder, "best.pth"), "--workers", "0", "--loader",
                               "torch"])
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        assert f"top-1 {float(rows[0]['eval_top1']):.2f}" in evaluation.stdout


def test_killed_run_resumes_where_it_stopped(demo_dir, tmp_path, monkeypatch):
    # 15 steps an epoch: the kill comes long before the last epoch ends.
    args = ["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce", "--output",
            str(tmp_path), "--experiment", "run", *FAST, "--epochs", "3", "--batch-size", "16"]
    process = start([sys.executable, MAIN, *args])
    last = tmp_path / "run" / "last.pth"
    wait_for(last, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(last, weights_only=True)
    assert 1 <= saved["epoch"] < 3  # killed mid-run

    from fastkd.engine.distributed import World  # the resumed state, checked in process
    from fastkd.engine.trainer import Run

    resumed_args = parse_args(args + ["--resume", str(last)])
    from fastkd.data.loaders import create_loaders
    from fastkd.models import data_config

    config = data_config(MODEL)
    loaders = create_loaders("demo", demo_dir, batch_size=128, loader="torch", workers=0,
                             mean=config["mean"], std=config["std"])
    resumed_args.num_classes = loaders[0].num_classes  # as run_job resolves it
    run = Run(resumed_args, World(), loaders, config)
    run.resume(torch.load(last, weights_only=True), str(last))
    assert run.position == (saved["epoch"], 0)
    restored = run.optimizer.state_dict()
    for key, value in saved["optimizer"]["state"].items():
        assert torch.equal(restored["state"][key]["momentum_buffer"], value["momentum_buffer"])

    # A kill between an epoch's two checkpoint writes leaves a best.pth for the best_top1 that
    # last.pth records (else a resumed run that never improves on it ends without best.pth).
    run.run_dir = str(tmp_path / "killed-while-saving")
    os.makedirs(run.run_dir)
    written, save_atomic = [], checkpoint.save_atomic

    def save_then_die(state, path):
        if written:
            raise KeyboardInterrupt("killed")
        save_atomic(state, path)
        written.append(os.path.basename(path))

    monkeypatch.setattr("fastkd.engine.run.checkpoint.save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.save(saved["epoch"] + 1, best=True)
    assert written == ["best.pth"] and os.listdir(run.run_dir) == ["best.pth"]
    monkeypatch.undo()

    result = run_main(args + ["--resume", str(last)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at epoch {saved['epoch']}" in result.stdout
    with open(tmp_path / "run" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    # The demo's schedule, set again by timm's scheduler after the resume: one warm-up epoch
    # at --warmup-lr 0.01, then --lr 0.02 (the first decay comes at epoch 5).
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.01, 0.02, 0.02])
    assert torch.load(last, weights_only=True)["epoch"] == 3

    # A checkpoint behind its folder's last.pth would take the run back over later epochs
    # (test_preemption checks the other resume rules, in process).
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("args.yaml", "last.pth")}
    early = tmp_path / "run" / "early.pth"
    torch.save(saved, early)
    with pytest.raises(SystemExit, match=f"--resume {early} was saved at epoch {saved['epoch']} "
                                         f"but {last} at epoch 3: resuming in that folder would "
                                         "overwrite the later steps"):
        check_not_behind(str(early), (saved["epoch"], 0))
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_resume_refuses_changed_settings_before_any_work(demo_dir, tmp_path,
                                                         teacher_checkpoint):
    folder = os.path.dirname(teacher_checkpoint)
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}
    result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "kd",
                       "--teacher", "resnet20", "--output", str(tmp_path), *FAST, "--model",
                       "resnet8x4", "--resume", teacher_checkpoint])
    assert result.returncode != 0
    assert (f"--resume refuses a run with different settings: --model '{MODEL}' -> "
            "'resnet8x4'; --teacher 'wrn_16_2' -> 'resnet20'; --distiller 'ce' -> 'kd'; ") \
        in result.stderr
    # Every setting that changes training is named with both values: the optimiser's too.
    for change in ("--lr 0.05 -> 0.02", "--warmup-epochs 0 -> 1",
                   "--epochs 6 -> 1 (it may only grow)"):
        assert change in result.stderr
    assert "demo teacher" not in result.stdout  # refused before it would train one
    assert os.listdir(tmp_path) == []
    assert {name: os.path.getmtime(os.path.join(folder, name))
            for name in os.listdir(folder)} == before  # the resumed run's files untouched


def test_non_finite_loss_stops_the_run(demo_dir, tmp_path):
    result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce",
                       "--output", str(tmp_path), "--experiment", "run", *FAST,
                       "--lr", "1e30", "--warmup-epochs", "0", "--batch-size", "16"])
    assert result.returncode != 0
    assert "error: non-finite loss at epoch 0" in result.stderr
    assert "no checkpoint was saved before it" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "best.pth")


def config_refusal(argv, capsys):
    """What ``parse_args(argv)`` says as it refuses a config file: argparse's error (status 2,
    after the usage line)."""
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.startswith("usage: "), error
    return error


def test_config_file_and_command_line(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("model: resnet8x4\nteacher: resnet32x4\nlr: 0.5\nepochs: 3\n"
                      "sched: multistep\ndecay-milestones: [1, 2]\n")
    args = parse_args(["--config", str(config), "--lr", "0.1"])
    assert (args.model, args.teacher, args.lr, args.epochs) == ("resnet8x4", "resnet32x4", 0.1, 3)
    assert list(args.decay_milestones) == [1, 2]
    config.write_text("learning_rate: 0.1\n")
    assert re.search("unknown option 'learning_rate'",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("decay-epochs: [30, 60]\n")  # the old milestone list
    assert re.search(r"decay-epochs takes one value, got \[30, 60\]",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("lr: fast\n")
    assert re.search("lr: invalid float value 'fast'",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("amp: 'false'\n")  # a string, which would switch AMP on
    assert re.search("amp takes true or false, got 'false'",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("clip-mode: Norm\n")  # argparse's choices hold for the file too
    assert re.search(r"clip-mode: invalid choice 'Norm' \(choose from 'norm', 'value', 'agc'\)",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("input-size: [3, 32]\n")
    assert re.search(r"input-size takes 3 values, got \[3, 32\]",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("model-kwargs: drop_rate=0.1\n")
    assert re.search("model-kwargs takes a mapping of KEY: VALUE, got 'drop_rate=0.1'",
                     config_refusal(["--config", str(config)], capsys))
    config.write_text("model: resnet20\nmodel-kwargs: {drop_rate: 0.1}\n")  # as args.yaml has it
    assert parse_args(["--config", str(config)]).model_kwargs == {"drop_rate": 0.1}
    config.write_text("batch-size: 32.5\n")
    assert re.search("batch-size: invalid int value 32.5",
                     config_refusal(["--config", str(config)], capsys))
    assert re.search("does not exist",
                     config_refusal(["--config", str(tmp_path / "missing.yaml")], capsys))
    assert re.search(f"--config {tmp_path} is a folder, not a YAML file",
                     config_refusal(["--config", str(tmp_path)], capsys))
    config.write_text("model: [1, 2\n")  # PyYAML's own parser error, in one line
    assert re.search(r"recipe.yaml is not valid YAML: while parsing a flow sequence .* "
                     r"expected ',' or ']'",
                     config_refusal(["--config", str(config)], capsys))


@pytest.mark.parametrize("argv,message", [
    (["--distiller", "fitnet"], "invalid choice: 'fitnet'"),
    (["--dataset", "imagenet", "--model", "resnet18", "--teacher", "resnet50"],
     "--dataset imagenet needs --data-dir"),
    (["--dataset", "imagenet", "--data-dir", "/no/such/dir", "--model", "resnet18",
      "--teacher", "resnet50"], "--data-dir /no/such/dir does not exist"),
    (["--teacher-checkpoint", "/no/such.pth"], "--teacher-checkpoint /no/such.pth does not exist"),
    (["--epochs", "0"], "--epochs must be a positive number, got 0"),
    (["--distiller", "kd", "--dataset", "cifar100", "--data-dir", "/", "--model", "resnet8x4"],
     "--distiller kd needs --teacher"),
    (["--dataset", "folder", "--distiller", "kd"], "--dataset folder needs --data-dir; --model "
     "is required for this dataset; --distiller kd needs --teacher"),  # all at once
    (["--resume", "/tmp"], "--resume /tmp is a folder, not a checkpoint file"),
    (["--resume", "auto"], "--resume auto needs --experiment NAME (the run folder to continue)"),
    (["--experiment", "../elsewhere"],
     "--experiment must be a folder name (the run goes to OUTPUT/NAME), got '../elsewhere'"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
    (["--bad-images", "maybe"], "argument --bad-images: invalid choice: 'maybe'"),
    (["--model", "resnet_nope"], "--model resnet_nope is not a timm model"),
    (["--distiller", "kd", "--teacher", "wrn_nope"], "--teacher wrn_nope is not a timm model"),
    (["--model-kwargs", "img_size"], "--model-kwargs takes KEY=VALUE pairs, got 'img_size'"),
    (["--input-size", "3", "32", "48"], "--input-size must be 3 H W with H = W"),
    (["--log-interval", "0"], "--log-interval must be a positive number, got 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--distiller", "ce", "--teacher", "wrn_16_2"], "--teacher acts only with a --distiller "
     "other than ce (ce trains without a teacher): here it would change nothing"),
    (["--sched", "cosine", "--decay-milestones", "3", "6"],
     "--decay-milestones acts only with --sched multistep: here it would change nothing"),
    (["--amp-dtype", "bfloat16"], "--amp-dtype acts only with --amp"),
    (["--mixup-prob", "0.5"], "--mixup-prob acts only with --mixup, --cutmix or --cutmix-minmax"),
    (["--clip-mode", "agc"], "--clip-mode acts only with --clip-grad"),
    (["--dataset", "synthetic", "--model", "resnet20", "--distiller", "ce", "--bad-images",
      "error"], "--dataset synthetic makes random tensors on the device: --bad-images would "
     "change nothing"),
    (["--dataset", "folder", "--data-dir", __file__, "--model", "resnet20", "--distiller", "ce"],
     f"--data-dir {__file__} is a file, not a folder"),
    (["--teacher-pretrained", "--teacher-checkpoint", __file__],
     "--teacher-checkpoint and --teacher-pretrained exclude each other"),
    (["--distiller", "kd", "--teacher", "resnet20", "--ldrld-top-d", "5", "--hcd-stages", "2"],
     "--hcd-stages, --ldrld-top-d would change nothing: --distiller kd does not use them"),
    (["--torchcompile", "inductr"], "--torchcompile inductr is not a torch.compile backend; "
     "choose from "),
    (["--output", __file__], f"--output {__file__} is a file, not a folder; runs go to OUTPUT/<run name>/"),
    (["--output", f"{__file__}/runs"], f"--output {__file__}/runs is under {__file__}, which is "
     "a file"),
    (["--output", "/proc/runs"], "--output /proc/runs cannot be made: making a folder in /proc "
     "fails ("),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--experiment", ""], "--experiment must be a folder name (the run goes to OUTPUT/NAME), "
     "got ''"),
    (["--recovery-interval", "-5"], "--recovery-interval must be 0 or more, got -5"),
    (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs 3 must be below --epochs 2"),
    (["--dataset", "folder", "--data-dir", "/", "--model", "resnet20", "--distiller", "kd",
      "--teacher", "resnet20"], "--distiller kd needs the teacher's weights: "
     "--teacher-checkpoint FILE or --teacher-pretrained (or --allow-untrained-teacher"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    error = capsys.readouterr().err
    assert message in error
    assert len(error.splitlines()) == 2  # a one-line usage, not all the options, then the error


def test_presets_parse():
    folder = os.path.join(os.path.dirname(__file__), os.pardir, "train", "configs")
    presets = sorted(name for name in os.listdir(folder) if name.endswith(".yaml"))
    assert len(presets) >= 5
    for name in presets:
        args = parse_args(["--config", os.path.join(folder, name), "--data-dir", "/",
                           "--allow-untrained-teacher"])
        assert args.model and args.epochs > 0


def test_timm_flags_end_to_end(demo_dir, teacher_checkpoint, tmp_path, capsys):
    """A ViT student at 32 px from the command line (two blocks: its model kwargs travel in the
    checkpoint), distilled from a CIFAR-net teacher (another normalisation) with EMA, gradient
    clipping, mixup/cutmix, RandAugment, random erasing and torch.compile; its best.pth loads
    with timm and evaluates with --eval-only."""
    result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "kd",
                       "--teacher", MODEL, "--teacher-checkpoint", teacher_checkpoint,
                       "--output", str(tmp_path), "--experiment", "vit", *FAST,
                       "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                       "patch_size=8", "depth=2", "--img-size", "32", "--model-ema",
                       "--clip-grad", "1",
                       "--mixup", "0.2", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5",
                       "--reprob", "0.25", "--torchcompile", "eager", "-j", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "vit"
    with open(folder / "summary.csv") as handle:
        row = next(csv.DictReader(handle))
    assert {"eval_top1", "eval_ema_top1", "train_ce", "train_kd"} <= set(row)
    saved = torch.load(folder / "best.pth", weights_only=True)
    assert saved["data_config"]["mean"] == (0.5, 0.5, 0.5)  # the ViT's own normalisation
    student = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32,
                                patch_size=8, depth=2)
    timm.models.load_checkpoint(student, str(folder / "best.pth"))  # the EMA weights
    for key, value in saved["state_dict_ema"].items():
        assert torch.equal(student.state_dict()[key], value), key

    evaluation = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--eval-only",
                           str(folder / "best.pth"), "--workers", "0", "--loader", "torch"])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "student vit_tiny_patch16_224" in evaluation.stdout
    with pytest.raises(SystemExit):  # the checkpoint's settings, not these, would be used
        parse_args(["--eval-only", str(folder / "best.pth"), "--epochs", "3", "--distiller",
                    "hcd", "--workers", "0"])
    assert ("error: --distiller, --epochs would change nothing with --eval-only (it evaluates "
            "the checkpoint's student with the model settings saved in it)"
            in capsys.readouterr().err)
    assert f"top-1 {float(row['eval_top1']):.2f}" in evaluation.stdout
    assert f"top-1 {float(row['eval_ema_top1']):.2f}" in evaluation.stdout
    assert os.listdir(tmp_path) == ["vit"]  # an evaluation writes no run folder


@pytest.mark.parametrize("argv,message", [
    (["--distiller", "hcd", "--hcd-stages", "1", "2", "3", "4"],
     f"error: --distiller hcd on --model {MODEL}: stages must be a subset of (1, 2, 3) for "
     "CifarNet, got (1, 2, 3, 4)"),
    (["--distiller", "ce", "--model-kwargs", "drop_rate=0.1"],
     f"error: --model {MODEL} (kwargs drop_rate=0.1) cannot be built: {MODEL} takes no options"),
    (["--aa", "nonsense"], "error: auto_augment (--aa) 'nonsense' is not a timm auto-augment "
     "string"),
    (["--aa", "original", "--loader", "dali"], "DALI has no such policy (of timm's auto-augment "
     "strings it implements only 'v0'); --loader torch runs timm's"),
    (["--distiller", "ce", "--model", "vit_tiny_patch16_224"], "error: --model "
     "vit_tiny_patch16_224 does not take 32x32 inputs (--img-size 32): Input height (32) doesn't "
     "match model (224).; timm's ViTs take --model-kwargs img_size=32"),
    (["--distiller", "kd", "--teacher", "resnet18", "--teacher-pretrained"], "error: "
     "--teacher-pretrained: cannot get resnet18's pretrained weights ("),
])
def test_settings_the_models_or_loaders_refuse_cost_no_demo_teacher(demo_dir, tmp_path, argv,
                                                                     message):
    """Refused in one line before the demo teacher would train, and nothing is written."""
    options = [*FAST, *argv] if "--loader" not in argv else [
        *[option for option in FAST if option not in ("--loader", "torch")], *argv]
    result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--output",
                       str(tmp_path / "out"), *options])
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "demo teacher" not in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def untrained_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("untrained") / "resnet20.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet20", num_classes=10).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def one_class_data(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-class")
    for split in ("train", "val"):
        first = sorted(os.listdir(os.path.join(demo_dir, split)))[0]
        shutil.copytree(os.path.join(demo_dir, split, first), root / split / first)
    return str(root)


@pytest.mark.parametrize("case,message", [
    ("untrained teacher", "error: the teacher resnet20 scores"),
    ("num classes", "error: --num-classes 5 but the data has 10 classes"),
    ("top d", "error: --ldrld-top-d: top_d must be an integer in 1..10 (the classes), got 20"),
    ("nan weight", "error: --dkd-beta: beta must be a finite number >= 0, got nan"),
    ("hcd weight", "error: --hcd-w-ol: w_ol must be a finite number >= 0, got -1.0"),
    ("warm-up", "error: --dkd-warmup-epochs: warmup_epochs must be an integer >= 0, got -1"),
    ("one class", "has 1 class folder: classification needs at least 2"),
    ("no train split", "/no-train: image folder {data}/train does not exist (expected "
     "root/<class>/*.JPEG)"),
])
def test_mistakes_found_with_the_data_leave_no_folder(demo_dir, untrained_teacher,
                                                      one_class_data, tmp_path, case, message):
    """Refused in one line before the first step and before any folder: a teacher at chance
    level, classes that do not match the data, a loss setting the loss refuses (its own rules,
    one source of them, checked on a batch of the data's classes: after the flags, which
    ``parse_args`` takes)."""
    data = {"one class": one_class_data, "no train split": str(tmp_path / "no-train")}.get(
        case, demo_dir)
    os.makedirs(data, exist_ok=True)
    extra = {"untrained teacher": ["--teacher", "resnet20", "--teacher-checkpoint",
                                   untrained_teacher],
             "num classes": ["--num-classes", "5"],
             "top d": ["--ldrld-top-d", "20"],
             "nan weight": ["--dkd-beta", "nan"],
             "hcd weight": ["--hcd-w-ol", "-1"],
             "warm-up": ["--dkd-warmup-epochs", "-1"],
             "one class": ["--distiller", "ce"],
             "no train split": ["--distiller", "ce"]}[case]
    loss_options = {"top d": "ldrld", "nan weight": "dkd", "warm-up": "dkd", "hcd weight": "hcd"}
    if case in ("num classes", *loss_options):  # not the teacher's check
        extra += ["--distiller", loss_options.get(case, "ldrld"), "--teacher", "resnet20",
                  "--allow-untrained-teacher"]
    argv = ["--dataset", "folder", "--data-dir", data, "--output", str(tmp_path / "out"), *FAST,
            *extra]
    if case in loss_options:
        parse_args(argv)
    result = run_main(argv)
    assert result.returncode == 1, result.stderr[-2000:]
    assert message.format(data=data) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
