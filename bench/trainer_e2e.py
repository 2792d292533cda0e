"""The real trainer end to end on a GPU: ``python bench/trainer_e2e.py --output OUTDIR``.

Writes a JPEG tree (100 classes of 500x375 photos-like images, 8,000 for training and 1,000 for
validation, in one process per CPU) and a randomly initialised ResNet-34 teacher checkpoint,
then runs ``torchrun --standalone --nproc-per-node 1 train/main.py`` for ResNet-18 <- ResNet-34
at 224, bf16 autocast, channels-last, batch 256, one run per row of ``RUNS``: the GPU-decoding
loader, CPU decoding, synthetic data (LDRLD and CE), a SIGTERM mid-epoch and its resume,
fp16 with GradScaler, HCD, ``--torchcompile``, and gpu-decode fed by a teacher cache (``cached``:
the cache built first by ``train/cache_teacher.py`` under torchrun and checked with ``--verify``;
its losses set beside gpu-decode's, the same run with the live teacher). Each run's figures come
from its summary.csv (the last epoch: img/s, the share of the epoch spent waiting for data, peak GPU
memory) and its log (the process group's backend). The loss's share of a step comes from
``train_throughput.py``'s throughput.json in OUTDIR, when that ran first (same models, batch,
dtype and GPU). Results: OUTDIR/trainer_e2e.json and trainer_e2e.md.

Runs start in order of importance until ``--seconds`` is spent; each has its own time cap.
``--dry-run`` (no GPU needed) writes a small tree and the teacher, checks every run's command
line with the trainer's own parser and writes the result files with nothing measured.
"""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from multiprocessing import Pool

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "train", "main.py")
CACHE_TEACHER = os.path.join(REPO, "train", "cache_teacher.py")
IMAGE_SIZE = (500, 375)  # width, height: ImageNet's most common shape
CLOSING_REPORT = re.compile(r" run: \d+ s wall.*, outputs in ")  # the trainer's last line
EXIT_GRACE = 20  # seconds a run may take to exit after its closing report
# --lr 0.01: LDRLD's large loss weights and a random teacher send the loss to inf at 0.1 (the
# first GPU run, 2026-11-27, most likely: its GPU-decoding run stopped in epoch 0 with exit 1).
COMMON = ["--model", "resnet18", "--amp", "--amp-dtype", "bfloat16", "--channels-last", "-b",
          "256", "--lr", "0.01", "--log-interval", "10", "--seed", "0", "--epochs", "2"]
TEACHER = ["--teacher", "resnet34", "--allow-untrained-teacher"]
SYNTHETIC = ["--dataset", "synthetic", "--num-classes", "1000", "--synthetic-samples", "25600"]
TRAINING_ONLY = {"--lr", "--log-interval"}  # COMMON's flags that change nothing in a cache


def folder_options(tree, teacher):
    return ["--dataset", "folder", "--data-dir", tree, *TEACHER, "--teacher-checkpoint", teacher]


def runs(tree, teacher, cpus):
    """``(name, what it shows, trainer options, cap in seconds)``, most important first."""
    folder = folder_options(tree, teacher)
    return [
        ("gpu-decode", "torchvision nvJPEG decoding on the GPU, workers read bytes",
         [*folder, "--loader", "nvjpeg", "-j", "6"], 120),
        ("cpu-decode", f"PIL decoding on {max(cpus - 2, 1)} CPU workers",
         [*folder, "--loader", "torch", "-j", str(max(cpus - 2, 1))], 120),
        ("synthetic-ldrld", "the trainer's ceiling: no input pipeline", [*SYNTHETIC, *TEACHER],
         90),
        ("synthetic-ce", "the same without a teacher", [*SYNTHETIC, "--distiller", "ce"], 90),
        ("sigterm", "SIGTERM at epoch 1 step 10, then --resume", [*folder, "--loader", "nvjpeg",
                                                                  "-j", "6"], 150),
        ("fp16", "fp16 autocast with GradScaler", [*SYNTHETIC, *TEACHER, "--amp-dtype",
                                                   "float16"], 90),
        ("hcd", "HCD (projectors and mappers in the DDP module)",
         [*SYNTHETIC, *TEACHER, "--distiller", "hcd"], 90),
        ("compile", "--torchcompile (inductor)", [*SYNTHETIC, *TEACHER, "--torchcompile"], 240),
        ("cached", "gpu-decode fed by a float32 teacher cache (built and verified first)",
         [*folder, "--loader", "nvjpeg", "-j", "6"], 240),
    ]


def cache_options(options):
    """The teacher cache builder's flags for a run's ``options``: the same data, teacher, loader
    and augmentation flags, without the training-only ones."""
    kept, flags = [], iter(options)
    for flag in flags:
        if flag in TRAINING_ONLY:
            next(flags)
        else:
            kept.append(flag)
    return kept


def write_image(job):
    """A smooth colour field plus noise: compresses like a photo (about 100 kB at quality 90)."""
    path, seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(IMAGE_SIZE, Image.BILINEAR), dtype=np.float32)
    pixels = smooth + rng.normal(0, 10, smooth.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_tree(root, classes, train_per_class, val_per_class, processes):
    jobs = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = os.path.join(root, split, f"class{label:03d}")
            os.makedirs(folder, exist_ok=True)
            jobs += [(os.path.join(folder, f"{index:04d}.jpg"),
                      zlib.crc32(f"{split}/{label}/{index}".encode())) for index in range(count)]
    with Pool(processes) as pool:
        pool.map(write_image, jobs, chunksize=32)
    return len(jobs)


def save_teacher(path, num_classes):
    """A randomly initialised ResNet-34's state dict, as a user's teacher file would be."""
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet34", num_classes=num_classes).state_dict(), path)


def summary_rows(run_dir):
    """summary.csv's rows, one per epoch, numbers as floats."""
    with open(os.path.join(run_dir, "summary.csv"), newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def last_epoch(run_dir):
    return summary_rows(run_dir)[-1]


def torchrun(options, log_path, cap, stop_at=None, script=MAIN):
    """Run ``script`` (the trainer) under torchrun; with ``stop_at`` (a log line's start), send
    SIGTERM to torchrun, which passes it to its worker, when that line appears. Returns (exit code,
    seconds, whether it hung after its closing report): a run still alive ``EXIT_GRACE``
    seconds after its closing report, or at ``cap``, is aborted (its faulthandler prints every
    thread's stack to the log) and killed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", script, *options]
    started, finished, signalled, killed = time.time(), None, False, False
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        while process.poll() is None:
            text = open(log_path).read()
            if finished is None and CLOSING_REPORT.search(text):
                finished = time.time()
            now = time.time()
            if now - started > cap or (finished and now - finished > EXIT_GRACE):
                abort_workers(process.pid)
                time.sleep(3)
                process.kill()
                killed = True
                break
            if stop_at and not signalled and stop_at in text:
                process.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.2)
    return process.wait(), time.time() - started, killed and finished is not None


def abort_workers(pid):
    """SIGABRT to torchrun's worker processes (Linux /proc), for their faulthandler tracebacks."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            for child in handle.read().split():
                os.kill(int(child), signal.SIGABRT)


def worker_output(log):
    """The end of a run's log without torchrun's own report of a failed worker (which would
    fill the tail and hide the worker's error)."""
    report = log.find("ChildFailedError")
    if report > 0:
        log = log[:log.rfind("Traceback (most recent call last):", 0, report)]
    return log[-3000:]


def measure(name, options, run_dir, log_path, cap):
    status, seconds, hung = torchrun([*options, "--output", os.path.dirname(run_dir),
                                      "--experiment", os.path.basename(run_dir)], log_path, cap)
    result = {"exit": status, "seconds": round(seconds, 1), "hung_at_exit": hung}
    log = open(log_path).read()
    result["process_group"] = next((line[line.index("process group:"):]
                                    for line in log.splitlines() if "process group:" in line),
                                   None)
    if os.path.isfile(os.path.join(run_dir, "summary.csv")):
        row = last_epoch(run_dir)
        result.update(epoch=int(row["epoch"]), images_per_s=row["img_per_s"],
                      data_wait=row.get("data_wait"), max_memory_gib=row.get("max_memory_gib"),
                      train_loss=row.get("train_loss"))
    if status != 0:
        result["log_tail"] = worker_output(log)
    return result


def sigterm_and_resume(options, run_dir, log_dir, cap):
    """SIGTERM at epoch 1 step 10; the run must save and exit 143, then resume and finish."""
    named = [*options, "--output", os.path.dirname(run_dir), "--experiment",
             os.path.basename(run_dir)]
    status, seconds, _ = torchrun(named, os.path.join(log_dir, "sigterm.log"), cap / 2,
                                  stop_at="epoch 1 [10/")
    log = open(os.path.join(log_dir, "sigterm.log")).read()
    last = os.path.join(run_dir, "last.pth")
    result = {"exit": status, "seconds": round(seconds, 1),
              "saved": [line for line in log.splitlines() if "SIGTERM: saved" in line],
              "last_pth": os.path.isfile(last)}
    if not result["last_pth"]:
        result["log_tail"] = worker_output(log)
        return result
    status, seconds, hung = torchrun([*options, "--resume", last],
                                     os.path.join(log_dir, "resume.log"), cap / 2)
    log = open(os.path.join(log_dir, "resume.log")).read()
    result["resume"] = {"exit": status, "seconds": round(seconds, 1), "hung_at_exit": hung,
                        "resumed": [line for line in log.splitlines()
                                    if " resumed " in line]}
    if os.path.isfile(os.path.join(run_dir, "summary.csv")):
        result["resume"]["epochs"] = int(last_epoch(run_dir)["epoch"]) + 1
    if status != 0:
        result["resume"]["log_tail"] = worker_output(log)
    return result


def cached_run(options, run_dir, log_dir, cap, results):
    """Build a float32 teacher cache of ``options``' two epochs (torchrun, 1 process), check it
    with ``--verify``, then train from it. Adds the build's rate (tqdm's) and seconds, the
    verify line, and the relative difference of each epoch's train loss from gpu-decode's (the
    same run with the live teacher), if that ran."""
    cache = os.path.join(os.path.dirname(run_dir), "teacher-cache")
    build_log = os.path.join(log_dir, "cache-build.log")
    status, seconds, hung = torchrun([*cache_options(options), "--teacher-cache", cache,
                                      "--cache-dtype", "float32"], build_log, cap / 3,
                                     script=CACHE_TEACHER)
    log = open(build_log).read()
    rates = re.findall(r"([\d.]+)img/s\]", log)
    build = {"exit": status, "seconds": round(seconds, 1), "hung_at_exit": hung,
             "images_per_s": float(rates[-1]) if rates else None,
             "wrote": next((line for line in log.splitlines() if " wrote " in line), None)}
    if status != 0:
        return {"exit": status, "build": {**build, "log_tail": worker_output(log)}}
    verify = subprocess.run([sys.executable, CACHE_TEACHER, *cache_options(options), "--verify",
                             cache], cwd=REPO, capture_output=True, text=True, timeout=cap / 6)
    build["verify"] = [line for line in (verify.stdout + verify.stderr).splitlines()
                       if "largest" in line or "error" in line] or verify.stderr[-1000:]
    result = measure("cached", [*options, "--teacher-cache", cache], run_dir,
                     os.path.join(log_dir, "cached.log"), cap / 2)
    result["build"] = build
    live_dir = os.path.join(os.path.dirname(run_dir), "gpu-decode")
    if results.get("gpu-decode", {}).get("exit") == 0 and os.path.isfile(
            os.path.join(run_dir, "summary.csv")):
        live, cached = ([row["train_loss"] for row in summary_rows(folder)]
                        for folder in (live_dir, run_dir))
        result["train_loss_rel_diff"] = [abs(a - b) / abs(a) for a, b in zip(live, cached)]
    return result


def targets(results, throughput):
    """The issue's targets as ``(what, measured ratio, bound, met)``."""
    rate = {name: result.get("images_per_s") for name, result in results.items()}
    bench = {row["distiller"]: row.get("images_per_s") for row in throughput.get("rows", [])}
    checks = []
    for distiller in ("ldrld", "ce"):
        checks.append((f"synthetic {distiller} / train_throughput.py {distiller}",
                       rate.get(f"synthetic-{distiller}"), bench.get(distiller), 0.95))
    checks.append(("gpu-decode / cpu-decode", rate.get("gpu-decode"), rate.get("cpu-decode"),
                   2.0))
    checks.append(("gpu-decode / synthetic ldrld", rate.get("gpu-decode"),
                   rate.get("synthetic-ldrld"), 0.8))
    # The teacher cache's goal for resnet18 <- resnet34 (issue 25): 1.4x the live teacher.
    checks.append(("cached / gpu-decode (live teacher)", rate.get("cached"),
                   rate.get("gpu-decode"), 1.4))
    return [(what, (a / b) if a and b else None, bound, bool(a and b and a / b >= bound))
            for what, a, b, bound in checks]


def markdown(report):
    lines = [f"# Trainer end to end: {report['gpu']}, torch {report['torch']}, "
             f"{report['cpus']} CPUs", "",
             "ResNet-18 <- ResNet-34 (LDRLD unless named), 224 px, bf16 autocast, "
             "channels-last, batch 256, `torchrun --standalone --nproc-per-node 1`. Figures "
             "from each run's last epoch.", "",
             "| run | what | exit | img/s | data wait | peak GPU memory | loss share | wall |",
             "|---|---|---|---|---|---|---|---|"]
    share = {row["distiller"]: row.get("loss_share")
             for row in report.get("throughput", {}).get("rows", [])}
    for name, what, _, _ in report["runs"]:
        result = report["results"].get(name, {"exit": "not run"})
        distiller = "ce" if name.endswith("-ce") else "hcd" if name == "hcd" else "ldrld"

        def cell(key, fmt):
            value = result.get(key)
            return fmt.format(value) if value is not None else "-"

        loss_share = share.get(distiller)
        status = f"{result.get('exit')}{' (hung at exit)' if result.get('hung_at_exit') else ''}"
        lines.append(f"| {name} | {what} | {status} | {cell('images_per_s', '{:.0f}')}"
                     f" | {cell('data_wait', '{:.1%}')} | {cell('max_memory_gib', '{:.1f} GiB')}"
                     f" | {'-' if loss_share is None else f'{loss_share:.1%}'}"
                     f" | {cell('seconds', '{:.0f} s')} |")
    lines += ["", "Targets:", ""]
    for what, ratio, bound, met in report["targets"]:
        measured = "unmeasured" if ratio is None else f"{ratio:.2f}"
        lines.append(f"- {what}: {measured} (target >= {bound}){' met' if met else ''}")
    sigterm = report["results"].get("sigterm")
    if sigterm:
        lines += ["", f"SIGTERM: exit {sigterm.get('exit')}, {sigterm.get('saved')}; resume: "
                  f"{sigterm.get('resume')}"]
    cached = report["results"].get("cached")
    if cached:
        lines += ["", f"Teacher cache: build {cached.get('build')}; train loss vs gpu-decode, "
                  f"relative difference per epoch: {cached.get('train_loss_rel_diff')}"]
    groups = {result.get("process_group") for result in report["results"].values()} - {None}
    lines += ["", f"Process groups: {sorted(groups) or 'none logged'}"]
    return "\n".join(lines) + "\n"


def write_report(report, output):
    """trainer_e2e.json and .md in ``output``, the targets against its throughput.json (if
    any); returns the markdown."""
    throughput_path = os.path.join(output, "throughput.json")
    report["throughput"] = (json.load(open(throughput_path))
                            if os.path.isfile(throughput_path) else {})
    report["targets"] = targets(report["results"], report["throughput"])
    with open(os.path.join(output, "trainer_e2e.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(os.path.join(output, "trainer_e2e.md"), "w") as handle:
        handle.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument("--work", help="folder for the JPEG tree and runs (default OUTPUT/work)")
    parser.add_argument("--seconds", type=float, default=420,
                        help="no run starts after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="setup and command lines only, no GPU needed")
    parser.add_argument("--only", nargs="+", metavar="RUN",
                        help="these runs alone, added to OUTPUT's earlier results")
    parser.add_argument("--logs", help="folder for the runs' logs (default OUTPUT/trainer_logs)")
    args = parser.parse_args(argv)
    started = time.time()
    cpus = os.cpu_count()
    work = args.work or os.path.join(args.output, "work")
    tree, teacher = os.path.join(work, "jpeg"), os.path.join(work, "resnet34-random.pth")
    os.makedirs(work, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --dry-run)")
    made = os.path.join(work, "made")  # the tree and teacher of an earlier call are reused
    if not os.path.isfile(made):
        images = make_tree(tree, *((2, 3, 2, min(cpus, 2)) if args.dry_run else
                                   (100, 80, 10, cpus)))
        print(f"{images} JPEGs in {time.time() - started:.0f} s", flush=True)
        save_teacher(teacher, 2 if args.dry_run else 100)
        open(made, "w").close()
    plan = runs(tree, teacher, cpus)
    names = [name for name, *_ in plan]
    if args.only and not set(args.only) <= set(names):
        parser.error(f"--only takes runs among {names}, got {args.only}")
    plan = [run for run in plan if not args.only or run[0] in args.only]
    report = {"cpus": cpus, "runs": [(name, what, [*COMMON, *options], cap)
                                     for name, what, options, cap in plan],
              "results": {}, "dry_run": args.dry_run}
    earlier = os.path.join(args.output, "trainer_e2e.json")
    if args.only and os.path.isfile(earlier):
        report["results"] = json.load(open(earlier))["results"]
    if args.dry_run:
        sys.path.insert(0, REPO)
        from fastkd.engine.config import parse_args, parse_cache_args

        for name, _, options, _ in report["runs"]:
            parse_args(options)  # the trainer's own checks; a bad flag exits here
        cached = next(options for name, _, options, _ in report["runs"] if name == "cached")
        parse_cache_args([*cache_options(cached), "--teacher-cache",
                          os.path.join(work, "teacher-cache"), "--cache-dtype", "float32"])
        report.update(gpu="dry run", torch="-")
    else:
        import torch

        report.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        runs_dir = os.path.join(work, "runs")
        logs = args.logs or os.path.join(args.output, "trainer_logs")
        os.makedirs(logs, exist_ok=True)
        for name, _, options, cap in report["runs"]:
            if args.only and name not in args.only:
                continue
            if time.time() - started > args.seconds:
                report["results"][name] = {"exit": "not run, out of time"}
                continue
            run_dir = os.path.join(runs_dir, name)
            if name == "sigterm":
                result = sigterm_and_resume(options, run_dir, logs, cap)
            elif name == "cached":
                result = cached_run(options, run_dir, logs, cap, report["results"])
            else:
                result = measure(name, options, run_dir, os.path.join(logs, f"{name}.log"), cap)
            report["results"][name] = result
            print(name, json.dumps({key: value for key, value in result.items()
                                    if key != "log_tail"}), flush=True)
            write_report(report, args.output)  # what is measured survives a cut-off call
    print(write_report(report, args.output))
    failed = [name for name, result in report["results"].items()
              if name in {run[0] for run in plan} and result.get("exit") != 0
              and not (name == "sigterm" and result.get("resume", {}).get("exit") == 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
