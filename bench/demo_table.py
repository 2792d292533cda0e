"""The demo's baseline-versus-distilled table over seeds (``--output DIR``).

For each method and seed, README's main job (``torchrun --standalone --nproc-per-node 2
train/main.py --distiller METHOD --amp --seed SEED``) on the built-in digits: the cached demo
teacher, a CE-only baseline student and the distilled student, same model, seed and epochs.
Reads each run's summary.csv and prints top-1 (last epoch and best epoch) as mean ± std over
the seeds, with the distilled-minus-baseline difference; writes demo_table.json and .md.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

from fastkd.methods import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every registered method that distils (installed plug-ins' included).
METHODS = tuple(name for name, method in methods().items() if method.needs_teacher)


def top1(folder):
    """(last epoch's top-1, best top-1) of a run folder's summary.csv."""
    with open(os.path.join(folder, "summary.csv"), newline="") as handle:
        values = [float(row["eval_top1"]) for row in csv.DictReader(handle)]
    return values[-1], max(values)


def spread(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=(0, 1, 2))
    args = parser.parse_args(argv)
    results = {}
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            started = time.time()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", os.path.join(REPO, "train", "main.py"),
                            "--distiller", method, "--amp", "--seed", str(seed), "--output",
                            args.output, "--experiment", name], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            results[name] = {
                "method": method, "seed": seed, "seconds": round(time.time() - started),
                "student": top1(os.path.join(args.output, name)),
                "baseline": top1(os.path.join(args.output, f"{name}-ce-baseline"))}
            print(name, results[name], flush=True)
    lines = ["| method | baseline (CE) top-1 last / best | distilled top-1 last / best | "
             "distilled - baseline, last / best |", "|---|---|---|---|"]
    for method in args.methods:
        runs = [result for result in results.values() if result["method"] == method]
        cells = []
        for role in ("baseline", "student"):
            cells.append(" / ".join(spread([run[role][which] for run in runs])
                                    for which in (0, 1)))
        cells.append(" / ".join(spread([run["student"][which] - run["baseline"][which]
                                        for run in runs]) for which in (0, 1)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + (f"\n\nSeeds {list(args.seeds)}; mean ± sample std over seeds; "
                               "top-1 % on the digits' 355 validation images.\n")
    with open(os.path.join(args.output, "demo_table.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(args.output, "demo_table.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
