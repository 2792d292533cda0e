"""Preemption measured: real signals at many stop points, kill -9, an elastic resume, and what
signal agreement and recovery checkpoints cost (``python bench/preemption.py --output DIR``).

Every run is the real trainer under ``torchrun --standalone --nproc-per-node 2`` on the demo
digits (``--data-dir``: a demo tree, e.g. the tests' 240-image cut or the full one), CE on
resnet20 for 2 epochs, a log line every step. For each loader (torch ``-j 0``, torch ``-j 2``,
DALI ``-j 2``) one uninterrupted run is the reference; then at each stop point a run is
signalled and started again with the same command (``--resume auto``), and its last.pth is
compared with the reference's (``checkpoint.differences``). Stop points: random steps, the end of
an epoch's last step (the signal lands in evaluation), steps of a run that saves every step
(``--recovery-interval 1``: the signal often lands in a write) and steps of the demo teacher's
training (``--distiller kd`` without a teacher: the demo trains its own first; the resumed job's
teacher and student are compared with an uninterrupted demo job's). The signal goes to every
process of the job (as SLURM) or to torchrun alone (which forwards it), alternately.

Writes DIR/preemption.json and DIR/preemption.md.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastkd.engine import checkpoint  # noqa: E402

LOADERS = {"torch -j 0": ["--loader", "torch", "--workers", "0"],
           "torch -j 2": ["--loader", "torch", "--workers", "2"],
           "dali -j 2": ["--loader", "dali", "--workers", "2"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def command(data_dir, output, experiment, options, processes=2):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable])
    return [*launcher, os.path.join(REPO, "train", "main.py"), "--dataset", "demo", "--data-dir",
            data_dir, "--output", output, "--experiment", experiment, "--resume", "auto",
            "--log-interval", "1", *options]


def run(argv, log):
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=ENV).returncode


def job_pids(root):
    """``root`` and all its descendants."""
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    queue += [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            pass
    return found


def interrupt(argv, log, pattern, target, number=signal.SIGTERM):
    """Start ``argv``, signal it once ``pattern`` is logged; ``(exit status, seconds from the
    signal to the exit)``, or None if the run ended before the pattern."""
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                   start_new_session=True)
    while True:
        with open(log) as handle:
            if pattern in handle.read():
                break
        if process.poll() is not None:
            return None
        time.sleep(0.05)
    pids = job_pids(process.pid) if target == "every process" else [process.pid]
    sent = time.perf_counter()
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass
    status = process.wait()
    return status, time.perf_counter() - sent


def stop_points(count, steps, seed):
    """``count`` (kind, log pattern, extra options) stop points over 2 epochs of ``steps``."""
    chooser = random.Random(seed)
    points = [("evaluation", f"epoch {epoch} [{steps}/{steps}]", []) for epoch in (0, 1)]
    points += [("checkpoint write",
                f"epoch {chooser.randrange(2)} [{chooser.randint(2, steps - 1)}/",
                ["--recovery-interval", "1"]) for _ in range(2)]
    # The demo teacher trains 8 epochs first; the students 2: epoch 2 and later are the teacher's.
    points += [("demo teacher", f"epoch {chooser.randint(2, 7)} [1/",
                ["--distiller", "kd", "--teacher", "resnet20"]) for _ in range(2)]
    while len(points) < count:
        points.append(("step", f"epoch {chooser.randrange(2)} [{chooser.randint(1, steps - 1)}/",
                       []))
    return points


def final_states(output, experiment, demo):
    """``{name: checkpoint}`` of a finished job: its run, and for the demo its teacher's."""
    states = {"student": checkpoint.load(os.path.join(output, experiment, "last.pth"))}
    if demo:
        teacher = next(name for name in os.listdir(output) if name.startswith("demo-teacher"))
        states["teacher"] = checkpoint.load(os.path.join(output, teacher, "last.pth"))
    return states


def signals_section(args, train_steps):
    results = []
    for loader, loading in LOADERS.items():
        base = ["--distiller", "ce", "--model", "resnet20", "--epochs", "2", "--batch-size",
                str(args.batch_size), *loading]
        references = {}
        for number, (kind, pattern, extra) in enumerate(stop_points(args.points, train_steps,
                                                                    args.seed)):
            demo = kind == "demo teacher"
            options = [*base, *extra] if not demo else [*base[2:], *extra]
            folder = os.path.join(args.output, "signals", loader.replace(" ", ""),
                                  f"{number:02d}-{kind.replace(' ', '-')}")
            key = "demo" if demo else "plain"
            if key not in references:  # one uninterrupted job of each kind per loader
                reference = os.path.join(args.output, "signals", loader.replace(" ", ""),
                                         f"reference-{key}")
                assert run(command(args.data_dir, reference, "run", options),
                           reference + ".log") == 0, reference
                references[key] = final_states(reference, "run", demo)
            os.makedirs(folder, exist_ok=True)
            target = ("every process", "launcher")[number % 2]
            stopped = interrupt(command(args.data_dir, folder, "run", options),
                                os.path.join(folder, "stopped.log"), pattern, target)
            if stopped is None:
                print(f"{loader} {kind} {pattern}: ended before the signal", flush=True)
                continue
            status, seconds = stopped
            with open(os.path.join(folder, "stopped.log")) as handle:
                log = handle.read()
            saved = " saved " in log
            stopped_at = log.split("(resumes at ")[1].split(")")[0] if saved else None
            resumed = run(command(args.data_dir, folder, "run", options),
                          os.path.join(folder, "resumed.log"))
            differences = []
            if resumed == 0:
                for name, state in final_states(folder, "run", demo).items():
                    differences += [f"{name}: {item}" for item in
                                    checkpoint.differences(state, references[key][name])]
            results.append({"loader": loader, "kind": kind, "at": pattern, "target": target,
                            "status": status, "saved": saved, "stopped_at": stopped_at,
                            "seconds_to_exit": seconds,
                            "resumed_status": resumed,
                            "identical": resumed == 0 and not differences,
                            "differences": differences[:5]})
            print(json.dumps(results[-1]), flush=True)
    return results


def kill_section(args, train_steps):
    """kill -9 of every process with --recovery-interval 5 at random steps: steps lost."""
    options = ["--distiller", "ce", "--model", "resnet20", "--epochs", "2", "--batch-size",
               str(args.batch_size), *LOADERS["torch -j 2"], "--recovery-interval", "5"]
    reference = os.path.join(args.output, "kill", "reference")
    assert run(command(args.data_dir, reference, "run", options), reference + ".log") == 0
    expected = checkpoint.load(os.path.join(reference, "run", "last.pth"))
    chooser, results = random.Random(args.seed + 1), []
    for trial in range(args.kills):
        folder = os.path.join(args.output, "kill", f"{trial:02d}")
        os.makedirs(folder, exist_ok=True)
        epoch, step = chooser.randrange(2), chooser.randint(6, train_steps - 1)
        log = os.path.join(folder, "killed.log")
        if interrupt(command(args.data_dir, folder, "run", options), log,
                     f"epoch {epoch} [{step}/", "every process", signal.SIGKILL) is None:
            continue
        with open(log) as handle:
            logged = [line for line in handle if " [" in line and "epoch" in line]
        done_epoch, done = logged[-1].split("epoch ")[1].split(" [")[0], logged[-1].split(
            "[")[1].split("/")[0]
        saved = checkpoint.load(os.path.join(folder, "run", "last.pth"))
        lost = ((int(done_epoch) - saved["epoch"]) * train_steps + int(done) - saved["step"])
        resumed = run(command(args.data_dir, folder, "run", options),
                      os.path.join(folder, "resumed.log"))
        identical = resumed == 0 and not checkpoint.differences(
            checkpoint.load(os.path.join(folder, "run", "last.pth")), expected)
        results.append({"killed_after": f"epoch {done_epoch} step {done}",
                        "saved_at": f"epoch {saved['epoch']} step {saved['step']}",
                        "steps_lost": lost, "identical": identical})
        print(json.dumps(results[-1]), flush=True)
    return results


ELASTIC_MODELS = {  # BatchNorm normalises over each process's batch; LayerNorm over a sample
    "resnet20": [],
    "vit (LayerNorm)": ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                        "patch_size=8"],
}


def elastic_section(args, train_steps):
    """Stopped on 2 processes (batch B each), resumed on 1 (batch 2B): the same global batches;
    how far the weights end from the 2-process run's. A BatchNorm net normalises over each
    process's batch, so its maths changes with the split; a LayerNorm net's only by the order of
    the sums."""
    results = {}
    for name, model in ELASTIC_MODELS.items():
        options = ["--distiller", "ce", "--model", "resnet20", "--epochs", "2", *model,
                   *LOADERS["torch -j 2"]]
        folder = os.path.join(args.output, "elastic", name.split()[0])
        two = [*options, "--batch-size", str(args.batch_size)]
        assert run(command(args.data_dir, folder, "reference", two),
                   folder + "-reference.log") == 0
        assert interrupt(command(args.data_dir, folder, "run", two), folder + "-stopped.log",
                         f"epoch 0 [{train_steps // 2}/", "every process") is not None
        one = [*options, "--batch-size", str(2 * args.batch_size)]
        assert run(command(args.data_dir, folder, "run", one, processes=1),
                   folder + "-resumed.log") == 0
        reference = checkpoint.load(os.path.join(folder, "reference", "last.pth"))
        resumed = checkpoint.load(os.path.join(folder, "run", "last.pth"))
        gaps = [((resumed["state_dict"][key].double() - value.double()).abs().max().item(),
                 value.double().abs().max().item())
                for key, value in reference["state_dict"].items() if value.is_floating_point()]
        results[name] = {
            "max_abs_difference": max(gap for gap, _ in gaps),
            "max_relative_difference": max(gap / scale for gap, scale in gaps if scale),
            "top1": [state["summary"][-1]["eval_top1"] for state in (reference, resumed)],
            "train_loss": [state["summary"][-1]["train_loss"] for state in (reference, resumed)]}
        print(name, json.dumps(results[name]), flush=True)
    return results


def cost_section(args):
    """Recovery checkpoints: the median img/s of runs with --recovery-interval 5 over runs
    without, interleaved; signal agreement: one poll's time against a training step's."""
    options = ["--distiller", "ce", "--model", "resnet20", "--epochs", "2", "--batch-size",
               "64", *LOADERS["torch -j 2"], "--log-interval", "50"]
    rates = {"without": [], "with": []}
    for trial in range(args.cost_trials):
        for label, extra in (("without", []), ("with", ["--recovery-interval", "5"])):
            folder = os.path.join(args.output, "cost")
            name = f"{label}-{trial}"
            assert run(command(args.data_dir, folder, name, [*options, *extra]),
                       os.path.join(folder, name + ".log")) == 0
            state = checkpoint.load(os.path.join(folder, name, "last.pth"))
            rates[label] += [row["img_per_s"] for row in state["summary"]]
    poll = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", os.path.abspath(__file__), "--time-polls"],
                          capture_output=True, text=True, env=ENV, check=True)
    poll_seconds = float(poll.stdout.split("poll seconds ")[1].split()[0])
    step_seconds = 2 * 64 / statistics.median(rates["without"])
    return {"img_per_s": rates,
            "recovery_ratio": statistics.median(rates["with"]) / statistics.median(
                rates["without"]),
            "poll_seconds": poll_seconds, "step_seconds": step_seconds,
            "poll_share_of_a_step": poll_seconds / step_seconds}


def time_polls(count=2000):
    """Under torchrun: the mean time of ``StopVote.poll`` between two gloo processes."""
    from fastkd.engine.distributed import World

    world = World()
    world.stop.poll()
    started = time.perf_counter()
    for _ in range(count):
        world.stop.poll()
        time.sleep(0.001)  # a "step": the vote has arrived by the next poll, as in training
    seconds = (time.perf_counter() - started) / count - 0.001
    world.stop.settle()
    if world.main:
        print(f"poll seconds {max(seconds, 0.0):.3e}")
    world.close()


def report(results, path):
    lines = ["| loader | stop points | saved | exit status as expected | resumed bit-identical "
             "| seconds to exit (median, max) |", "|---|---|---|---|---|---|"]
    for loader in LOADERS:
        rows = [row for row in results["signals"] if row["loader"] == loader]
        if not rows:
            continue
        seconds = [row["seconds_to_exit"] for row in rows]
        lines.append(f"| {loader} | {len(rows)} | {sum(row['saved'] for row in rows)} | "
                     f"{sum(row['status'] == 1 for row in rows)} (torchrun: 1) | "
                     f"{sum(row['identical'] for row in rows)} | "
                     f"{statistics.median(seconds):.1f}, {max(seconds):.1f} |")
    lines += ["", "| stop point kind | runs | bit-identical | signalled after -> stopped at |",
              "|---|---|---|---|"]
    for kind in ("step", "evaluation", "checkpoint write", "demo teacher"):
        rows = [row for row in results["signals"] if row["kind"] == kind]
        where = ", ".join(sorted({f"{row['at'].rstrip('/')} -> {row['stopped_at']}"
                                  for row in rows})[:4])
        lines.append(f"| {kind} | {len(rows)} | {sum(row['identical'] for row in rows)} | "
                     f"{where}{', ...' if len(rows) > 4 else ''} |")
    kills = results["kill"]
    if kills:
        lines += ["", f"kill -9 of every process, --recovery-interval 5: {len(kills)} runs, steps "
                  f"lost {[row['steps_lost'] for row in kills]}, bit-identical after the resume: "
                  f"{sum(row['identical'] for row in kills)}"]
    for name, elastic in results.get("elastic", {}).items():
        lines += ["", f"elastic 2 -> 1 processes (same global batch), {name}: max |weight "
                  f"difference| {elastic['max_abs_difference']:.3g} (relative to the tensor's "
                  f"largest value {elastic['max_relative_difference']:.3g}), top-1 "
                  f"{elastic['top1'][0]:.2f} vs {elastic['top1'][1]:.2f}, train loss "
                  f"{elastic['train_loss'][0]:.4f} vs {elastic['train_loss'][1]:.4f}"]
    cost = results.get("cost")
    if cost:
        lines += ["", f"recovery checkpoints every 5 steps: {cost['recovery_ratio']:.3f} x the "
                  f"img/s without; signal agreement: {1e6 * cost['poll_seconds']:.0f} us a step "
                  f"({100 * cost['poll_share_of_a_step']:.2f}% of a {cost['step_seconds']:.3f} s "
                  "step)"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def small_demo_tree(output, train=24, val=8):
    """The demo digits cut to ``train`` and ``val`` images a class (as the tests' tree: 240 and
    80), with a manifest that lists them, so that the trainer takes the tree as complete."""
    from fastkd.data.demo import MANIFEST, build_demo_dataset

    full = build_demo_dataset(os.path.join(output, "digits"))
    root, kept = os.path.join(output, "digits-small"), []
    for split, count in (("train", train), ("val", val)):
        for label in sorted(os.listdir(os.path.join(full, split))):
            os.makedirs(os.path.join(root, split, label), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(full, split, label)))[:count]:
                relative = f"{split}/{label}/{name}"
                shutil.copyfile(os.path.join(full, relative), os.path.join(root, relative))
                kept.append(relative)
    with open(os.path.join(root, MANIFEST), "w") as handle:
        json.dump({"files": kept}, handle)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output")
    parser.add_argument("--data-dir", help="a demo tree (default: build the full one in OUTPUT)")
    parser.add_argument("--points", type=int, default=20, help="stop points per loader")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--cost-trials", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", nargs="+", default=["signals", "kill", "elastic", "cost"])
    parser.add_argument("--time-polls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_polls:
        return time_polls()
    if not args.output:
        parser.error("--output DIR is required")
    os.makedirs(args.output, exist_ok=True)
    if not args.data_dir:
        args.data_dir = small_demo_tree(args.output)
    from fastkd.data.folders import scan_image_folder

    train_size = len(scan_image_folder(os.path.join(args.data_dir, "train")).samples)
    train_steps = train_size // (2 * args.batch_size)
    sections = {"signals": signals_section, "kill": kill_section, "elastic": elastic_section,
                "cost": lambda args, steps: cost_section(args)}
    results = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
               "train_steps_per_epoch": train_steps}
    for name in args.sections:
        results[name] = sections[name](args, train_steps)
        with open(os.path.join(args.output, "preemption.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    results.setdefault("signals", [])
    results.setdefault("kill", [])
    report(results, os.path.join(args.output, "preemption.md"))


if __name__ == "__main__":
    main()
