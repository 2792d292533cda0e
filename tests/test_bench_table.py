"""bench/demo_table.py, the evidence table: its statistics and files on hand-made numbers, its
command line's refusals, which runs it starts, and that a rerun skips finished rows. No training
here (the trainer's main job has its own tests)."""

import csv
import json
import math
import os

import pytest
from helpers import load_bench_script

HERE = os.path.dirname(__file__)

ROWS = [  # two methods, three seeds; kd's differences are 1, 2, 6
    {"method": "kd", "seed": 1, "baseline_top1": 80.0, "distilled_top1": 81.0},
    {"method": "kd", "seed": 2, "baseline_top1": 82.0, "distilled_top1": 84.0},
    {"method": "kd", "seed": 3, "baseline_top1": 78.0, "distilled_top1": 84.0},
    {"method": "ldrld", "seed": 1, "baseline_top1": 80.0, "distilled_top1": 79.5},
    {"method": "ldrld", "seed": 2, "baseline_top1": 82.0, "distilled_top1": 82.5},
    {"method": "ldrld", "seed": 3, "baseline_top1": 78.0, "distilled_top1": 78.0},
]


@pytest.fixture(scope="module")
def table():
    return load_bench_script("demo_table")


def test_statistics_by_hand(table):
    summary = table.summarise(ROWS)
    assert list(summary) == ["kd", "ldrld"]
    kd = summary["kd"]
    assert kd["seeds"] == [1, 2, 3]
    # Baseline 80, 82, 78: mean 80, squared deviations 0 + 4 + 4 over n - 1 = 2 -> std 2.
    assert kd["baseline"] == pytest.approx((80.0, 2.0))
    # Differences 1, 2, 6: mean 3, squared deviations 4 + 1 + 9 = 14 over 2 -> variance 7;
    # standard error sqrt(7) / sqrt(3).
    assert kd["difference"] == pytest.approx((3.0, math.sqrt(7 / 3)))
    # ldrld: differences -0.5, 0.5, 0 -> mean 0, variance 0.5 / 2, SE sqrt(0.25 / 3).
    assert summary["ldrld"]["difference"] == pytest.approx((0.0, math.sqrt(0.25 / 3)))


def test_a_method_with_one_seed_has_no_spread_and_is_left_out(table):
    assert list(table.summarise(ROWS + [{"method": "dkd", "seed": 1, "baseline_top1": 80.0,
                                         "distilled_top1": 81.0}])) == ["kd", "ldrld"]


def test_csv_round_trip_and_tables(table, tmp_path):
    path = tmp_path / "table.csv"
    table.write_rows(path, ROWS)
    with open(path, newline="") as handle:
        assert next(csv.reader(handle)) == ["method", "seed", "baseline_top1", "distilled_top1"]
    assert table.read_rows(path) == ROWS
    text = table.write_tables(str(tmp_path), ROWS, "glyphs")
    assert (tmp_path / "table.md").read_text() == text
    assert "| kd | 3 | 80.00 ± 2.00 | 83.00 ± 1.73 | +3.00 ± 1.53 |" in text
    assert "| ldrld | 3 | 80.00 ± 2.00 | 80.00 ± 2.29 | +0.00 ± 0.29 |" in text
    assert "the test split of --dataset glyphs" in text
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_csv_of_other_columns_is_refused(table, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("method,seed,top1\nkd,1,80\n")
    with pytest.raises(SystemExit, match="has columns"):
        table.read_rows(path)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fitnet"], "argument --methods: invalid choice: 'fitnet'"),
    (["--seeds", "11"], "--seeds needs 2 or more seeds"),
    (["--seeds", "11", "11"], "--seeds must differ from each other"),
    (["--seeds", "1", "-2"], "--seeds must be 0 or more"),
    (["--methods", "kd", "kd"], "--methods must differ from each other"),
    (["--output", __file__], f"--output {__file__} is a file, not a folder"),
    (["--epochs", "0"], "--epochs must be 1 or more, got 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more, got -1"),
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
])
def test_refusals_name_the_flag(table, tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        table.parse_args(["--output", str(tmp_path / "out"), "--seeds", "1", "2", *argv])
    error = capsys.readouterr().err
    assert message in error, error


def test_an_output_folder_holding_other_files_is_refused(table, tmp_path, capsys):
    """A table's own folder (its files, logs, runs and cached teachers) is taken, to finish it;
    a folder that holds anything else is refused before any run."""
    output = tmp_path / "out"
    for name in ("table.csv", "runs.json", "logs", "kd-seed1", "kd-seed1-ce-baseline",
                 "hcd-vit-seed2", "glyphs-teacher-wrn_16_2-100cls-32px-12ep-scale0.5-1-flip0"):
        (output / name).mkdir(parents=True)
    assert table.parse_args(["--output", str(output)]).output == str(output)
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        table.parse_args(["--output", str(output)])
    assert (f"--output {output} holds what a table does not write (notes.txt): give a new or "
            "empty folder") in capsys.readouterr().err


def test_choices_and_defaults_come_from_the_registry_and_the_trainer(table, tmp_path):
    from fastkd.engine.config import build_parser
    from fastkd.methods import methods

    args = table.parse_args(["--output", str(tmp_path)])
    distilling = [name for name, method in methods().items() if method.needs_teacher]
    assert list(args.methods) == distilling  # the ViT teacher's pairs only when asked
    assert {f"{name}-vit" for name in distilling} <= set(table.table_methods())
    assert args.dataset == build_parser().get_default("dataset")


def test_runs_share_baselines_and_teachers_and_a_rerun_skips_finished_rows(table, tmp_path,
                                                                           monkeypatch):
    """Per seed the first method is the main job, the others distil from the teacher it cached;
    hcd-vit's teacher model is trained once, by a main job of its own; a rerun trains nothing
    already in table.csv."""
    output = tmp_path / "out"
    commands = []

    def fake_run(command, **options):
        commands.append(command)
        experiment = command[command.index("--experiment") + 1]
        folder = output / experiment
        folder.mkdir(parents=True)
        # A main job records the cached teacher of its teacher model.
        model = command[command.index("--teacher") + 1] if "--teacher" in command else "default"
        teacher = command[command.index("--teacher-checkpoint") + 1] if (
            "--teacher-checkpoint" in command) else f"{output}/teacher-{model}.pth"
        (folder / "args.yaml").write_text(f"teacher_checkpoint: {teacher}\n")
        return table.subprocess.CompletedProcess(command, 0)

    scores = {}

    def fake_top1(args, checkpoint):
        return scores.setdefault(checkpoint, 50.0 + len(scores))

    monkeypatch.setattr(table.subprocess, "run", fake_run)
    monkeypatch.setattr(table, "held_out_top1", fake_top1)
    argv = ["--warmup-epochs", "0", "--methods", "kd", "hcd-vit", "ldrld", "--seeds", "11", "12",
            "--output", str(output), "--epochs", "1"]
    table.main(argv)

    def summary(command):
        flags = command[command.index("--distiller"):]
        teacher = flags[flags.index("--teacher-checkpoint") + 1] if (
            "--teacher-checkpoint" in flags) else None
        return (flags[flags.index("--experiment") + 1], teacher and os.path.basename(teacher))

    assert [summary(command) for command in commands] == [
        ("kd-seed11", None),  # main job: the default teacher, seed 11's baseline
        ("hcd-vit-seed11", None),  # main job: its ViT teacher is new
        ("ldrld-seed11", "teacher-default.pth"),
        ("kd-seed12", None),  # main job: seed 12's baseline
        ("hcd-vit-seed12", "teacher-vit_tiny_hybrid_cifar.pth"),
        ("ldrld-seed12", "teacher-default.pth")]
    assert commands[1][commands[1].index("--distiller"):][:8] == [
        "--distiller", "hcd", "--teacher", "vit_tiny_hybrid_cifar", "--hcd-temperature", "4",
        "--hcd-w-sdd", "0.33"]
    # The glyphs' recipe changes HCD's settings alone.
    assert not any(flag.startswith(("--hcd", "--kd-", "--ldrld")) for command in commands
                   if "hcd" not in command for flag in command)
    assert all(command[command.index("--epochs") + 1] == "1" for command in commands)
    assert all(command[command.index("--warmup-epochs") + 1] == "0" for command in commands)
    runs = json.loads((output / "runs.json").read_text())
    # Every method of a seed is compared with that seed's one baseline.
    assert {run["baseline"] for run in runs.values() if run["seed"] == 11} == {
        str(output / "kd-seed11-ce-baseline")}
    rows = table.read_rows(output / "table.csv")
    assert [(row["method"], row["seed"]) for row in rows] == [
        ("kd", 11), ("hcd-vit", 11), ("ldrld", 11), ("kd", 12), ("hcd-vit", 12), ("ldrld", 12)]
    assert len({row["baseline_top1"] for row in rows if row["seed"] == 11}) == 1
    assert all(isinstance(run["seconds"], float) for run in runs.values())

    commands.clear()
    table.main([*argv[:-4], "13", "--output", str(output)])  # seeds 11 12 13
    assert [summary(command) for command in commands] == [
        ("kd-seed13", None), ("hcd-vit-seed13", "teacher-vit_tiny_hybrid_cifar.pth"),
        ("ldrld-seed13", "teacher-default.pth")]
    assert len(table.read_rows(output / "table.csv")) == 9


def test_a_failed_run_stops_the_table_naming_its_log(table, tmp_path, monkeypatch):
    """A refused run's message is the trainer's own error line (of this attempt, not an earlier
    one in the same log); any other stop is resumed by the same command."""
    def failing(message):
        def run(command, stdout, **options):
            stdout.write(f"starting\n{message}")
            stdout.flush()
            return table.subprocess.CompletedProcess(command, 1)
        return run

    log = tmp_path / "logs" / "kd-seed1.log"
    monkeypatch.setattr(table.subprocess, "run", failing("error: --data-dir x has 1 class\n"))
    with pytest.raises(SystemExit) as stop:
        table.main(["--methods", "kd", "--seeds", "1", "2", "--output", str(tmp_path)])
    assert str(stop.value) == (f"error: kd-seed1 stopped with status 1 (its log: {log}): "
                               "error: --data-dir x has 1 class")
    monkeypatch.setattr(table.subprocess, "run", failing("Traceback: killed\n"))
    with pytest.raises(SystemExit) as stop:
        table.main(["--methods", "kd", "--seeds", "1", "2", "--output", str(tmp_path)])
    assert str(stop.value) == (f"error: kd-seed1 stopped with status 1 (its log: {log}): the "
                               "same command resumes the table there")
    assert not (tmp_path / "table.csv").exists()
