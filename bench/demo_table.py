"""The evidence table: what each distillation method adds to a CE-only student, over seeds, on
held-out images that no run selected on.

``python bench/demo_table.py --methods kd ldrld --seeds 11 12 13 --output DIR`` trains, per
seed, one CE baseline and one distilled student per method with the trainer's main job (README's
``torchrun --standalone --nproc-per-node N train/main.py --distiller METHOD --amp --seed SEED``),
then scores each run's LAST checkpoint on the dataset's test split (its validation split where
it has no test split, as the digits) with the trainer's ``--eval-only --val-split``. Work is
shared: per seed the first method runs as the main job (its CE baseline is the seed's baseline;
the teacher is trained once per teacher model and cached in DIR), the other methods of the seed
distil from that cached teacher (``--teacher-checkpoint``, as the main job's args.yaml records
it), and only a method whose teacher model no run has trained yet runs as a main job again.

Writes, in DIR beside the runs: ``table.csv`` (method, seed, baseline_top1, distilled_top1),
``runs.json`` (per method and seed: seconds, folders, teacher), ``table.md`` (per method the
baseline's and the distilled student's mean ± sample std, and the paired difference's mean ±
standard error) and ``table.png`` (the paired differences with their standard errors). Rerun with
the same ``--output`` to finish an interrupted table: finished rows are kept, an interrupted run
continues from its last checkpoint (``--resume auto``).
"""

import argparse
import csv
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

from fastkd.data.splits import FIXED_SPLITS
from fastkd.engine.config import (
    FOREIGN_ENTRIES,
    build_parser,
    recipe_method_flags,
    unwritable_folder,
)
from fastkd.files import atomic_write
from fastkd.methods import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("method", "seed", "baseline_top1", "distilled_top1")
# The heterogeneous pairs (METHOD-vit): a small ViT teacher (ViT-Tiny blocks on a convolutional
# stem's 8x8 tokens, fastkd.models; trained by its own recipe, DEMO_TEACHER_MODELS) into the CNN
# student.
VIT_TEACHER = ("--teacher", "vit_tiny_hybrid_cifar")


def table_methods():
    """``{table method: (distiller, teacher flags)}``: every registered method that distils
    (installed plug-ins' included) with the dataset's default teacher, and as ``<method>-vit``
    with the ViT teacher. Methods with the same teacher flags share one trained teacher."""
    distilling = [name for name, method in methods().items() if method.needs_teacher]
    return {**{name: (name, ()) for name in distilling},
            **{f"{name}-vit": (name, VIT_TEACHER) for name in distilling}}


def held_out_split(dataset):
    """The split scored: test where the dataset has one, else val (the digits have no test; the
    students are scored at their last epoch, never selected on it)."""
    return "test" if "test" in FIXED_SPLITS[dataset] else "val"


# What a table writes in its folder: its files (and their atomic writes' temporary files), the
# runs' logs, the runs and the cached teachers.
TABLE_ENTRY = re.compile(r"(table\.(csv|md|png)|runs\.json)(\.\d+\.tmp)?|logs|"
                         r"[a-z0-9_-]+-seed\d+(-ce-baseline)?|[a-z0-9_]+-teacher-.+")


def not_the_tables(output):
    """The entries of an existing folder ``output`` that no table writes, sorted."""
    if not os.path.isdir(output):
        return []
    return sorted(name for name in os.listdir(output) if not TABLE_ENTRY.fullmatch(name))


def parse_args(argv=None):
    """The table's options, refused before any run with an error naming the flag."""
    trainer = build_parser()
    choices = tuple(table_methods())
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="the runs, cached teachers and table files go here")
    # The -vit pairs only when asked: their ViT teacher trains 24 epochs first (about 13 min on
    # 2 cores).
    parser.add_argument("--methods", nargs="+", choices=choices,
                        default=tuple(name for name in choices if not name.endswith("-vit")),
                        help="default: every registered method that distils; METHOD-vit "
                        "distils from a hybrid ViT teacher instead")
    parser.add_argument("--seeds", nargs="+", type=int, default=(1, 2, 3, 4, 5),
                        help="default: 1 2 3 4 5, README's table")
    parser.add_argument("--dataset", default=trainer.get_default("dataset"),
                        choices=tuple(FOREIGN_ENTRIES),
                        help="a dataset fastkd writes itself (default: the main job's)")
    parser.add_argument("--nproc-per-node", type=int, default=2,
                        help="training processes (torchrun's option; default: README's main "
                        "job's 2, whose global batch the recipe was chosen with)")
    group = parser.add_argument_group("passed to every training run (default: the recipe's)")
    group.add_argument("--epochs", type=int, help="the students' epochs (not the teacher's)")
    group.add_argument("--warmup-epochs", type=int,
                       help="the students' lr warm-up epochs (not the teacher's)")
    group.add_argument("--data-dir", help="where the dataset is written (default: user cache)")
    group.add_argument("-j", "--workers", type=int)
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error(f"--seeds needs 2 or more seeds (a sample std and a standard error need "
                     f"two), got {len(args.seeds)}")
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be 0 or more (the trainer's --seed), got {args.seeds}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ from each other, got {args.seeds}")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods must differ from each other, got {args.methods}")
    problem = unwritable_folder(args.output)
    if problem:
        parser.error(f"--output {args.output} {problem}")
    foreign = not_the_tables(args.output)
    if foreign:
        parser.error(f"--output {args.output} holds what a table does not write "
                     f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): give a "
                     "new or empty folder, or an earlier table's folder to finish that table")
    for name in ("epochs", "nproc_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    for name in ("warmup_epochs", "workers"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    # The trainer runs in the repository's folder: paths are passed absolute.
    args.output = os.path.abspath(args.output)
    args.data_dir = args.data_dir and os.path.abspath(args.data_dir)
    return args


def given_flags(args, names):
    """``--name value`` of each of ``names`` that the table's command line set."""
    return [text for name in names if getattr(args, name) is not None
            for text in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def passed_flags(args):
    """The options every run gets from the table's command line (training and scoring)."""
    return ["--dataset", args.dataset, *given_flags(args, ("data_dir", "workers"))]


def training_command(args, method, seed, teacher_checkpoint=None):
    """The trainer's command line for ``method`` at ``seed``: the main job, or with
    ``teacher_checkpoint`` a distillation from that (cached) teacher alone."""
    distiller, teacher_flags = table_methods()[method]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.nproc_per_node),
               os.path.join(REPO, "train", "main.py"), "--distiller", distiller, *teacher_flags,
               *recipe_method_flags(args.dataset, distiller),
               "--amp", "--seed", str(seed), *passed_flags(args), "--output", args.output,
               "--experiment", f"{method}-seed{seed}", "--resume", "auto",
               *given_flags(args, ("epochs", "warmup_epochs"))]
    if teacher_checkpoint:
        command += ["--teacher-checkpoint", teacher_checkpoint]
    return command


@functools.cache
def _world():
    from fastkd.engine.distributed import World

    return World()


def held_out_top1(args, checkpoint):
    """Top-1 (%) of ``checkpoint``'s student on the held-out split, scored in this process by
    the trainer's ``--eval-only`` (its return value, not its log)."""
    from fastkd.engine.config import parse_args as trainer_args
    from fastkd.engine.trainer import run_job

    scores = run_job(trainer_args(["--eval-only", checkpoint, "--val-split",
                                   held_out_split(args.dataset), *passed_flags(args)]), _world())
    return scores["student"][0]


# ---- the table's files: read back on a rerun, rewritten whole after each run ----

def read_rows(path):
    """table.csv's rows (seeds as int, top-1 as float); none if there is no file yet."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise SystemExit(f"error: {path} has columns {reader.fieldnames}, not {COLUMNS}: "
                             "give another --output")
        return [{"method": row["method"], "seed": int(row["seed"]),
                 "baseline_top1": float(row["baseline_top1"]),
                 "distilled_top1": float(row["distilled_top1"])} for row in reader]


def write_rows(path, rows):
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def write_json(path, value):
    with atomic_write(path) as handle:
        json.dump(value, handle, indent=1)


# ---- statistics ----

def mean_and_std(values):
    """Mean and sample standard deviation (n - 1)."""
    return statistics.mean(values), statistics.stdev(values)


def mean_and_standard_error(values):
    """Mean and its standard error: sample std / sqrt(n)."""
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows):
    """Per method (in order of first appearance): seeds, baseline and distilled mean ± std, the
    paired difference (distilled - baseline of the same seed) mean ± standard error. A method
    with fewer than 2 rows has no spread and is left out."""
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for method, runs in by_method.items():
        if len(runs) < 2:
            continue
        summary[method] = {
            "seeds": [run["seed"] for run in runs],
            "baseline": mean_and_std([run["baseline_top1"] for run in runs]),
            "distilled": mean_and_std([run["distilled_top1"] for run in runs]),
            "difference": mean_and_standard_error([run["distilled_top1"] - run["baseline_top1"]
                                                   for run in runs])}
    return summary


def markdown(summary, dataset, split):
    lines = ["| method | seeds | baseline (CE) top-1 | distilled top-1 | "
             "distilled - baseline (paired) |", "|---|---|---|---|---|"]
    for method, stats in summary.items():
        lines.append(f"| {method} | {len(stats['seeds'])} | {_spread(stats['baseline'])} | "
                     f"{_spread(stats['distilled'])} | {_spread(stats['difference'], '+.2f')} |")
    return "\n".join(lines) + (
        f"\n\nTop-1 % of each run's last checkpoint on the {split} split of --dataset {dataset}. "
        "Baseline and "
        "distilled: mean ± sample std over the seeds; the difference: per seed, distilled minus "
        "that seed's baseline, mean ± standard error (std / sqrt(n)).\n")


def _spread(mean_and_spread, form=".2f"):
    mean, spread = mean_and_spread
    return f"{mean:{form}} ± {spread:.2f}"


def plot(summary, path, split):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[name]["difference"][0] for name in names]
    errors = [summary[name]["difference"][1] for name in names]
    figure, axes = plt.subplots(figsize=(max(4.5, 1.2 * len(names) + 2), 3.5))
    axes.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel(f"distilled - baseline top-1 ({split}), pts")
    axes.set_title("per seed, distilled - its baseline: mean ± standard error", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_tables(output, rows, dataset):
    summary = summarise(rows)
    split = held_out_split(dataset)
    text = markdown(summary, dataset, split)
    with atomic_write(os.path.join(output, "table.md")) as handle:
        handle.write(text)
    if summary:
        plot(summary, os.path.join(output, "table.png"), split)
    return text


# ---- the runs ----

def teacher_checkpoint_of(run_folder):
    """The teacher a run distilled from, as its args.yaml records it (the main job's cached
    teacher included)."""
    import yaml

    with open(os.path.join(run_folder, "args.yaml")) as handle:
        return yaml.safe_load(handle)["teacher_checkpoint"]


def train(args, method, seed, runs):
    """Train ``method`` at ``seed`` (see the module's docstring for which runs are main jobs);
    returns its record for runs.json."""
    teacher = " ".join(table_methods()[method][1])  # "": the dataset's default teacher
    teachers = {run["teacher"]: run["teacher_checkpoint"] for run in runs.values()}
    baselines = {run["seed"]: run["baseline"] for run in runs.values()}
    main_job = seed not in baselines or teacher not in teachers
    command = training_command(args, method, seed,
                               None if main_job else teachers[teacher])
    name = f"{method}-seed{seed}"
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    os.makedirs(os.path.join(args.output, "logs"), exist_ok=True)
    log_path = os.path.join(args.output, "logs", f"{name}.log")
    with open(log_path, "a") as log:
        start = log.tell()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if status.returncode:
        with open(log_path) as log:
            log.seek(start)
            refusals = [line.strip() for line in log if line.startswith("error: ")]
        # A refusal (the trainer's "error: ..." line) wants other settings; anything else (a
        # signal, a crash) is resumed by the same command.
        raise SystemExit(f"error: {name} stopped with status {status.returncode} (its log: "
                         f"{log_path}): " + (f"{refusals[-1]}" if refusals else
                                             "the same command resumes the table there"))
    folder = os.path.join(args.output, name)
    # The seconds of this command (a run resumed after an interruption: of its last part).
    return {"method": method, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "main_job": main_job, "run": folder,
            # A main job's own baseline is the seed's unless the seed had one already.
            "baseline": baselines.get(seed, f"{folder}-ce-baseline"),
            "teacher": teacher, "teacher_checkpoint": teacher_checkpoint_of(folder)}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    table, record = (os.path.join(args.output, name) for name in ("table.csv", "runs.json"))
    rows, runs = read_rows(table), read_json(record)
    done = {(row["method"], row["seed"]) for row in rows}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            run = train(args, method, seed, runs)
            rows.append({"method": method, "seed": seed,
                         "baseline_top1": round(held_out_top1(
                             args, os.path.join(run["baseline"], "last.pth")), 4),
                         "distilled_top1": round(held_out_top1(
                             args, os.path.join(run["run"], "last.pth")), 4)})
            runs[f"{method}-seed{seed}"] = run
            write_json(record, runs)
            write_rows(table, rows)
    print(write_tables(args.output, rows, args.dataset))


if __name__ == "__main__":
    main()
