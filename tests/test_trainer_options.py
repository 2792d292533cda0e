"""The trainer's flags mean what timm train.py's mean: schedules against timm's own scheduler,
the presets' schedules against their recipes, flags generated from the options dataclasses, and
mistakes refused while parsing."""

import dataclasses
import math
import os

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from fastkd.distillers import method_options_classes
from fastkd.engine import demo_teacher
from fastkd.engine.config import (
    DEMO_TEACHER_MODELS,
    DEMO_TEACHERS,
    build_parser,
    method_options,
    off_recipe_warning,
    parse_args,
    recipe_method_flags,
)
from fastkd.engine.optim import create_optimizer, create_scheduler

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "train", "configs")


def rates(args):
    """The learning rate of each epoch of ``args``'s schedule, as the trainer sets it."""
    optimizer = create_optimizer(args, torch.nn.Linear(2, 2))
    scheduler = create_scheduler(args, optimizer)
    per_epoch = []
    for epoch in range(args.epochs):
        scheduler.step(epoch)
        per_epoch.append(optimizer.param_groups[0]["lr"])
    return per_epoch


def test_step_schedule_equals_timms_on_the_same_flags():
    """``--sched step --decay-epochs 1 --decay-rate 0.5``: decay_epochs is timm's interval."""
    args = parse_args(["--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
                       "--epochs", "5", "--lr", "0.4", "--warmup-epochs", "0"])
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.4)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=5, decay_epochs=1,
                                       decay_rate=0.5, warmup_epochs=0)
    expected = []
    for epoch in range(5):
        scheduler.step(epoch)
        expected.append(optimizer.param_groups[0]["lr"])
    assert rates(args) == pytest.approx(expected)
    assert expected == pytest.approx([0.4, 0.2, 0.1, 0.05, 0.025])


def test_warmup_and_cosine_floor_are_timms():
    args = parse_args(["--sched", "cosine", "--epochs", "10", "--lr", "0.1", "--warmup-epochs",
                       "2", "--warmup-lr", "0.01", "--min-lr", "0.001"])
    lr = rates(args)
    assert lr[0] == pytest.approx(0.01)  # the warm-up starts at --warmup-lr
    assert lr[1] == pytest.approx(0.01 + (0.1 - 0.01) / 2)
    assert min(lr[2:]) > 0.001 and lr[-1] < 0.005  # cosine towards --min-lr


def preset(name, tmp_path):
    # The CIFAR recipes' teachers have no public weights: the run would need a checkpoint file.
    return parse_args(["--config", os.path.join(CONFIGS, name), "--data-dir", str(tmp_path),
                       "--allow-untrained-teacher"])


@pytest.mark.parametrize("name", ["cifar100_resnet32x4_resnet8x4_ldrld.yaml",
                                  "cifar100_resnet32x4_resnet8x4_kd.yaml",
                                  "cifar100_resnet32x4_resnet8x4_dkd.yaml"])
def test_cifar_presets_state_their_recipe(name, tmp_path):
    """lr 0.05, x0.1 at epochs 150/180/210, 240 epochs, a linear 20-epoch warm-up."""
    lr = rates(preset(name, tmp_path))
    assert len(lr) == 240
    for first, last, rate in ((20, 150, 0.05), (150, 180, 0.005), (180, 210, 5e-4),
                              (210, 240, 5e-5)):
        assert lr[first:last] == pytest.approx([rate] * (last - first)), (first, rate)
    steps = [b - a for a, b in zip(lr[:20], lr[1:21])]
    assert steps == pytest.approx([steps[0]] * 20)  # linear, reaching 0.05 at epoch 20


def test_hcd_cifar_preset_states_its_recipe(tmp_path):
    """Cosine from 0.05 to 1e-3 over the 300 epochs, the first 3 a warm-up (OFA-KD's recipe)."""
    args = preset("cifar100_swint_resnet18_hcd.yaml", tmp_path)
    lr = rates(args)
    assert len(lr) == 300 and lr[0] < lr[1] < lr[2] < lr[3]
    for epoch in (3, 100, 200, 299):
        expected = 1e-3 + 0.5 * (0.05 - 1e-3) * (1 + math.cos(math.pi * epoch / 300))
        assert lr[epoch] == pytest.approx(expected)
    assert lr[299] == pytest.approx(1e-3, rel=1e-2)
    assert (args.smoothing, args.weight_decay, args.img_size) == (0.1, 0.002, 224)


def test_imagenet_presets_state_their_recipes(tmp_path):
    lr = rates(preset("imagenet_resnet34_resnet18_ldrld.yaml", tmp_path))
    assert lr == pytest.approx([0.2] * 30 + [0.02] * 30 + [0.002] * 30 + [2e-4] * 10)
    lr = rates(preset("imagenet_deit_tiny_resnet18_hcd.yaml", tmp_path))
    assert lr[0] < lr[4] < lr[5] == pytest.approx(0.1 * (1 + math.cos(math.pi * 5 / 100)))
    assert all(a > b for a, b in zip(lr[5:], lr[6:]))


def test_method_flags_come_from_the_options_dataclasses():
    args = parse_args([])
    for method, options_class in method_options_classes().items():
        for item in dataclasses.fields(options_class):
            assert getattr(args, f"{method}_{item.name}") == item.default, (method, item.name)
    args = parse_args(["--distiller", "hcd", "--hcd-stages", "2", "3", "--hcd-w-sdd", "3",
                       "--hcd-detach-target", "--hcd-cfm", "linear"])
    assert method_options(args) == method_options_classes()["hcd"](stages=(2, 3), w_sdd=3.0,
                                                         detach_target=True, cfm="linear")
    assert method_options(parse_args(["--distiller", "ce"])) is None


def test_help_names_the_defaults_each_dataset_gives():
    """--help says what an unset option becomes, per dataset, as ``fill_defaults`` fills it."""
    helps = {action.dest: action.help for action in build_parser()._actions}
    for dest, dataset in (("epochs", "glyphs"), ("epochs", "demo"), ("lr", "glyphs"),
                          ("batch_size", "demo"), ("sched", "glyphs")):
        value = getattr(parse_args(["--dataset", dataset]), dest)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"{dataset} {shown}" in helps[dest], (dest, helps[dest])
    general = parse_args(["--dataset", "folder", "--data-dir", CONFIGS, "--model", "resnet20",
                          "--distiller", "ce"])
    assert helps["epochs"].endswith(f"otherwise {general.epochs})")
    assert helps["decay_epochs"].endswith(f"(default: {general.decay_epochs:g})")


def test_a_method_run_without_its_datasets_recipe_settings_is_warned():
    """HCD's defaults (the authors') leave the glyphs' 5-epoch student at chance
    (bench/results/glyphs-hcd-recipe-2026-12-05/): such a run is warned, naming the recipe's
    flags; with them, or for another method or dataset, it is not."""
    warning = off_recipe_warning(parse_args(["--distiller", "hcd"]))
    assert warning == (
        "warning: --distiller hcd with --hcd-temperature 1 --hcd-w-sdd 6 has not trained in the "
        "--dataset glyphs recipe (its student stayed near chance); that recipe takes "
        "--hcd-temperature 4 --hcd-w-sdd 0.33 (README's evidence section)")
    assert "--hcd-temperature 4 --hcd-w-sdd 6" in off_recipe_warning(
        parse_args(["--distiller", "hcd", "--hcd-temperature", "4"]))
    recipe = recipe_method_flags("glyphs", "hcd")
    assert recipe == ["--hcd-temperature", "4", "--hcd-w-sdd", "0.33"]
    assert off_recipe_warning(parse_args(["--distiller", "hcd", *recipe])) is None
    assert off_recipe_warning(parse_args(["--distiller", "kd"])) is None
    assert off_recipe_warning(parse_args(["--distiller", "hcd", "--dataset", "demo"])) is None


def test_timm_flags_parse_as_in_timm():
    args = parse_args(["-j", "3", "--model-kwargs", "img_size=32", "patch_size=4", "name=x",
                       "--input-size", "3", "48", "48", "--torchcompile", "--model-ema",
                       "--clip-grad", "1.5", "--mixup", "0.2", "--cutmix", "1.0", "--aa",
                       "rand-m9-mstd0.5", "--reprob", "0.25", "--min-lr", "1e-5",
                       "--warmup-lr", "1e-4", "--distiller", "kd", "--opt", "adamw"])
    assert args.workers == 3
    assert args.model_kwargs == {"img_size": 32, "patch_size": 4, "name": "x"}
    assert args.input_size == [3, 48, 48] and args.torchcompile == "inductor"
    assert args.model_ema and args.model_ema_decay == 0.9998 and args.clip_grad == 1.5
    assert (args.mixup, args.cutmix, args.aa, args.reprob) == (0.2, 1.0, "rand-m9-mstd0.5", 0.25)
    assert parse_args(["--torchcompile", "eager"]).torchcompile == "eager"


@pytest.mark.parametrize("argv,message", [
    (["--distiller", "dkd", "--mixup", "0.2"], "--distiller dkd needs hard labels"),
    (["--distiller", "hcd", "--cutmix", "1.0"], "--distiller hcd needs hard labels"),
    (["--opt", "sgdd"], "--opt sgdd is not a timm optimizer"),
    (["--sched", "multistep", "--decay-milestones"], "expected at least one argument"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--decay-epochs", "0"], "--decay-epochs must be a positive number"),
    (["--reprob", "1.5"], "--reprob must be in [0, 1]"),
    (["--model-ema-decay", "1"], "--model-ema-decay must be in (0, 1)"),
    (["--input-size", "1", "32", "32"], "--input-size must be 3 H W with H = W"),
    (["--ldrld-top-d", "seven"], "argument --ldrld-top-d: invalid int value"),
    (["--hcd-cfm", "conv"], "argument --hcd-cfm: invalid choice"),
    (["--scale", "0", "1"], "--scale must be two area fractions 0 < low <= high <= 1"),
    (["--ratio", "1.5", "1"], "--ratio must be two aspect ratios 0 < low <= high"),
    (["--hflip", "-0.5"], "--hflip must be a probability in [0, 1], got -0.5"),
    (["--dataset", "cifar100", "--data-dir", ".", "--model", "resnet20", "--distiller", "ce",
      "--scale", "0.5", "1"],
     "--scale and --ratio set a random-resized crop; CIFAR-100 trains with a padded random"),
    # --val-split: a split the dataset lacks, or the training split
    (["--dataset", "demo", "--val-split", "test"], "--val-split test is not a split of demo (it "
     "has val)"),
    (["--dataset", "glyphs", "--distiller", "ce", "--val-split", "train"],
     "--val-split train is the training split"),
    (["--dataset", "glyphs", "--distiller", "ce", "--val-split", "extra"],
     "--val-split extra is not a split of glyphs (it has val, test)"),
    (["--dataset", "synthetic", "--model", "resnet20", "--distiller", "ce", "--val-split",
      "test"], "--val-split test is not a split of synthetic (it has val)"),
    (["--dataset", "cifar100", "--data-dir", ".", "--model", "resnet20", "--distiller", "ce",
      "--val-split", "test"], "--val-split test is not a split of cifar100 (it has val)"),
    (["--dataset", "glyphs", "--distiller", "ce", "--val-split", "../val"],
     "--val-split ../val must be a folder name"),
])
def test_mistakes_are_refused_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    error = capsys.readouterr().err
    assert message in error, error


def test_a_fastkd_teacher_gets_the_normalisation_it_was_trained_with(tmp_path):
    """A teacher checkpoint written by fastkd records its data_config; the teacher is fed that
    normalisation, whatever its model's pretrained_cfg says."""
    import timm

    from fastkd.engine.checkpoint import save_atomic
    from fastkd.engine.run import build_task
    from fastkd.models import data_config

    teacher = timm.create_model("resnet20", num_classes=10)
    path = tmp_path / "best.pth"
    save_atomic({"state_dict": teacher.state_dict(),
                 "data_config": {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}}, path)
    args = parse_args(["--distiller", "kd", "--teacher", "resnet20", "--teacher-checkpoint",
                       str(path), "--num-classes", "10"])
    student_config = data_config("resnet20")  # CIFAR-100's statistics
    task = build_task(args, student_config, args.teacher_checkpoint)
    images = torch.randn(2, 3, 32, 32)
    mean = torch.tensor(student_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(student_config["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(task.teacher_input(images), (images * std + mean - 0.5) / 0.25)


@pytest.mark.parametrize("has_bf16, amp, dtype", [(True, True, "bfloat16"), (False, False,
                                                                              "float16")])
def test_amp_on_the_cpu_is_recorded_as_it_trains(monkeypatch, has_bf16, amp, dtype):
    """args.yaml used to say float16 while a CPU trained bfloat16: the options now hold what
    trains (bfloat16, or fp32 without bf16 instructions), and autocast follows them."""
    from fastkd.engine import optim

    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: has_bf16)
    args = parse_args(["--dataset", "synthetic", "--model", "resnet20", "--distiller", "ce",
                       "--amp"])
    said = []
    optim.resolve_amp(args, torch.device("cpu"), said.append)
    assert (args.amp, args.amp_dtype) == (amp, dtype) and len(said) == 1
    assert optim.autocast_settings(args) == (optim.Autocast(True, torch.bfloat16) if amp
                                             else optim.Autocast(False))
    gpu = parse_args(["--dataset", "synthetic", "--model", "resnet20", "--distiller", "ce",
                      "--amp"])
    optim.resolve_amp(gpu, torch.device("cuda"), said.append)
    assert (gpu.amp, gpu.amp_dtype) == (True, "float16")  # CUDA: as asked


@pytest.mark.parametrize("dataset, classes", [("demo", 10), ("glyphs", 100)])
@pytest.mark.parametrize("argv", [[], ["--img-size", "24", "--scale", "0.3", "0.9", "--hflip",
                                       "0.25", "--seed", "3", "-b", "16", "--amp"],
                                  ["--distiller", "hcd", "--teacher", "vit_tiny_patch16_224",
                                   "--teacher-kwargs", "patch_size=4", "img_size=32"],
                                  ["--distiller", "hcd", "--teacher", "vit_tiny_hybrid_cifar"]])
def test_the_demo_teacher_options_are_its_command_lines(tmp_path, argv, dataset, classes):
    """Built in code (``default_args``), the demo teacher's options equal what the command line
    that names its settings (its dataset's recipe with ``DEMO_TEACHERS``' changes, then
    ``DEMO_TEACHER_MODELS``') parses to."""
    args = parse_args(["--dataset", dataset, "--output", str(tmp_path), *argv])
    args.num_classes = classes  # the trainer sets it from the data before the teacher
    built = demo_teacher.teacher_args(args)
    low, high = args.scale
    changes = {**DEMO_TEACHERS[dataset], **DEMO_TEACHER_MODELS.get(args.teacher, {})}
    recipe = [text for key, value in changes.items()
              for text in (f"--{key.replace('_', '-')}", str(value))]
    parsed = parse_args(["--dataset", dataset, "--distiller", "ce", "--model", args.teacher,
                         "--model-kwargs", *(f"{key}={value}"
                                             for key, value in args.teacher_kwargs.items()),
                         *recipe, "--img-size", str(args.img_size),
                         "--num-classes", str(args.num_classes), "--output", args.output,
                         "--experiment", built.experiment, "--resume", "auto",
                         "--seed", str(args.seed), "--workers", str(args.workers),
                         "--loader", args.loader, "--batch-size", str(args.batch_size),
                         "--log-interval", str(args.log_interval),
                         "--recovery-interval", str(args.recovery_interval),
                         "--scale", str(low), str(high), "--ratio", *map(str, args.ratio),
                         "--hflip", str(args.hflip), *(["--amp"] if args.amp else []),
                         "--amp-dtype", args.amp_dtype])
    assert vars(built) == vars(parsed)


def test_a_folder_datasets_split_must_be_a_folder_under_its_data_dir(tmp_path, capsys):
    for split in ("train", "val", "holdout"):
        (tmp_path / split / "a").mkdir(parents=True)
    (tmp_path / "notes").write_text("")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path), "--model", "resnet20",
              "--distiller", "ce"]
    assert parse_args([*folder, "--val-split", "holdout"]).val_split == "holdout"
    for split, problem in (("test", "does not exist"), ("notes", "is a file, not a folder")):
        with pytest.raises(SystemExit):
            parse_args([*folder, "--val-split", split])
        error = capsys.readouterr().err
        assert f"--val-split {split}: {tmp_path / split} {problem}" in error, error


def test_the_glyphs_test_split_is_allowed_and_recorded_like_every_option(tmp_path):
    from fastkd.engine.run_folder import write_args

    args = parse_args(["--dataset", "glyphs", "--distiller", "ce", "--val-split", "test"])
    assert args.val_split == "test"
    assert parse_args(["--dataset", "glyphs", "--distiller", "ce"]).val_split == "val"
    write_args(str(tmp_path), args)
    assert parse_args(["--config", str(tmp_path / "args.yaml")]).val_split == "test"


class RunStarted(Exception):
    pass


def test_the_demo_teacher_starts_from_its_seed_whatever_ran_before(tmp_path, monkeypatch):
    """The main job checks its settings by building its models before the teacher trains: the
    teacher's run is seeded as every run is (``seed_everything``), so its init owes nothing to
    what was drawn before it (its weights had changed when that check drew less)."""
    from types import SimpleNamespace

    from fastkd.engine import trainer

    args = parse_args(["--dataset", "demo", "--output", str(tmp_path)])
    args.num_classes = 10
    world = SimpleNamespace(rank=0, main=True, log=lambda line: None,
                            broadcast=lambda value: value, barrier=lambda: None)
    states = []

    def open_run(*_, **__):
        states.append(torch.random.get_rng_state())
        raise RunStarted

    monkeypatch.setattr(trainer, "open_run", open_run)
    monkeypatch.setattr(trainer, "resume_point", lambda *_: (None, None))
    for draws in (0, 1000):
        torch.rand(draws)
        with pytest.raises(RunStarted):
            trainer.train_demo_teacher(args, world, None, None)
    torch.manual_seed(args.seed)
    assert torch.equal(states[0], states[1])
    assert torch.equal(states[0], torch.random.get_rng_state())
