#!/usr/bin/env bash
# One-command GPU check: bench/gpu_check.sh OUTDIR
#
# For a CUDA machine with no internet and no DALI, in under 8 minutes on one H100: environment
# report, the GPU-marked tests, the loss benchmark matrix and a 100-step AMP training throughput
# run. Everything lands in OUTDIR (gpu_check.log, bench-*.json, throughput.json/.md, report.md),
# ready to commit under bench/results/.
#
# The sections run most important first, each within its own time cap and the whole within
# GPU_CHECK_SECONDS (default 480). A benchmark section that reaches its cap skips its remaining
# cases (FASTKD_BENCH_DEADLINE) and still saves what it measured; the log records each section's
# exit status and time. On an H200 a cold run needs about 500 s for everything (the compiled
# provider's compiles take 200 s of it), so with the default budget the last section (KD/DKD)
# may skip its last cases; set GPU_CHECK_SECONDS=560 for all of it.
set -u
OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG="$OUTDIR/gpu_check.log"
END=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
# Short rounds, many of them: the timer waits for the GPU, so each round holds many calls.
BENCH_OPTIONS=(--benchmark-min-time=0.002 --benchmark-max-time=0.05 --benchmark-min-rounds=5
               -p no:cacheprovider -q)

section() {  # section NAME CAP_SECONDS COMMAND...: run within min(cap, time left), log output
    local name=$1 cap=$2 start=$SECONDS
    shift 2
    local limit=$((END - SECONDS < cap ? END - SECONDS : cap))
    if [ "$limit" -le 5 ]; then
        echo "=== $name: not run, out of time" | tee -a "$LOG"
        return
    fi
    echo "=== $name" >>"$LOG"
    # Benchmarks stop starting new cases 20 s before the cap, to leave time to save.
    FASTKD_BENCH_DEADLINE=$(($(date +%s) + limit - 20)) timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PYTHON" - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| triton", triton.__version__, "|", torch.cuda.get_device_name(),
      torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
PY
    # fastkd without its dependencies (the machine has torch, triton and timm, and no internet).
    if ! "$PYTHON" -c "import fastkd.kernels" 2>/dev/null &&
        ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
        # No installer at hand: import from the checkout, with kernels/ where it installs.
        ln -sfn ../kernels fastkd/kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" -c "import fastkd, fastkd.kernels; print('fastkd from', fastkd.__file__)"
}

bench() {  # bench NAME CAP_SECONDS FILE [PYTEST ARGS]: one benchmark file's matrix, as JSON
    local name=$1 cap=$2 file=$3
    shift 3
    section "bench-$name" "$cap" "$PYTHON" -m pytest "bench/$file" "${BENCH_OPTIONS[@]}" "$@" \
        --benchmark-json="$OUTDIR/bench-$name.json"
}

: >"$LOG"
echo "=== environment" >>"$LOG"
environment >>"$LOG" 2>&1
section gpu-tests 90 "$PYTHON" -m pytest -m gpu tests/ -p no:cacheprovider -q
bench ldrld 175 bench_ldrld.py
section throughput 75 "$PYTHON" bench/train_throughput.py --output "$OUTDIR"
bench hcd 70 bench_hcd.py
bench kd 110 bench_kd.py
"$PYTHON" bench/report.py "$OUTDIR"/bench-*.json --output "$OUTDIR/report.md" >>"$LOG" 2>&1
[ -f "$OUTDIR/throughput.md" ] && cat "$OUTDIR/throughput.md" >>"$OUTDIR/report.md"
grep "^=== .*\(exit\|not run\)" "$LOG"
