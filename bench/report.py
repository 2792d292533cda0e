"""Turn pytest-benchmark JSON into markdown: ``python bench/report.py RESULT.json [...]``.

One table per benchmark group: the median of each provider and its speed against the
``reference``, ``compiled``, ``copy-floor`` and ``cross-entropy`` providers of the same case
(same parameters but the provider), when those ran (a ratio above 1 means faster than that
baseline; against the copy floor it is below 1, the fraction of the bandwidth limit reached).
Where the benchmarks recorded them, also the GPU time of one call (its kernels' summed
durations) and its ratio to the copy floor's, the peak extra memory of one call (with the
gradient's size) and the first call's time (compile or JIT included). The machine heading
names CPU, GPU, torch and triton.
"""

import argparse
import json

# Providers other rows are compared with, when the group has them: the authors' formulation,
# torch.compile, the memory-copy floor, F.cross_entropy (host cost), CE-only training and the
# vectorised/torchvision path.
BASELINES = ("reference", "compiled", "copy-floor", "cross-entropy", "ce", "torch")


def provider_of(benchmark):
    params = benchmark.get("params") or {}
    return params.get("provider") or params.get("loader") or params.get("name") or ""


# Measurements the loss benchmarks add to extra_info, and their column headings.
EXTRA_COLUMNS = {"device_time_s": "GPU time", "peak_extra_mib": "peak extra memory",
                 "first_call_s": "first call"}
# Row order within a case; other providers follow in name order.
PROVIDER_ORDER = ("reference", "torch", "compiled", "triton", "cross-entropy", "copy-floor",
                  "graph-replay", "empty-graph")


def case_of(benchmark):
    """The benchmark's parameters other than the provider, as a sortable, hashable key."""
    params = {key: value for key, value in (benchmark.get("params") or {}).items()
              if key not in ("provider", "loader", "name")}
    return tuple(sorted((key, tuple(value) if isinstance(value, list) else str(value))
                        for key, value in params.items()))


def row_order(key):
    case, provider = key
    rank = PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return case, rank, provider


def case_text(case, shared):
    """The parameters that vary within the table (the group name carries the others)."""
    text = ", ".join(f"{key}={'x'.join(map(str, value)) if isinstance(value, tuple) else value}"
                     for key, value in case if (key, value) not in shared)
    return text or "-"


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


def memory_text(extra_info):
    """Peak extra memory and, for a loss with a gradient, the gradient's size beside it."""
    text = f"{extra_info['peak_extra_mib']:.1f} MiB"
    if extra_info.get("gradient_mib"):
        text += f" (grad {extra_info['gradient_mib']:.1f})"
    return text


def report(results):
    """Markdown for a list of loaded pytest-benchmark JSON documents."""
    lines = []
    for result in results:
        lines += [f"### {machine_heading(result.get('machine_info', {}))}", ""]
        groups = {}
        for benchmark in result["benchmarks"]:
            groups.setdefault(benchmark.get("group") or "", []).append(benchmark)
        for group, benchmarks in groups.items():
            rows = {(case_of(b), provider_of(b)): b for b in benchmarks}
            medians = {key: b["stats"]["median"] for key, b in rows.items()}
            present = [name for name in BASELINES
                       if any(provider == name for _, provider in medians)]
            extras = [column for column in EXTRA_COLUMNS
                      if any(column in b.get("extra_info", {}) for b in benchmarks)]
            gpu_times = {key: b["extra_info"]["device_time_s"] for key, b in rows.items()
                         if "device_time_s" in b.get("extra_info", {})}
            gpu_floor = any(provider == "copy-floor" for _, provider in gpu_times)
            columns = ["case", "provider", "median", *(f"vs {name}" for name in present),
                       *(EXTRA_COLUMNS[column] for column in extras),
                       *(["GPU time vs copy-floor"] if gpu_floor else [])]
            lines += [f"**{group}**", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            shared = set.intersection(*(set(case) for case, _ in medians))
            for (case, provider), median in sorted(medians.items(),
                                                   key=lambda item: row_order(item[0])):
                ratios = []
                for name in present:
                    baseline = medians.get((case, name))
                    ratios.append(f"{baseline / median:.2f}x" if baseline else "-")
                extra_info = rows[case, provider].get("extra_info", {})
                extra_cells = []
                for column in extras:
                    if column not in extra_info:
                        extra_cells.append("-")
                    elif column == "peak_extra_mib":
                        extra_cells.append(memory_text(extra_info))
                    else:
                        extra_cells.append(format_time(extra_info[column]))
                if gpu_floor:
                    floor = gpu_times.get((case, "copy-floor"))
                    time = gpu_times.get((case, provider))
                    extra_cells.append(f"{floor / time:.2f}x" if floor and time else "-")
                cells = [case_text(case, shared), provider, format_time(median), *ratios,
                         *extra_cells]
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
