"""bench/report.py on a small JSON recorded from a real CPU benchmark run."""

import importlib.util
import json
import os

HERE = os.path.dirname(__file__)
SAMPLE = os.path.join(HERE, "data", "bench_cpu_sample.json")


def load_report_module():
    spec = importlib.util.spec_from_file_location(
        "bench_report", os.path.join(HERE, os.pardir, "bench", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_tables_and_ratios(tmp_path):
    with open(SAMPLE) as handle:
        recorded = json.load(handle)
    medians = {(b["group"], b["params"]["provider"]): b["stats"]["median"]
               for b in recorded["benchmarks"]}
    output = tmp_path / "report.md"
    load_report_module().main([SAMPLE, "--output", str(output)])
    lines = output.read_text().splitlines()
    assert lines[0] == "### CPU: Intel(R) Xeon(R) Processor @ 2.50GHz"
    for group in {group for group, _ in medians}:
        start = lines.index(f"**{group}**")
        assert lines[start + 2] == "| case | provider | median | vs reference | vs torch |"
        rows = {line.split(" | ")[1]: line for line in lines[start + 4:start + 6]}
        speedup = medians[(group, "reference")] / medians[(group, "torch")]
        assert f"| {speedup:.2f}x | 1.00x |" in rows["torch"]
        assert "| 1.00x |" in rows["reference"]
