"""Turn pytest-benchmark JSON into markdown: ``python bench/report.py RESULT.json [...]``.

One table per benchmark group: the median of each provider and its speed against the
``reference``, ``compiled`` and ``copy-floor`` providers of the same case (same parameters but
the provider), when those ran (a ratio above 1 means faster than that baseline). The machine
heading names CPU, GPU, torch and triton.
"""

import argparse
import json

# Providers other rows are compared with, when the group has them: the authors' formulation,
# torch.compile, the memory-copy floor, CE-only training and the vectorised/torchvision path.
BASELINES = ("reference", "compiled", "copy-floor", "ce", "torch")


def provider_of(benchmark):
    params = benchmark.get("params") or {}
    return params.get("provider") or params.get("loader") or params.get("name") or ""


def case_of(benchmark):
    """The benchmark's parameters other than the provider, as a hashable key."""
    params = {key: value for key, value in (benchmark.get("params") or {}).items()
              if key not in ("provider", "loader", "name")}
    return tuple(sorted((key, str(value)) for key, value in params.items()))


def format_time(seconds):
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def machine_heading(machine):
    cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "unknown CPU"
    parts = [f"CPU: {cpu}"]
    if machine.get("gpu"):
        parts.append(f"GPU: {machine['gpu']}")
    for package in ("torch", "triton"):
        if machine.get(package):
            parts.append(f"{package} {machine[package]}")
    return ", ".join(parts)


def report(results):
    """Markdown for a list of loaded pytest-benchmark JSON documents."""
    lines = []
    for result in results:
        lines += [f"### {machine_heading(result.get('machine_info', {}))}", ""]
        groups = {}
        for benchmark in result["benchmarks"]:
            groups.setdefault(benchmark.get("group") or "", []).append(benchmark)
        for group, benchmarks in groups.items():
            medians = {(case_of(b), provider_of(b)): b["stats"]["median"] for b in benchmarks}
            present = [name for name in BASELINES
                       if any(provider == name for _, provider in medians)]
            columns = ["case", "provider", "median", *(f"vs {name}" for name in present)]
            lines += [f"**{group}**", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            for (case, provider), median in sorted(medians.items()):
                ratios = []
                for name in present:
                    baseline = medians.get((case, name))
                    ratios.append(f"{baseline / median:.2f}x" if baseline else "-")
                case_text = ", ".join(f"{key}={value}" for key, value in case) or "-"
                cells = [case_text, provider, format_time(median), *ratios]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--output", help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)
    documents = []
    for path in args.results:
        with open(path) as handle:
            documents.append(json.load(handle))
    text = report(documents)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
