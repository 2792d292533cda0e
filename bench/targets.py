"""The fused losses' speed targets, read off one GPU check: ``python bench/targets.py OUTDIR``.

Reads what ``bench/gpu_check.sh`` left in OUTDIR (the loss benchmarks' ``bench-*.json``,
``tune_kernels.json`` and the GPU tests' ``gpu-tests.xml``) and writes ``targets.md`` there:
each target with the figure measured and whether it is met. A figure whose measurement is
missing (a section cut short, a case skipped) is "unmeasured", never guessed.
"""

import argparse
import json
import os
import xml.etree.ElementTree as ElementTree

from fastkd.methods import fused_ops

HERE = os.path.dirname(os.path.abspath(__file__))
# The HCD kernel's launch timings before its redesign (B = 1024, C = 21843, H200).
HCD_BEFORE = os.path.join(HERE, "results", "h200-2026-11-26", "followup", "tune_kernels.json")
HEADLINE = (256, 1000)
WIDE = (1024, 21843)
# A CUDA-graph replay may cost this much more host time than an empty one and still count as
# "no more": one replay is a few microseconds, and the median of 500 still varies by a few %.
REPLAY_NOISE = 1.05


def load_cases(outdir):
    """{(loss, mode, dtype, shape, provider): benchmark} from every bench-*.json in ``outdir``."""
    cases = {}
    for name in sorted(os.listdir(outdir)):
        if not (name.startswith("bench-") and name.endswith(".json")):
            continue
        with open(os.path.join(outdir, name)) as handle:
            for benchmark in json.load(handle)["benchmarks"]:
                loss, mode, dtype, _ = benchmark["group"].split()
                params = benchmark["params"]
                key = (loss, mode, dtype, tuple(params["shape"]), params["provider"])
                cases[key] = benchmark
    return cases


def median(cases, key):
    return cases[key]["stats"]["median"] if key in cases else None


def gpu_time(cases, key):
    return cases.get(key, {}).get("extra_info", {}).get("device_time_s")


def ratio_row(target, case, numerator, denominator, goal, at_most=True):
    """A table row for ``numerator / denominator`` against ``goal``."""
    if numerator is None or denominator is None:
        return [target, case, "unmeasured", f"{'<=' if at_most else '>='} {goal}", "-"]
    value = numerator / denominator
    met = value <= goal if at_most else value >= goal
    return [target, case, f"{value:.2f}x", f"{'<=' if at_most else '>='} {goal}x",
            "met" if met else "**not met**"]


def test_outcome(outdir, name):
    """'passed', 'failed', 'skipped' or None for the GPU test named ``name`` in gpu-tests.xml."""
    path = os.path.join(outdir, "gpu-tests.xml")
    if not os.path.exists(path):
        return None
    for case in ElementTree.parse(path).iter("testcase"):
        if case.get("name") == name:
            for outcome in ("failure", "error", "skipped"):
                if case.find(outcome) is not None:
                    return "skipped" if outcome == "skipped" else "failed"
            return "passed"
    return None


def target_rows(cases, outdir):
    rows = []
    for loss in fused_ops():
        for dtype in ("fp32", "bf16"):
            key = (loss, "fwd+bwd", dtype, HEADLINE)
            rows.append(ratio_row("1. host time vs F.cross_entropy (fwd+bwd)",
                                  f"{loss} {dtype} 256x1000", median(cases, (*key, "triton")),
                                  median(cases, (*key, "cross-entropy")), 2))
    shapes = sorted({key[3] for key in cases if key[0] == "hcd" and key[4] == "triton"})
    for shape in shapes:
        for dtype in ("fp32", "bf16"):
            for mode in ("fwd", "fwd+bwd"):
                key = ("hcd", mode, dtype, shape)
                if (*key, "triton") in cases:
                    rows.append(ratio_row("2. HCD triton GPU time vs torch",
                                          f"{mode} {dtype} {shape[0]}x{shape[1]}",
                                          gpu_time(cases, (*key, "triton")),
                                          gpu_time(cases, (*key, "torch")), 1))
    key = ("hcd", "fwd+bwd", "fp32", HEADLINE)
    rows.append(ratio_row("2. HCD reference GPU time vs triton", "fwd+bwd fp32 256x1000",
                          gpu_time(cases, (*key, "reference")), gpu_time(cases, (*key, "triton")),
                          5, at_most=False))
    for loss, goal in (("ldrld", 3), ("kd", 2), ("dkd", 2)):
        for dtype in ("fp32", "bf16"):
            key = (loss, "fwd+bwd", dtype, WIDE)
            rows.append(ratio_row(f"{'3' if loss == 'ldrld' else '4'}. GPU time vs copy floor",
                                  f"{loss} {dtype} 1024x21843", gpu_time(cases, (*key, "triton")),
                                  gpu_time(cases, (*key, "copy-floor")), goal))
    outcome = test_outcome(outdir, "test_compiled_resnet18_step_with_ldrld_has_no_graph_break")
    rows.append(["5. compiled ResNet-18 step with LDRLD, fullgraph", "CUDA",
                 outcome or "unmeasured", "passed (0 graph breaks)",
                 "-" if outcome is None else "met" if outcome == "passed" else "**not met**"])
    for loss in fused_ops():
        for dtype in ("fp32", "bf16"):
            for shape in (HEADLINE, WIDE):
                key = (loss, "fwd+bwd", dtype, shape)
                rows.append(ratio_row("6. CUDA-graph replay host time vs an empty graph's",
                                      f"{loss} {dtype} {shape[0]}x{shape[1]}",
                                      median(cases, (*key, "graph-replay")),
                                      median(cases, (*key, "empty-graph")), REPLAY_NOISE))
    return rows


def hcd_launch_lines(outdir):
    """The HCD launch's GPU time at B = 1024, C = 21843: the fastest setting of the sweep before
    the redesign (which then became the default, 878f7b4) and this run's default."""
    lines = []
    for label, path, pick in (
            ("before (2026-11-26, fastest setting)", HCD_BEFORE, lambda rows: min(
                rows, key=lambda row: row.get("ms", float("inf")))),
            ("this run (default setting)", os.path.join(outdir, "tune_kernels.json"),
             lambda rows: next((row for row in rows if row.get("default")), None))):
        if not os.path.exists(path):
            lines.append(f"- {label}: unmeasured")
            continue
        with open(path) as handle:
            rows = json.load(handle)["rows"]
        for dtype in ("fp32", "bf16"):
            row = pick([row for row in rows if row["kernel"] == "hcd" and row["dtype"] == dtype
                        and "ms" in row] or [{}])
            if not row:
                lines.append(f"- {label}, {dtype}: unmeasured")
                continue
            lines.append(f"- {label}, {dtype}: {row['ms']:.2f} ms (block {row['block']}, "
                         f"{row['warps']} warps), {row['vs_floor']:.1f}x its copy floor")
    return lines


def report(outdir):
    cases = load_cases(outdir)
    columns = ["target", "case", "measured", "goal", ""]
    lines = ["## Fused-loss targets", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in target_rows(cases, outdir)]
    lines += ["", "HCD launch (bench/tune_kernels.py, B = 1024, C = 21843, CUDA-graph replay):",
              *hcd_launch_lines(outdir), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="a bench/gpu_check.sh output folder")
    args = parser.parse_args(argv)
    text = report(args.outdir)
    with open(os.path.join(args.outdir, "targets.md"), "w") as handle:
        handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
