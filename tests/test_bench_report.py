"""bench/report.py on a small JSON recorded from a real CPU benchmark run."""

import json
import os

from helpers import load_bench_script

HERE = os.path.dirname(__file__)
SAMPLE = os.path.join(HERE, "data", "bench_cpu_sample.json")


def test_report_tables_and_ratios(tmp_path):
    with open(SAMPLE) as handle:
        recorded = json.load(handle)
    medians = {(b["group"], b["params"]["provider"]): b["stats"]["median"]
               for b in recorded["benchmarks"]}
    output = tmp_path / "report.md"
    load_bench_script("report").main([SAMPLE, "--output", str(output)])
    lines = output.read_text().splitlines()
    assert lines[0] == "### CPU: Intel(R) Xeon(R) Processor @ 2.50GHz"
    for group in {group for group, _ in medians}:
        start = lines.index(f"**{group}**")
        assert lines[start + 2] == "| case | provider | median | vs reference | vs torch |"
        rows = {line.split(" | ")[1]: line for line in lines[start + 4:start + 6]}
        speedup = medians[(group, "reference")] / medians[(group, "torch")]
        assert f"| {speedup:.2f}x | 1.00x |" in rows["torch"]
        assert "| 1.00x |" in rows["reference"]


GPU_SAMPLE = os.path.join(HERE, "data", "bench_gpu_sample.json")


def test_report_gpu_columns(tmp_path):
    """On a recorded H200 run: wall-time ratios, GPU time against the copy floor, peak memory
    beside the gradient's size, rows in provider order within each shape."""
    with open(GPU_SAMPLE) as handle:
        recorded = json.load(handle)
    runs = {(tuple(b["params"]["shape"]), b["params"]["provider"]): b
            for b in recorded["benchmarks"]}
    output = tmp_path / "report.md"
    load_bench_script("report").main([GPU_SAMPLE, "--output", str(output)])
    lines = output.read_text().splitlines()
    assert lines[0].startswith("### CPU: ") and "GPU: NVIDIA H200" in lines[0]
    start = lines.index("**ldrld fwd+bwd fp32 cuda**")
    assert lines[start + 2] == ("| case | provider | median | vs reference | vs copy-floor | "
                                "vs torch | GPU time | peak extra memory | first call | "
                                "GPU time vs copy-floor |")
    rows = [line.split(" | ") for line in lines[start + 4:start + 12]]
    assert [(row[0], row[1]) for row in rows] == [
        (f"| shape={shape}", provider) for shape in ("256x1000", "1024x21843")
        for provider in ("reference", "torch", "triton", "copy-floor")]
    triton = runs[(1024, 21843), "triton"]
    cells = rows[6]
    reference = runs[(1024, 21843), "reference"]["stats"]["median"]
    assert cells[3] == f"{reference / triton['stats']['median']:.2f}x"
    extra = triton["extra_info"]
    assert cells[7] == f"{extra['peak_extra_mib']:.1f} MiB (grad {extra['gradient_mib']:.1f})"
    floor = runs[(1024, 21843), "copy-floor"]["extra_info"]["device_time_s"]
    assert cells[9] == f"{floor / extra['device_time_s']:.2f}x |"
